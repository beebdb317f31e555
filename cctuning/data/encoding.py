"""Render a record through the chat template, tokenise it and find the connection position p.

Rules (docs/method.md §2.2-2.3, with the official code's bugs fixed):

* The prompt is rendered by the tokenizer's own chat template with ``add_generation_prompt=True``
  (mode ``chat``), or by a documented plain format for base models without one (mode ``plain``):
  ``{bos}{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n`` with ``{output}{eos}``
  as the response. ``auto`` picks ``chat`` when the tokenizer has a template.
* No token id is hard-coded. p is found from the length of the tokenised prompt:
  ``p = len(prompt_ids) - 1 - position_offset``; with offset 0 this is the last prompt token, the
  one that predicts the first response token. The English prompt-only stream uses the same rule.
* Labels cover the response only (the response tokens are the continuation of the prompt tokens
  in the tokenisation of prompt + response, as TRL checks; if a tokenizer merges across the
  boundary the response is tokenised on its own instead, so the prompt ids stay those seen at
  inference).
* Truncation never cuts the prompt tail that holds p: the response is cut first (keeping at least
  one token), then tokens from the *start of the instruction*. The English prompt is truncated to
  ``max_length`` on its own (official bug §2.7.5). Every cut is counted.
* Memory stays bounded for any record size: with a token budget, a text longer than
  ``CHARS_PER_TOKEN`` characters per token of budget is cut at the character level *before* it
  reaches the template and the tokenizer, keeping the side the token cut keeps (the instruction's
  tail, the response's head). The result must still exceed the budget by ``PRECUT_MARGIN`` tokens,
  so that the ragged edge of the character cut is among the tokens dropped anyway; otherwise the
  cut is redone with more characters. The ids are those of the uncut text; the token counts of such
  cuts are lower bounds, and the characters cut first are counted apart (``precut_chars``).
* The record's texts never become control tokens: a special-token string of the tokenizer inside an
  instruction or an output is tokenised as plain text, the template's own special tokens stay special
  (:mod:`cctuning.data.special`); ``allow_special_tokens`` keeps the tokenizer's own behaviour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cctuning.data.special import SpecialText, warn_special_text
from cctuning.errors import CCError, DataError

logger = logging.getLogger(__name__)

PLAIN_HEAD = "### Instruction:\n"
PLAIN_TAIL = "\n\n### Response:\n"
_PLACEHOLDER = "\u2063CCTUNING_INSTRUCTION\u2063"
IGNORE_INDEX = -100
#: characters handed to the tokenizer per token of budget (a token rarely spans more than ~16)
CHARS_PER_TOKEN = 32
#: tokens beyond the budget that a text cut at the character level must still give
PRECUT_MARGIN = 16


def precut(text: str, budget: int | None, scale: int, keep: str) -> tuple[str, int]:
    """``text`` cut to ``budget * CHARS_PER_TOKEN * scale`` characters, keeping its ``head`` or its
    ``tail``, and the number of characters cut (0 when it fits or there is no budget)."""
    if budget is None:
        return text, 0
    room = max(budget, 1) * CHARS_PER_TOKEN * scale
    if len(text) <= room:
        return text, 0
    return (text[:room] if keep == "head" else text[-room:]), len(text) - room


class EncodingError(CCError):
    """A record that cannot be encoded, with the field at fault (the caller adds file and line)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"field '{field}': {reason}")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered; saved with a trained model so inference renders them the same way."""

    mode: str = "auto"  # auto | chat | plain
    system_prompt: str | None = None
    position_offset: int = 0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "system_prompt": self.system_prompt,
            "position_offset": self.position_offset,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        return cls(**{k: data[k] for k in ("mode", "system_prompt", "position_offset") if k in data})


@dataclass
class EncodedPrompt:
    ids: list[int]
    position: int
    instruction_cut: int = 0
    precut_chars: int = 0


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    position: int
    en_input_ids: list[int] | None = None
    en_position: int | None = None
    response_cut: int = 0
    instruction_cut: int = 0
    en_instruction_cut: int = 0
    precut_chars: int = 0

    def features(self) -> dict:
        out = {"input_ids": self.input_ids, "labels": self.labels, "cc_position": self.position}
        if self.en_input_ids is not None:
            out["en_input_ids"] = self.en_input_ids
            out["en_cc_position"] = self.en_position
        return out


@dataclass
class TruncationStats:
    examples: int = 0
    response_cut_examples: int = 0
    response_cut_tokens: int = 0
    instruction_cut_examples: int = 0
    instruction_cut_tokens: int = 0
    en_instruction_cut_examples: int = 0
    en_instruction_cut_tokens: int = 0
    boundary_merges: int = 0
    precut_examples: int = 0
    precut_chars: int = 0

    def add(self, ex: EncodedExample) -> None:
        self.examples += 1
        self.precut_examples += ex.precut_chars > 0
        self.precut_chars += ex.precut_chars
        self.response_cut_examples += ex.response_cut > 0
        self.response_cut_tokens += ex.response_cut
        self.instruction_cut_examples += ex.instruction_cut > 0
        self.instruction_cut_tokens += ex.instruction_cut
        self.en_instruction_cut_examples += ex.en_instruction_cut > 0
        self.en_instruction_cut_tokens += ex.en_instruction_cut

    def summary(self) -> str:
        return (
            f"{self.examples} examples; responses cut in {self.response_cut_examples} "
            f"({self.response_cut_tokens} tokens), instructions cut in {self.instruction_cut_examples} "
            f"({self.instruction_cut_tokens} tokens), English prompts cut in "
            f"{self.en_instruction_cut_examples} ({self.en_instruction_cut_tokens} tokens)"
            + (
                f"; {self.precut_examples} over-long records cut by {self.precut_chars} characters "
                "before tokenising"
                if self.precut_examples
                else ""
            )
        )


class PromptEncoder:
    """Turns instructions (and responses) into token ids with the connection position."""

    def __init__(
        self,
        tokenizer,
        fmt: PromptFormat | None = None,
        max_length: int | None = None,
        allow_special_tokens: bool = False,
    ):
        self.tokenizer = tokenizer
        self.format = fmt or PromptFormat()
        self.max_length = max_length
        self.allow_special_tokens = allow_special_tokens
        self.special = SpecialText(tokenizer)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        mode = self.format.mode
        if mode == "auto":
            mode = "chat" if has_template else "plain"
        if mode not in ("chat", "plain"):
            raise CCError(f"unknown prompt template mode '{self.format.mode}' (use auto, chat or plain)")
        if mode == "chat" and not has_template:
            raise CCError(
                "the tokenizer has no chat template; use --template plain (the documented fallback) "
                "or a tokenizer that has one"
            )
        self.mode = mode
        if self.format.position_offset < 0:
            raise CCError("position_offset must be >= 0 (it counts tokens back from the last prompt token)")
        self.stats = TruncationStats()

    # -- rendering ---------------------------------------------------------------------------
    def _messages(self, instruction: str) -> list[dict]:
        msgs = []
        if self.format.system_prompt:
            msgs.append({"role": "system", "content": self.format.system_prompt})
        msgs.append({"role": "user", "content": instruction})
        return msgs

    def _chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as err:  # a template that raises is the user's template, not our bug
            raise CCError(f"the tokenizer's chat template failed: {err}") from None
        return text if isinstance(text, str) else text[0]

    def render_prompt(self, instruction: str) -> tuple[str, tuple[int, int] | None]:
        """The prompt text and the character span of the instruction inside it (None if unknown)."""
        if self.mode == "plain":
            tok = self.tokenizer
            head = (tok.bos_token or "") + (
                f"{self.format.system_prompt}\n\n" if self.format.system_prompt else ""
            )
            head += PLAIN_HEAD
            return head + instruction + PLAIN_TAIL, (len(head), len(head) + len(instruction))
        text = self._chat(self._messages(instruction), True)
        marked = self._chat(self._messages(_PLACEHOLDER), True)
        start = marked.find(_PLACEHOLDER)
        if start < 0 or marked.count(_PLACEHOLDER) != 1:
            return text, None
        head, tail = marked[:start], marked[start + len(_PLACEHOLDER) :]
        if not (text.startswith(head) and text.endswith(tail)) or len(head) + len(tail) > len(text):
            return text, None
        return text, (len(head), len(text) - len(tail))

    def render_completion(self, instruction: str, output: str, prompt_text: str) -> str:
        """The text that follows the prompt in a full conversation: the response and end of turn."""
        eos = self.tokenizer.eos_token or ""
        if self.mode == "plain":
            return output + eos
        msgs = self._messages(instruction) + [{"role": "assistant", "content": output}]
        full = self._chat(msgs, False)
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        if not getattr(self, "_warned_prefix", False):
            logger.warning(
                "the chat template renders the prompt differently with and without an answer; "
                "using '<output><eos>' as the response"
            )
            self._warned_prefix = True
        return output + eos

    # -- tokenising --------------------------------------------------------------------------
    def _tokenize(self, text: str, offsets: bool = False, spans: list[tuple[int, int]] | None = None):
        """Token ids (and offsets) of a rendered ``text``; ``spans``: the characters of the record's
        texts that hold special-token strings, tokenised as plain text (:meth:`_data_spans`)."""
        if spans:
            return self.special.tokenize(text, spans, offsets)
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)

    def _data_spans(
        self, text: str, field: str, span: tuple[int, int] | None = None, last: bool = True
    ) -> list[tuple[int, int]]:
        """``[span]`` of the record's text ``field`` inside the rendered ``text`` when ``field`` holds a
        special-token string (found, when ``span`` is None, as the ``last`` or the first occurrence);
        none when it holds none or special tokens are allowed."""
        if self.allow_special_tokens or self.special.find(field) is None:
            return []
        if span is None:
            start = text.rfind(field) if last else text.find(field)
            if start < 0:
                raise CCError(
                    "the chat template changes the text, so its special-token strings cannot be kept as "
                    "plain text; remove them, or pass --allow-special-tokens to encode them as control tokens"
                )
            span = (start, start + len(field))
        return [span]

    def encode_prompt(self, instruction: str, max_length: int | None = None) -> EncodedPrompt:
        """Tokenise a prompt; cut tokens from the start of the instruction to fit ``max_length``
        (a huge instruction is cut at the character level first: see the module's rules)."""
        scale = 1
        while True:
            part, chars = precut(instruction, max_length, scale, keep="tail")
            prompt = self._encode_prompt(part, max_length)
            if not chars or prompt.instruction_cut >= PRECUT_MARGIN:
                prompt.precut_chars = chars
                return prompt
            scale *= 8  # the characters kept gave too few tokens: keep more

    def _encode_prompt(self, instruction: str, max_length: int | None) -> EncodedPrompt:
        text, span = self.render_prompt(instruction)
        spans = self._data_spans(text, instruction, span)
        enc = self._tokenize(text, offsets=span is not None and max_length is not None, spans=spans)
        ids = list(enc["input_ids"])
        cut = 0
        if max_length is not None and len(ids) > max_length:
            excess = len(ids) - max_length
            inside = []
            if span is not None:
                inside = [
                    i for i, (s, e) in enumerate(enc["offset_mapping"]) if span[0] <= s < span[1] and e > s
                ]
            if len(inside) < excess:
                raise CCError(
                    f"the prompt template alone needs {len(ids) - len(inside)} tokens, more than "
                    f"max_length={max_length} allows; raise --max-length"
                )
            drop = set(inside[:excess])
            ids = [t for i, t in enumerate(ids) if i not in drop]
            cut = excess
        position = len(ids) - 1 - self.format.position_offset
        if position < 0:
            raise CCError(
                f"position_offset={self.format.position_offset} is beyond the start of a {len(ids)}-token prompt"
            )
        return EncodedPrompt(ids=ids, position=position, instruction_cut=cut)

    def _completion_ids(
        self, instruction: str, output: str, text: str, spans: list[tuple[int, int]], full_prompt: list[int]
    ) -> list[int]:
        """The response's ids after the prompt ``text`` (tokenised as ``full_prompt``, the record's
        special-token strings in ``spans``): the continuation of the prompt's ids in the tokenisation of
        prompt + response, or the response tokenised alone where the two merge across the boundary."""
        completion_text = self.render_completion(instruction, output, text)
        output_spans = self._data_spans(completion_text, output, last=False)
        shifted = [(s + len(text), e + len(text)) for s, e in output_spans]
        joint = list(self._tokenize(text + completion_text, spans=spans + shifted)["input_ids"])
        if joint[: len(full_prompt)] == full_prompt:
            return joint[len(full_prompt) :]
        self.stats.boundary_merges += 1
        return list(self._tokenize(completion_text, spans=output_spans)["input_ids"])

    def encode_example(
        self, instruction: str, output: str, instruction_en: str | None = None
    ) -> EncodedExample:
        """One training example: prompt + response with response-only labels, and the English prompt."""
        scale = 1
        while (ex := self._encode_example(instruction, output, instruction_en, scale)) is None:
            scale *= 8  # a character cut kept too few tokens: keep more
        self.stats.add(ex)
        return ex

    def _encode_example(
        self, instruction: str, output: str, instruction_en: str | None, scale: int
    ) -> EncodedExample | None:
        """:meth:`encode_example` with texts cut to ``scale`` times the character bound; None when a
        character cut left too few tokens to be sure it changed nothing."""
        limit = self.max_length
        whole_instruction = instruction
        instruction, instruction_chars = precut(instruction, limit, scale, keep="tail")
        output, output_chars = precut(output, limit, scale, keep="head")
        text, span = self.render_prompt(instruction)
        spans = self._data_spans(text, instruction, span)
        full_prompt = list(self._tokenize(text, spans=spans)["input_ids"])
        if instruction_chars and len(full_prompt) < limit + PRECUT_MARGIN:
            return None
        completion = self._completion_ids(instruction, output, text, spans, full_prompt)
        if not completion:
            raise EncodingError("output", "the response tokenises to nothing")
        if output_chars and len(completion) < limit + PRECUT_MARGIN:
            return None
        response_cut = 0
        if limit is not None and len(full_prompt) + len(completion) > limit:
            keep = max(limit - len(full_prompt), 1)
            response_cut = len(completion) - keep
            completion = completion[:keep]
            prompt = self.encode_prompt(whole_instruction, limit - keep)
        else:
            prompt = EncodedPrompt(
                ids=full_prompt, position=len(full_prompt) - 1 - self.format.position_offset
            )
            if prompt.position < 0:
                prompt = self.encode_prompt(whole_instruction)  # raises the clear error
        ex = EncodedExample(
            input_ids=prompt.ids + completion,
            labels=[IGNORE_INDEX] * len(prompt.ids) + completion,
            position=prompt.position,
            response_cut=response_cut,
            instruction_cut=prompt.instruction_cut,
            precut_chars=prompt.precut_chars + output_chars,
        )
        if instruction_en is not None:
            try:
                en = self.encode_prompt(instruction_en, limit)
            except CCError as err:
                raise EncodingError("instruction_en", str(err)) from None
            ex.en_input_ids, ex.en_position, ex.en_instruction_cut = en.ids, en.position, en.instruction_cut
            ex.precut_chars += en.precut_chars
        return ex


def encode_example(encoder: PromptEncoder, rec, with_english: bool) -> EncodedExample:
    """Tokenise one record; an encoding problem is reported with the record's file, line and field."""
    try:
        return encoder.encode_example(
            rec.instruction, rec.output, rec.instruction_en if with_english else None
        )
    except EncodingError as err:
        raise _record_error(rec, err.field, err.reason) from None
    except CCError as err:
        raise _record_error(rec, "instruction", str(err)) from None


def _record_error(rec, field: str, reason: str) -> DataError:
    """The error about a field of ``rec``, named as in its file (line or row, the data's own field
    name) when ``rec`` is a loaded :class:`~cctuning.data.records.Record`."""
    if hasattr(rec, "error"):
        return rec.error(field, reason)
    return DataError(rec.path, rec.line, field, reason)


def encode_records(records, encoder: PromptEncoder, with_english: bool) -> list[dict]:
    """Tokenise every record (:func:`encode_example`) into training features."""
    return [encode_example(encoder, rec, with_english).features() for rec in records]


def warn_special_records(
    encoder: PromptEncoder,
    records,
    where,
    fields: tuple[str, ...] = ("instruction", "output", "instruction_en"),
) -> int:
    """One warning for the records of file ``where`` whose ``fields`` hold special-token strings of the
    encoder's tokenizer (encoded as plain text); their count (0 with ``allow_special_tokens``)."""
    if encoder.allow_special_tokens:
        return 0
    rows = ([getattr(rec, f, None) for f in fields] for rec in records)
    return warn_special_text(encoder.special, rows, str(where))
