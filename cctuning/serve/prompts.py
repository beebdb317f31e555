"""The prompts of a request, tokenised with p, the connection position.

* **Chat** (``messages``): the conversation is checked as a training record in the ``messages``
  format is (:mod:`cctuning.data.formats`): an optional system turn and one user turn. A
  multi-turn conversation is refused with the reason training data gets: CC-Tuning connects the
  prompt at one position, its last token. The system turn must be the model's system prompt (the
  one it was trained with), as for ``cctuning generate``. The user turn is rendered by
  :class:`~cctuning.data.encoding.PromptEncoder`, exactly as training rendered it, so p is the same
  token; special-token strings in it stay plain text (``--allow-special-tokens`` keeps them as
  control tokens). ``content`` may be a string or a list of text parts, joined.
* **Completions** (``prompt``): the text as it is, no template: a string, a list of strings, a list
  of token ids or a list of such lists. A string is tokenised as lm-eval's ``hf`` model and
  ``cctuning lm-eval`` do: with the tokenizer's special tokens (e.g. BOS) unless it already starts
  with the BOS text; special-token strings in it are control tokens (the client rendered it). p is
  its last token (minus the model's ``position_offset``).
* A prompt that with ``max_tokens`` does not fit the model's context is refused
  (``context_length_exceeded``), never cut.
"""

from __future__ import annotations

from cctuning.data.encoding import EncodedPrompt
from cctuning.data.formats import Converter
from cctuning.data.records import system_prompt_of, validate_record
from cctuning.errors import CCError, DataError
from cctuning.serve.protocol import APIError, Served, bad


def _text_of(content, index: int):
    """A message's content: a string, or the text of a list of ``{"type": "text", "text": ...}`` parts."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise bad("messages", f"message {index}: only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def chat_instruction(served: Served, messages) -> str:
    """The user turn of ``messages``, checked as a training record's conversation."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty array of messages")
    plain = [
        {**m, "content": _text_of(m.get("content"), i)} if isinstance(m, dict) else m
        for i, m in enumerate(messages, start=1)
    ]
    try:
        conv = Converter("messages", (), "request").convert({"messages": plain}, None, None, False, False)
        if conv.value.get("output") is not None:
            raise bad("messages", "the last message must be the user's: the server writes the assistant turn")
        value = {**conv.value, "output": None}
        record = validate_record(value, "request", None, False, False, names=conv.names, system=conv.system)
        system_prompt_of([record], served.model.cc_config.prompt_format.system_prompt, model=True)
    except DataError as err:
        raise bad("messages", f"messages: {err.reason}") from None
    return record.instruction


def encode_chat(served: Served, text: str, max_tokens: int, param: str) -> EncodedPrompt:
    """``text`` as a user turn rendered by the model's prompt format; refused when it does not fit."""
    gen = served.generator
    limit = gen.context_length
    budget = _budget(limit, max_tokens)
    try:
        prompt = gen.encoder.encode_prompt(text, budget)
    except CCError as err:
        raise bad(param, str(err)) from None
    if prompt.instruction_cut or prompt.precut_chars:
        raise _too_long(
            param, len(prompt.ids) + prompt.instruction_cut, max_tokens, limit, prompt.precut_chars
        )
    return prompt


def completion_prompts(served: Served, body: dict, max_tokens: int) -> list[EncodedPrompt]:
    """The prompts of a completion request (``prompt``: see the module docstring)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad(
            "prompt", "'prompt' must be a string, an array of strings, of token ids or of arrays of token ids"
        )
    return [raw_prompt(served, p, max_tokens, "prompt") for p in prompt]


def raw_prompt(served: Served, prompt, max_tokens: int, param: str) -> EncodedPrompt:
    """One completion prompt (a string or token ids) as it is, with p its last token."""
    tokenizer = served.tokenizer
    if isinstance(prompt, str):
        if not prompt:
            raise bad(param, f"'{param}' is empty")
        bos = tokenizer.bos_token
        ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    elif isinstance(prompt, list) and prompt and _is_ids(prompt):
        vocab = served.model.arch.embeddings.weight.shape[0]
        if not all(0 <= t < vocab for t in prompt):
            raise bad(param, f"'{param}' holds token ids outside the vocabulary (0 to {vocab - 1})")
        ids = list(prompt)
    else:
        raise bad(param, f"'{param}' must be a non-empty string or array of token ids")
    limit = served.generator.context_length
    if limit is not None and len(ids) + max_tokens > limit:
        raise _too_long(param, len(ids), max_tokens, limit)
    position = len(ids) - 1 - served.model.cc_config.prompt_format.position_offset
    if position < 0:
        raise bad(param, f"the model's position_offset is beyond the start of a {len(ids)}-token prompt")
    return EncodedPrompt(ids=ids, position=position)


def _is_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _budget(limit: int | None, max_tokens: int) -> int | None:
    if limit is None:
        return None
    if limit - max_tokens < 1:
        raise bad(
            "max_tokens",
            f"max_tokens={max_tokens} leaves no room for a prompt in the model's context of {limit} tokens",
            "context_length_exceeded",
        )
    return limit - max_tokens


def _too_long(param: str, tokens: int, max_tokens: int, limit: int, precut: int = 0) -> APIError:
    count = f"at least {tokens}" if precut else str(tokens)
    return bad(
        param,
        f"this model's context is {limit} tokens: the {param} has {count} tokens and max_tokens asks for "
        f"{max_tokens} more; shorten the {param} or lower max_tokens",
        "context_length_exceeded",
    )
