"""Echoed completions with log-probabilities: scoring a text, as lm-eval's ``local-completions``
model asks for its log-likelihood requests (``echo``, ``logprobs``, ``max_tokens`` 1).

Such a request sends context and continuation as one prompt. The connection reads the prompt at p,
the last token of the *context* (``cctuning lm-eval`` knows where the context ends and puts p
there), but nothing in the request says where that is. So the server scores with connection
``none`` only, where no p is needed, and refuses an echo with any other connection instead of
guessing: for connected log-likelihoods use ``cctuning lm-eval --model cctuning``. With connection
``none`` the figures are those of the plain model: ``token_logprobs[i]`` is the log-probability of
token ``i`` given the tokens before it (null for the first), ``top_logprobs[i]`` the ``logprobs``
most likely tokens there, and one greedy token follows the prompt.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from cctuning.serve.engine import Engine, QueueFull, ScoreJob
from cctuning.serve.prompts import completion_prompts
from cctuning.serve.protocol import APIError, Served, bad, check_unsupported, field, sampling
from cctuning.serve.runs import DISCONNECT_POLL_S

#: the most alternatives per position (the OpenAI API allows 5)
MAX_LOGPROBS = 20


def _check(served: Served, body: dict) -> tuple[str, int, list]:
    """The requested model, ``logprobs`` and the prompts of an echo request (refused unless it
    scores: ``echo`` with ``logprobs``, ``max_tokens`` 1, greedy, one choice, connection none)."""
    check_unsupported(body)
    name, alias = served.model_connection(body)
    settings = sampling(body, 1)
    top = field(body, "logprobs", (int,))
    echo = field(body, "echo", (bool,), False)
    if top is None or not echo:
        raise bad(
            "logprobs",
            "'logprobs' and 'echo' are served together only, to score a prompt",
            "unsupported_parameter",
        )
    if not 0 <= top <= MAX_LOGPROBS:
        raise bad("logprobs", f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {top}", "invalid_value")
    if settings.max_tokens != 1 or settings.temperature != 0 or field(body, "n", (int,), 1) != 1:
        raise bad("echo", "an echoed completion scores its prompt: max_tokens 1, temperature 0 and n 1 only")
    if field(body, "stream", (bool,), False):
        raise bad("stream", "an echoed completion is not streamed")
    connection = served.connection_of(body, alias, False)
    if connection != "none":
        raise bad(
            "echo",
            f"an echoed prompt is scored with connection none only (this request runs {connection}): the "
            "server cannot tell where the prompt that the connection reads ends inside it. Ask for the "
            f'model \'{served.name}@none\' or "connection": "none", or score with `cctuning lm-eval '
            "--model cctuning`, which knows",
        )
    return name, top, completion_prompts(served, body, 1)


async def score(served: Served, engine: Engine, body: dict, request) -> dict:
    """The answer to an echo request: each prompt's tokens scored, one greedy token after it."""
    name, top, prompts = _check(served, body)
    loop = asyncio.get_running_loop()
    results: list[asyncio.Future] = [loop.create_future() for _ in prompts]

    def sink(future: asyncio.Future):
        def deliver(event) -> None:
            if not future.done():
                future.set_result(event)

        return lambda event: loop.call_soon_threadsafe(deliver, event)

    jobs = [ScoreJob(p.ids, top, sink(f)) for p, f in zip(prompts, results)]
    try:
        engine.submit(jobs)
    except QueueFull as err:
        raise APIError(
            503, str(err), "server_error", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    while not all(f.done() for f in results):
        await asyncio.wait([f for f in results if not f.done()], timeout=DISCONNECT_POLL_S)
        if await request.is_disconnected():
            for job in jobs:
                job.cancelled = True
            return {}
    choices = [_choice(served, i, p.ids, f.result(), top) for i, (p, f) in enumerate(zip(prompts, results))]
    scored = sum(len(p.ids) for p in prompts)
    return {
        "id": "cmpl-" + uuid.uuid4().hex[:24],
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": scored,
            "completion_tokens": len(prompts),
            "total_tokens": scored + len(prompts),
        },
    }


def _choice(served: Served, index: int, ids: list[int], event, top: int) -> dict:
    if event.kind == "error":
        raise APIError(500, event.text, "server_error")
    data = event.data
    decode = served.tokenizer.decode
    tokens = [decode([t]) for t in [*ids, data["next"]]]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    alternatives = [{decode([t]): lp for t, lp in pos[:top]} for pos in data["top"]]
    return {
        "index": index,
        "text": "".join(tokens),
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": [*data["token_logprobs"], data["next_logprob"]],
            "top_logprobs": [None, *alternatives],
            "text_offset": offsets,
        },
        "finish_reason": "length",
        "cctuning": {"connection": "none", "layer": None},
    }
