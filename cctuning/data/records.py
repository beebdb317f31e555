"""Load and validate CC-Tuning training records.

The official format (docs/method.md §3.2): JSON or JSONL records with ``instruction`` (non-English),
``output`` (its non-English response), ``instruction_en`` (the English translation of the
instruction only) and an optional ``lang``. Every record is checked before any training starts;
the first bad one stops the run with ``file:line: field 'x': what is wrong``. With
``skip_invalid`` bad records are skipped instead and counted, never silently.

A JSONL file is read line by line (bytes), so a line that is not UTF-8 or not JSON is one bad
record like any other; a JSON array is one document, so a syntax error in it stops the load even
with ``skip_invalid``. A UTF-8 BOM (also at the start of a later line, as left by concatenating
files), CRLF or CR line ends, blank lines and indentation are accepted.
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
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # always one record a line; .json is an array; others are sniffed


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


def _decode_text(path: Path, raw: bytes) -> str:
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
    except RecursionError:
        raise DataError(str(path), line, None, "malformed JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer literal longer than Python converts
        raise DataError(str(path), line, None, f"malformed JSON: {str(err).splitlines()[0]}") from None


_JSON_TYPE_NAMES = {
    "dict": "object",
    "list": "array",
    "NoneType": "null",
    "bool": "boolean",
    "int": "number",
    "float": "number",
}


def _json_type(value: object) -> str:
    name = type(value).__name__
    return _JSON_TYPE_NAMES.get(name, name)


def _iter_jsonl(path: Path, raw: bytes):
    """Yield ``(line, value)`` per non-blank line; a bad line yields its :class:`DataError` as value."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # 0x0A/0x0D never occur inside a UTF-8 sequence
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, DataError(str(path), number, None, f"invalid UTF-8 (byte {err.start} of the line)")
            continue
        text = text.removeprefix("\ufeff")
        start = len(text) - len(text.lstrip(" \t"))
        if start == len(text):
            continue
        try:
            value, end = _parse_json_value(path, text, start, number, number - 1)
            if text[end:].strip(" \t"):
                raise DataError(str(path), number, None, "malformed JSON: extra data after the record")
        except DataError as err:
            yield number, err
            continue
        yield number, value


def _iter_raw(path: Path):
    """Yield ``(line, value)`` for each record of a JSON array or a JSONL file (see :func:`_iter_jsonl`)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), None, None, f"cannot read the file: {err.strerror or err}") from None
    suffix = path.suffix.lower()
    array = suffix == ".json" or (
        suffix not in JSONL_SUFFIXES and raw.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    )
    if not array:
        yield from _iter_jsonl(path, raw)
        return
    text = _decode_text(path, raw)
    if not text.lstrip().startswith("["):
        raise DataError(str(path), 1, None, "a .json data file must hold a JSON array of records")
    pos = text.index("[") + 1
    counted, line = 0, 1  # line number of ``counted``, advanced incrementally (big files stay linear)

    def line_at(offset: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    ws = " \t\n"
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]":
            pos += 1
            break
        start = line_at(pos)
        value, pos = _parse_json_value(path, text, pos, start, 0)
        yield start, value
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            pos += 1
            break
        else:
            raise DataError(
                str(path), line_at(pos), None, "malformed JSON: expected ',' or ']' between records"
            )
    if text[pos:].strip():
        raise DataError(str(path), line_at(pos), None, "extra data after the JSON array")


def validate_record(
    value: object, path: str, line: int, require_english: bool, output_required: bool = True
) -> Record:
    """Check one decoded record and turn it into a :class:`Record` (or raise :class:`DataError`)."""
    if isinstance(value, DataError):
        raise value
    if not isinstance(value, dict):
        raise DataError(path, line, None, f"a record must be a JSON object, got {_json_type(value)}")
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
            raise DataError(path, line, name, f"must be a string, got {_json_type(item)}")
        if not item.strip():
            raise DataError(path, line, name, "empty")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as err:  # a "\ud800" escape decodes to a lone surrogate
            reason = f"invalid Unicode (lone surrogate at character {err.start})"
            raise DataError(path, line, name, reason) from None
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
    check_data_file(path)
    records = []
    for line, value in _iter_raw(path):
        if isinstance(value, dict) and "output" not in value:
            value = {**value, "output": None}
        records.append(validate_record(value, str(path), line, require_english, output_required=False))
    if not records:
        raise DataError(str(path), None, None, "no records")
    return records


def check_data_file(path: Path) -> None:
    """A data path must be a regular file: say what it is otherwise."""
    import stat

    if path.is_symlink() and not path.exists():
        raise DataError(str(path), None, None, "a broken symbolic link")
    if not path.exists():
        raise DataError(str(path), None, None, "no such file")
    mode = path.stat().st_mode
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket"}
    for test, kind in kinds.items():
        if test(mode):
            raise DataError(str(path), None, None, f"is {kind}, not a data file")
    if not stat.S_ISREG(mode):
        raise DataError(str(path), None, None, "is not a regular file")


def load_records(
    path: str | Path,
    require_english: bool = True,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list[Record]:
    """Read every record of ``path`` (``.json`` array or ``.jsonl``), validated.

    ``require_english`` is True for CC-Tuning and False for plain SFT. With ``skip_invalid`` a
    bad record (in JSONL also a line that is not UTF-8 or not JSON) is skipped and counted in
    ``report``; a malformed JSON array still stops the load.
    """
    path = Path(path)
    check_data_file(path)
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
        logger.warning(
            "%s: skipped %d invalid records (first: %s)", path, report.skipped, report.first_errors[0]
        )
    return records
