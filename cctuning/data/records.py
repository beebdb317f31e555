"""Load and validate CC-Tuning training records.

The official format (docs/method.md §3.2): JSON or JSONL records with ``instruction`` (non-English),
``output`` (its non-English response), ``instruction_en`` (the English translation of the
instruction only) and an optional ``lang``. Every record is checked before any training starts;
the first bad one stops the run with ``file:line: field 'x': what is wrong``. With
``skip_invalid`` bad records are skipped instead and counted, never silently.

The same records may come as conversational ``messages`` or as ``prompt``/``completion`` pairs,
under other column names (:mod:`cctuning.data.formats`), and from parquet, arrow and csv files or
``datasets`` folders (:mod:`cctuning.data.tabular`, ``pip install cctuning[data]``), where a
record is named by its 0-based row: ``data.parquet: row 17: field 'instruction_en': missing``. In
a table a null cell is a missing field. Every record of every source goes through
:func:`validate_record`.

Memory: a JSON/JSONL file is read whole (its bytes) and a table is streamed (files) or memory-mapped
(``datasets`` folders); either way the loaded records (their strings) are held in a list, which the
tokenised features of the whole data set follow.

A JSONL file is read line by line (bytes), so a line that is not UTF-8 or not JSON is one bad
record like any other; a JSON array is one document, so a syntax error in it stops the load even
with ``skip_invalid``. A UTF-8 BOM (also at the start of a later line, as left by concatenating
files), CRLF or CR line ends, blank lines and indentation are accepted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cctuning.data.formats import (
    Converter,
    DataOptions,
    apply_columns,
    detect_format,
    json_type,
    text_problem,
)
from cctuning.data.tabular import is_table, iter_table
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
    line: int | None = 0  # the line of a JSON/JSONL record (None for a row of a table)
    row: int | None = None  # the 0-based row of a table's record
    system: str | None = None  # a conversation's system turn (the same in every record of a file)
    # our field -> the data's name for it (its column, or 'messages'), for errors
    names: dict | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return f"{self.path}: row {self.row}" if self.row is not None else f"{self.path}:{self.line}"

    @property
    def location(self) -> str:
        """``line 3`` or ``row 17`` (without the file)."""
        return f"row {self.row}" if self.row is not None else f"line {self.line}"

    def error(self, field: str | None, reason: str) -> DataError:
        """A :class:`DataError` about ``field`` (our name) of this record, in the data's own names."""
        name = (self.names or {}).get(field, field) if field else field
        return DataError(self.path, self.line, name, reason, row=self.row)


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: int = 0
    first_errors: list[str] | None = None
    format: str | None = None  # the records' format (official, messages, prompt-completion)


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
    value: object,
    path: str,
    line: int | None,
    require_english: bool,
    output_required: bool = True,
    *,
    row: int | None = None,
    names: dict | None = None,
    system: str | None = None,
) -> Record:
    """Check one decoded record in the official schema and turn it into a :class:`Record` (or raise
    :class:`DataError`). ``names`` gives the data's name of each field for the errors (after a
    column mapping or a format conversion); ``row`` names a table's record."""
    if isinstance(value, DataError):
        raise value
    where = Record("", None, path=path, line=line, row=row, names=names)
    if not isinstance(value, dict):
        raise where.error(None, f"a record must be a JSON object, got {json_type(value)}")
    required = REQUIRED_FIELDS if output_required else ("instruction",)
    fields = required + ((ENGLISH_FIELD,) if require_english else ())
    for name in fields:
        if name not in value:
            raise where.error(name, "missing")
    optional = tuple(f for f in REQUIRED_FIELDS + (ENGLISH_FIELD,) + OPTIONAL_FIELDS if f not in fields)
    for name in fields + optional:
        if name not in value or (name not in fields and value[name] is None):
            continue
        problem = text_problem(value[name])
        if problem:
            raise where.error(name, problem)
    english = value.get(ENGLISH_FIELD)
    return Record(
        instruction=value["instruction"],
        output=value["output"],
        instruction_en=english if isinstance(english, str) else None,
        lang=value.get("lang"),
        path=path,
        line=line,
        row=row,
        system=system,
        names=names,
    )


def check_data_file(path: Path) -> None:
    """A data path must be a regular file: say what it is otherwise."""
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


def _short(text: str | None) -> str:
    if text is None:
        return "none"
    return repr(text if len(text) <= 40 else text[:37] + "...")


