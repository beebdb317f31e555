"""Load and validate CC-Tuning training records.

The official format (method.md §3.2): JSON or JSONL records with ``instruction`` (non-English),
``output`` (its non-English response), ``instruction_en`` (the English translation of the
instruction only) and an optional ``lang``. Every record is checked before any training starts;
the first bad one stops the run with ``file:line: field 'x': what is wrong``. With
``skip_invalid`` bad records are skipped instead and counted, never silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cctuning.errors import DataError

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "output")
ENGLISH_FIELD = "instruction_en"
OPTIONAL_FIELDS = ("lang",)


@dataclass(frozen=True)
class Record:
    instruction: str
    output: str | None
    instruction_en: str | None = None
    lang: str | None = None
    path: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: int = 0
    first_errors: list[str] | None = None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _decode_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(str(path), line, None, f"invalid UTF-8 (byte {err.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_json_value(path: Path, text: str, start: int, line: int, line_base: int) -> tuple[object, int]:
    """Decode one JSON value; ``line`` names the record, ``line_base`` maps ``text`` lines to file lines."""
    try:
        return _decoder.raw_decode(text, start)
    except _DuplicateKey as err:
        raise DataError(str(path), line, err.key, "duplicate key") from None
    except json.JSONDecodeError as err:
        raise DataError(str(path), line_base + err.lineno, None, f"malformed JSON: {err.msg}") from None


def _iter_raw(path: Path):
    """Yield ``(line, value)`` for each record of a JSON array or a JSONL file."""
    text = _decode_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("["):
        if not stripped.startswith("["):
            raise DataError(str(path), 1, None, "a .json data file must hold a JSON array of records")
        pos = text.index("[") + 1
        ws = " \t\n"
        while True:
            while pos < len(text) and text[pos] in ws:
                pos += 1
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            line = text.count("\n", 0, pos) + 1
            value, pos = _parse_json_value(path, text, pos, line, 0)
            yield line, value
            while pos < len(text) and text[pos] in ws:
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] == "]":
                pos += 1
                break
            else:
                line = text.count("\n", 0, pos) + 1
                raise DataError(str(path), line, None, "malformed JSON: expected ',' or ']' between records")
        if text[pos:].strip():
            raise DataError(str(path), text.count("\n", 0, pos) + 1, None, "extra data after the JSON array")
        return
    for number, line_text in enumerate(text.split("\n"), start=1):
        if not line_text.strip():
            continue
        value, end = _parse_json_value(path, line_text, 0, number, number - 1)
        if line_text[end:].strip():
            raise DataError(str(path), number, None, "malformed JSON: extra data after the record")
        yield number, value


def validate_record(
    value: object, path: str, line: int, require_english: bool, output_required: bool = True
) -> Record:
    """Check one decoded record and turn it into a :class:`Record` (or raise :class:`DataError`)."""
    if not isinstance(value, dict):
        raise DataError(path, line, None, f"a record must be a JSON object, got {type(value).__name__}")
    required = REQUIRED_FIELDS if output_required else ("instruction",)
    fields = required + ((ENGLISH_FIELD,) if require_english else ())
    for name in fields:
        if name not in value:
            raise DataError(path, line, name, "missing")
    optional = tuple(f for f in REQUIRED_FIELDS + (ENGLISH_FIELD,) + OPTIONAL_FIELDS if f not in fields)
    for name in fields + optional:
        if name not in value or (name not in fields and value[name] is None):
            continue
        item = value[name]
        if not isinstance(item, str):
            raise DataError(path, line, name, f"must be a string, got {type(item).__name__}")
        if not item.strip():
            raise DataError(path, line, name, "empty")
    english = value.get(ENGLISH_FIELD)
    return Record(
        instruction=value["instruction"],
        output=value["output"],
        instruction_en=english if isinstance(english, str) else None,
        lang=value.get("lang"),
        path=path,
        line=line,
    )


def load_prompts(path: str | Path, require_english: bool = False) -> list[Record]:
    """Inference inputs: records with ``instruction`` (``output`` optional: the gold response,
    ``instruction_en`` needed for the English oracle). Same validation and errors as training data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    records = []
    for line, value in _iter_raw(path):
        if isinstance(value, dict) and "output" not in value:
            value = {**value, "output": None}
        records.append(validate_record(value, str(path), line, require_english, output_required=False))
    if not records:
        raise DataError(str(path), None, None, "no records")
    return records


def load_records(
    path: str | Path,
    require_english: bool = True,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list[Record]:
    """Read every record of ``path`` (``.json`` array or ``.jsonl``), validated.

    ``require_english`` is True for CC-Tuning and False for plain SFT. With ``skip_invalid`` a
    bad record is skipped and counted in ``report`` (a malformed file still stops the load).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    report = report if report is not None else LoadReport()
    report.first_errors = report.first_errors or []
    records: list[Record] = []
    for line, value in _iter_raw(path):
        try:
            records.append(validate_record(value, str(path), line, require_english))
        except DataError as err:
            if not skip_invalid:
                raise
            report.skipped += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(str(err))
    if not records:
        raise DataError(str(path), None, None, "no valid records")
    report.loaded = len(records)
    if report.skipped:
        logger.warning("%s: skipped %d invalid records (first: %s)", path, report.skipped, report.first_errors[0])
    return records
