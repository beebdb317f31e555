"""One request's run: its sequences in the engine, and the OpenAI-shaped answer, whole or streamed.

Each choice carries the connection that ran and the layer the Decision Maker chose for its prompt
in the extra field ``cctuning``: ``{"connection": "transform", "layer": 3}`` (``layer`` is null
with connection none); a chat answer of a ``--augment bilingual-prompt`` model adds
``"bilingual_prompt"``: whether its prompt held the English (given in ``english``) or fell back to the
non-English prompt alone. Streamed, every chunk of a choice carries it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from cctuning.data.encoding import EncodedPrompt
from cctuning.serve.engine import Engine, QueueFull
from cctuning.serve.protocol import APIError
from cctuning.serve.sequence import Event, Sampling, Sequence

logger = logging.getLogger(__name__)

#: seconds between two checks that a waiting client is still connected
DISCONNECT_POLL_S = 0.5


@dataclass
class Run:
    """A request made into sequences: ``n`` choices of each prompt (choice ``i * n + j`` is choice
    ``j`` of prompt ``i``; with a ``seed``, choice ``j`` is seeded ``seed + j``)."""

    kind: str  # chat | completion
    model: str
    connection: str
    prompts: list[EncodedPrompt]
    english: list[EncodedPrompt | None]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    bilingual: bool | None = None  # a bilingual-prompt model's chat: whether its prompt held the English
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def sequences(self, sink) -> list[Sequence]:
        seqs = []
        for i, (prompt, english) in enumerate(zip(self.prompts, self.english)):
            for j in range(self.n):
                seed = None if self.sampling.seed is None else self.sampling.seed + j
                index = i * self.n + j
                seqs.append(
                    Sequence(
                        prompt,
                        self.connection,
                        replace(self.sampling, seed=seed),
                        lambda event, index=index: sink(index, event),
                        english,
                    )
                )
        return seqs

    # -- OpenAI shapes ------------------------------------------------------------------------
    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def head(self, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def extra(self, layer: int | None) -> dict:
        extra = {"connection": self.connection, "layer": layer}
        if self.bilingual is not None:
            extra["bilingual_prompt"] = self.bilingual
        return {"cctuning": extra}

    def choice(self, index: int, text: str, finish: str | None, layer: int | None, delta: bool = False):
        if self.kind == "completion":
            body = {"text": text, "logprobs": None}
        elif delta:  # the first chunk names the role, the last one has an empty delta
            body = {
                "delta": {"content": text} if text else {} if finish else {"role": "assistant", "content": ""}
            }
        else:
            body = {"message": {"role": "assistant", "content": text}, "logprobs": None}
        return {"index": index, **body, "finish_reason": finish, **self.extra(layer)}

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p.ids) for p in self.prompts) * self.n
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


class Execution:
    """A run's sequences in the engine, and their events as they arrive on the event loop."""

    def __init__(self, engine: Engine, run: Run, request):
        self.run, self.request = run, request
        self.checked = time.monotonic()
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(index: int, event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: nobody listens any more
                pass

        self.sequences = run.sequences(sink)
        try:
            engine.submit(self.sequences)
        except QueueFull as err:
            raise APIError(
                503, str(err), "server_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled = True

    async def next_event(self) -> tuple[int, Event] | None:
        """The next event; None when the client has gone (the sequences are then cancelled). Whether
        it has gone is asked at least every ``DISCONNECT_POLL_S`` seconds, also while events flow."""
        while True:
            if time.monotonic() - self.checked > DISCONNECT_POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.cancel()
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    async def answer(self) -> dict | None:
        """The whole answer (None: the client went away)."""
        run = self.run
        texts = [""] * len(self.sequences)
        layers: list[int | None] = [None] * len(self.sequences)
        finish: list[str | None] = [None] * len(self.sequences)
        tokens = 0
        while any(f is None for f in finish):
            got = await self.next_event()
            if got is None:
                return None
            index, event = got
            if event.kind == "error":
                self.cancel()
                raise APIError(500, event.text, "server_error")
            if event.kind == "start":
                layers[index] = event.layer
            elif event.kind == "text":
                texts[index] += event.text
            elif event.kind == "end":
                finish[index], tokens = event.finish_reason, tokens + event.tokens
        choices = [run.choice(i, texts[i], finish[i], layers[i]) for i in range(len(texts))]
        return {**run.head(), "choices": choices, "usage": run.usage(tokens)}

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, a last one per choice with its
        ``finish_reason``, the usage (with ``stream_options.include_usage``), then ``[DONE]``."""
        run = self.run
        layers: dict[int, int | None] = {}
        left, tokens = len(self.sequences), 0
        try:
            while left:
                got = await self.next_event()
                if got is None:
                    return
                index, event = got
                if event.kind == "error":
                    yield sse(APIError(500, event.text, "server_error").body())
                    return
                if event.kind == "start":
                    layers[index] = event.layer
                    if run.kind == "chat":
                        yield sse(
                            {**run.head(True), "choices": [run.choice(index, "", None, event.layer, True)]}
                        )
                    continue
                finish = event.finish_reason if event.kind == "end" else None
                left -= event.kind == "end"
                tokens += event.tokens
                piece = run.choice(index, event.text, finish, layers.get(index), True)
                yield sse({**run.head(True), "choices": [piece]})
            if run.include_usage:
                yield sse({**run.head(True), "choices": [], "usage": run.usage(tokens)})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that went away frees its rows at the engine's next step


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
