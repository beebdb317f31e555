"""Data-level baselines that use exactly CC-Tuning's parallel information (``--augment``; the record
layouts: docs/data.md, "Augmented records").

CC-Tuning's only information beyond plain SFT is each record's ``instruction_en``. These modes give
it to SFT (or to CC-Tuning too) at the data level instead of through the connection:

* ``none``: the records as they are.
* ``english-prompt``: every non-English record also appears as (English instruction → the same
  non-English response), right after it: cross-lingual instruction data, twice the examples of a
  data set without English records.
* ``bilingual-prompt``: every non-English record's prompt carries its English instruction and then
  its own, separated by :data:`BILINGUAL_SEPARATOR` (:func:`bilingual_instruction`); the number of
  examples is unchanged. At inference the English is given where it is at hand
  (:func:`inference_instruction`, the one place that builds the prompt of such a model).

A record counts as English (it is left as it is, and never needs ``instruction_en``) when its
``lang`` is ``en`` (or ``en-*``, any case) or its instruction equals its ``instruction_en``. With
``--method cc`` the English pass of every example reads the record's ``instruction_en`` alone: for
an ``english-prompt`` copy that is its own prompt, for a ``bilingual-prompt`` record the English
half of its prompt.
"""

from __future__ import annotations

import dataclasses
import logging

from cctuning.data.records import ENGLISH_FIELD, Record
from cctuning.errors import CCError

logger = logging.getLogger(__name__)

AUGMENTS = ("none", "english-prompt", "bilingual-prompt")
#: between the English and the non-English instruction of a bilingual prompt: one blank line
BILINGUAL_SEPARATOR = "\n\n"


def check_augment(mode: str) -> str:
    """``mode`` when it is one of :data:`AUGMENTS`, else a one-line error."""
    if mode not in AUGMENTS:
        raise CCError(f"--augment: unknown mode {mode!r} (use {', '.join(AUGMENTS)})")
    return mode


def is_english(instruction: str, instruction_en: str | None, lang: str | None = None) -> bool:
    """Whether a record or prompt is English: ``lang`` ``en`` or ``en-*`` (any case, ``_`` as ``-``),
    or an instruction equal to its English translation."""
    tag = (lang or "").strip().lower().replace("_", "-")
    return (
        tag == "en" or tag.startswith("en-") or (instruction_en is not None and instruction == instruction_en)
    )


def bilingual_instruction(instruction: str, instruction_en: str) -> str:
    """The instruction of a bilingual prompt: the English instruction, a blank line, then the
    non-English one (``"Good morning?\\n\\nHabari ya asubuhi?"``)."""
    return f"{instruction_en}{BILINGUAL_SEPARATOR}{instruction}"


def _english_copy(rec: Record) -> Record:
    """(English instruction → the record's response); an error about its instruction names the
    data's ``instruction_en`` field, where that text came from."""
    names = dict(rec.names or {})
    names["instruction"] = names.get(ENGLISH_FIELD, ENGLISH_FIELD)
    return dataclasses.replace(rec, instruction=rec.instruction_en, names=names)


def augment_records(records: list[Record], mode: str) -> list[Record]:
    """The records the trainer sees under ``--augment mode`` (see the module docstring and
    docs/data.md). A non-English record without ``instruction_en`` is a one-line error naming its
    file, line and field. Logs how many examples the mode made of how many records."""
    check_augment(mode)
    if mode == "none":
        return list(records)
    out: list[Record] = []
    english = 0
    for rec in records:
        if is_english(rec.instruction, rec.instruction_en, rec.lang):
            english += 1
            out.append(rec)
            continue
        if not rec.instruction_en:
            raise rec.error(
                ENGLISH_FIELD,
                f"missing: --augment {mode} needs the English instruction of every non-English record",
            )
        if mode == "english-prompt":
            out += [rec, _english_copy(rec)]
        else:
            out.append(
                dataclasses.replace(
                    rec, instruction=bilingual_instruction(rec.instruction, rec.instruction_en)
                )
            )
    logger.info(
        "--augment %s: %d records (%d English, left as they are) -> %d training examples",
        mode,
        len(records),
        english,
        len(out),
    )
    return out