class _Loader:
    """Reads the records of one data path in one format: the converter is chosen from the first
    record (JSON) or the columns (a table), which are also checked against ``--columns``."""

    def __init__(self, options: DataOptions, require_english: bool, output_required: bool):
        self.options, self.require_english, self.output_required = options, require_english, output_required
        self.converter: Converter | None = None
        self.format: str | None = None
        self.first: Record | None = None  # its system turn is the file's
        self.seen: set[str] = set()  # mapped columns found in some JSON record

    def start(self, name: str, value: dict, table: bool) -> None:
        options = self.options
        mapped = apply_columns(value, options.columns)
        self.format = detect_format(mapped) if options.format == "auto" else options.format
        self.converter = Converter(self.format, options.columns, name)
        how = "detected" if options.format == "auto" else "--format"
        logger.debug("%s: %s records (%s)", name, self.format, how)
        if not table:
            return
        columns = ", ".join(value)
        for ours, theirs in options.columns:
            if theirs not in value:
                raise DataError(
                    name,
                    None,
                    None,
                    f"--columns maps {ours} to '{theirs}', which is not a column ({columns})",
                )
        for group in self.converter.required_fields(self.require_english, self.output_required):
            if not any(col in value for col in group):
                what = " or ".join(f"'{col}'" for col in group)
                raise DataError(
                    name,
                    None,
                    group[0],
                    f"missing: the {self.format} format needs a column {what}; the columns are {columns} "
                    "(map them with --columns FIELD=COLUMN)",
                )

    def record(self, name: str, line: int | None, row: int | None, value: object) -> Record:
        if isinstance(value, dict):
            self.seen.update(theirs for _, theirs in self.options.columns if theirs in value)
        if self.converter is None:  # before the first object: a bad line or a non-object
            return validate_record(value, name, line, self.require_english, self.output_required, row=row)
        conv = self.converter.convert(value, line, row, self.require_english, self.output_required)
        if not self.output_required and isinstance(conv.value, dict) and conv.value.get("output") is None:
            conv.value = {**conv.value, "output": None}
        rec = validate_record(
            conv.value,
            name,
            line,
            self.require_english,
            self.output_required,
            row=row,
            names=conv.names,
            system=conv.system,
        )
        if self.first is None:
            self.first = rec
        elif rec.system != self.first.system:
            raise rec.error(
                "instruction",
                f"its system turn ({_short(rec.system)}) differs from that of {self.first.location} "
                f"({_short(self.first.system)}): every prompt of a run is rendered with one system prompt",
            )
        return rec

    def unused_columns(self) -> list[str]:
        """Mapped columns that no JSON record has (a typo in ``--columns``)."""
        return [f"{ours}={theirs}" for ours, theirs in self.options.columns if theirs not in self.seen]


def _source(path: Path, split: str | None):
    """The name records are reported under, whether it is a table, and an iterator of
    ``(line, row, value)`` (a table's null cells dropped: a null is a missing field)."""
    if is_table(path):
        if not path.is_dir():
            check_data_file(path)
        name, rows = iter_table(path, split)
        return name, True, rows
    check_data_file(path)
    if split is not None:
        raise DataError(str(path), None, None, f"--split {split}: only a DatasetDict folder has splits")
    return str(path), False, _iter_raw(path)


def _load(
    path: str | Path,
    require_english: bool,
    output_required: bool,
    skip_invalid: bool,
    report: LoadReport,
    options: DataOptions | None,
) -> tuple[str, list[Record]]:
    options = options or DataOptions()
    name, table, source = _source(Path(path), options.split)
    loader = _Loader(options, require_english, output_required)
    report.first_errors = report.first_errors or []
    records: list[Record] = []
    with contextlib.closing(source):
        for position, value in source:
            line, row = (None, position) if table else (position, None)
            if table:
                if loader.converter is None:
                    loader.start(name, value, table=True)
                value = {k: v for k, v in value.items() if v is not None}
            elif loader.converter is None and isinstance(value, dict):
                loader.start(name, value, table=False)
            try:
                records.append(loader.record(name, line, row, value))
            except DataError as err:
                if not skip_invalid:
                    raise
                report.skipped += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(str(err))
    unused = loader.unused_columns() if not table and records else []
    if unused:
        raise DataError(name, None, None, f"--columns {', '.join(unused)}: no record has that column")
    report.format = loader.format
    return name, records


def load_prompts(
    path: str | Path, require_english: bool = False, options: DataOptions | None = None
) -> list[Record]:
    """Inference inputs: records with ``instruction`` (``output`` optional: the gold response,
    ``instruction_en`` needed for the English oracle). Same validation and errors as training data."""
    name, records = _load(path, require_english, False, False, LoadReport(), options)
    if not records:
        raise DataError(name, None, None, "no records")
    return records


def load_records(
    path: str | Path,
    require_english: bool = True,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
    options: DataOptions | None = None,
) -> list[Record]:
    """Read every record of ``path``, validated: a ``.json`` array or ``.jsonl`` file, or a table
    (parquet, arrow, csv, a ``datasets`` folder) read as ``options`` say (format, column mapping,
    split).

    ``require_english`` is True for CC-Tuning and False for plain SFT. With ``skip_invalid`` a
    bad record (in JSONL also a line that is not UTF-8 or not JSON) is skipped and counted in
    ``report``; a malformed JSON array still stops the load.
    """
    report = report if report is not None else LoadReport()
    name, records = _load(path, require_english, True, skip_invalid, report, options)
    if not records:
        raise DataError(name, None, None, "no valid records")
    report.loaded = len(records)
    if report.skipped:
        logger.warning(
            "%s: skipped %d invalid records (first: %s)", name, report.skipped, report.first_errors[0]
        )
    return records


def system_prompt_of(records: list[Record], configured: str | None, model: bool = False) -> str | None:
    """The system prompt that renders ``records``: their system turn (one per file, checked on
    load) or ``configured``. For training (``model`` False) the data's turn is taken when nothing
    is configured; for a trained model (``model`` True: ``configured`` is the model's, saved with
    it) the data's turn must be the model's. A conflict is a one-line error."""
    data = records[0].system if records else None
    if data is None or data == configured:
        return configured
    if configured is None and not model:
        return data
    what = "the model's system prompt (set when it was trained)" if model else "--system-prompt"
    raise records[0].error(
        "instruction", f"the system turn {_short(data)} differs from {what}: {_short(configured)}"
    )
