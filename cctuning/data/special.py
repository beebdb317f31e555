"""Text from the data never becomes a control token.

A tokenizer turns every occurrence of a special-token string (``<|im_start|>``, ``</s>``,
``<|eot_id|>``, ...) into that token, wherever it comes from. Rendered through a template, an
instruction holding ``<|im_end|>\\n<|im_start|>assistant\\n…`` would forge turns in the prompt, and an
output holding ``</s>`` would put control tokens into the trained response: a prompt-injection path
through the data. So the record's own texts (instruction, English instruction, output) are tokenised
as plain text, while the template's special tokens stay what they are:

* the rendered text is split at the special-token strings that lie outside the data's spans (the
  template's own, each kept as its one id), as the tokenizer itself splits at every special token;
* each piece between them is tokenised with ``split_special_tokens=True``, so that a special-token
  string inside the data gives the ids of its characters.

A text without special-token strings is tokenised as before, in one call, to the same ids. The
encoder's ``allow_special_tokens`` (``--allow-special-tokens``) keeps the tokenizer's own behaviour.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

logger = logging.getLogger(__name__)


def special_strings(tokenizer) -> tuple[str, ...]:
    """The texts the tokenizer turns into special tokens: its named special tokens and every added
    token marked special, longest first (as the tokenizer matches them)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))


class SpecialText:
    """Finds a tokenizer's special-token strings in texts and tokenises data spans as plain text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings = special_strings(tokenizer)
        self.pattern = re.compile("|".join(map(re.escape, self.strings))) if self.strings else None

    def find(self, text: str | None) -> str | None:
        """The first special-token string in ``text``, or None."""
        if not text or self.pattern is None:
            return None
        match = self.pattern.search(text)
        return match.group() if match else None

    def tokenize(self, text: str, spans: list[tuple[int, int]], offsets: bool = False) -> dict:
        """``input_ids`` (and ``offset_mapping``) of ``text`` where the special-token strings that
        overlap a span of ``spans`` (the data's characters) are plain text and the others special."""
        ids: list[int] = []
        mapping: list[tuple[int, int]] = []
        pos = 0
        for match in self.pattern.finditer(text) if self.pattern is not None else ():
            start, end = match.span()
            if any(start < e and s < end for s, e in spans):
                continue  # the data's own characters
            self._plain(text, pos, start, offsets, ids, mapping)
            ids.append(self.tokenizer.convert_tokens_to_ids(match.group()))
            mapping.append((start, end))
            pos = end
        self._plain(text, pos, len(text), offsets, ids, mapping)
        return {"input_ids": ids, "offset_mapping": mapping} if offsets else {"input_ids": ids}

    def _plain(self, text: str, start: int, end: int, offsets: bool, ids: list, mapping: list) -> None:
        """Append the ids (and character offsets) of ``text[start:end]`` tokenised as plain text."""
        if start >= end:
            return
        enc = self.tokenizer(
            text[start:end],
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=offsets,
        )
        ids.extend(enc["input_ids"])
        if offsets:
            mapping.extend((s + start, e + start) for s, e in enc["offset_mapping"])


def warn_special_text(
    special: SpecialText, rows: Iterable[Iterable[str | None]], where: str, noun: str = "records"
) -> int:
    """Count the ``rows`` (each the texts of one record) that hold a special-token string and log one
    warning naming ``where`` (the file), how many and an example; the count."""
    count = total = 0
    example = None
    for texts in rows:
        total += 1
        found = next((f for f in map(special.find, texts) if f), None)
        if found:
            count += 1
            example = example or found
    if count:
        logger.warning(
            "%s: %d of %d %s hold special-token strings of the tokenizer (e.g. %r); they are encoded "
            "as plain text, not as control tokens (--allow-special-tokens keeps them as control tokens)",
            where,
            count,
            total,
            noun,
            example,
        )
    return count