def inference_instruction(
    instruction: str, english: str | None, augment: str, lang: str | None = None
) -> str:
    """The instruction a model trained with ``--augment augment`` is prompted with: for
    ``bilingual-prompt``, :func:`bilingual_instruction` when the English ``english`` is given and the
    prompt is not English itself (``lang``: see :func:`is_english`); otherwise ``instruction`` alone
    (``english-prompt`` and ``none`` models were trained on the non-English prompt)."""
    if augment == "bilingual-prompt" and english and not is_english(instruction, english, lang):
        return bilingual_instruction(instruction, english)
    return instruction


def needs_english(instruction: str, english: str | None, augment: str, lang: str | None = None) -> bool:
    """Whether a ``bilingual-prompt`` model falls back to the non-English prompt alone for this prompt:
    it is not English and its English is not given."""
    return augment == "bilingual-prompt" and not english and not is_english(instruction, english, lang)


def inference_instructions(
    instructions: list[str],
    english: list[str | None] | None,
    augment: str,
    where: str,
    langs: list[str | None] | None = None,
) -> tuple[list[str], int]:
    """:func:`inference_instruction` of every prompt (``english``: the English of each, None where it
    is not at hand or withheld; ``langs``: each one's language, or None) and how many fell back to the
    non-English prompt alone, which one warning names (``where``: the file or command)."""
    english = english if english is not None else [None] * len(instructions)
    langs = langs if langs is not None else [None] * len(instructions)
    rows = list(zip(instructions, english, langs))
    fallbacks = sum(needs_english(i, e, augment, lang) for i, e, lang in rows)
    warn_without_english(where, fallbacks, len(rows))
    return [inference_instruction(i, e, augment, lang) for i, e, lang in rows], fallbacks


def warn_without_english(where: str, fallbacks: int, total: int) -> None:
    """The one warning that ``fallbacks`` of ``total`` prompts of a ``bilingual-prompt`` model went
    without their English (none when there are none)."""
    if fallbacks:
        logger.warning(
            "%s: %d of %d prompts have no English instruction at hand, so they get the non-English prompt "
            "alone (the model was trained with --augment bilingual-prompt: English, then non-English)",
            where,
            fallbacks,
            total,
        )


def inference_records(
    records: list[Record], augment: str, where: str, withhold_english: bool = False
) -> tuple[list[Record], int]:
    """``records`` with the instruction a model trained with ``augment`` is prompted with
    (:func:`inference_instructions`; ``withhold_english``: as if no record had its English), and the
    count that fell back. ``instruction_en`` is kept (the English pass of ``--connection english``)."""
    if augment != "bilingual-prompt":  # prompted with the instruction alone
        return list(records), 0
    english = None if withhold_english else [r.instruction_en for r in records]
    texts, fallbacks = inference_instructions(
        [r.instruction for r in records], english, augment, where, [r.lang for r in records]
    )
    return [dataclasses.replace(r, instruction=t) for r, t in zip(records, texts)], fallbacks


def prompt_report(augment: str, withhold_english: bool, fallbacks: int) -> dict:
    """What an output records of how it prompted: the model's ``augment`` and, for
    ``bilingual-prompt``, whether the English was withheld and how many prompts went without it."""
    out: dict = {"augment": augment}
    if augment == "bilingual-prompt":
        out.update(english_withheld=withhold_english, prompts_without_english=fallbacks)
    return out


def augmented_context(
    context: str, instruction: str, english: str | None, augment: str, lang: str | None = None
) -> tuple[str, bool]:
    """A prompt already rendered (lm-eval's context) with its last occurrence of ``instruction`` made
    :func:`inference_instruction`'s, and whether it fell back to the non-English prompt alone (no
    English given, or ``instruction`` not in ``context``)."""
    prompt = inference_instruction(instruction, english, augment, lang)
    at = context.rfind(instruction) if instruction else -1
    if prompt == instruction or at < 0:
        return context, needs_english(instruction, english, augment, lang) or (prompt != instruction)
    return context[:at] + prompt + context[at + len(instruction) :], False
