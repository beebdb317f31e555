"""Record formats and column mapping: every supported layout becomes the official record.

Three formats (``--format``, detected by ``auto``):

* ``official``: ``instruction``, ``output``, ``instruction_en`` and an optional ``lang``;
* ``messages`` (conversational, as in TRL and LLaMA-Factory): ``messages`` holds an optional
  system turn, one user turn and one assistant turn (``{"role": ..., "content": ...}``); the English
  user turn is in ``messages_en`` (a conversation whose one user turn is used) or in
  ``instruction_en`` (a string); optional ``lang``;
* ``prompt-completion``: ``prompt``, ``completion``, ``prompt_en``, optional ``lang``; ``prompt``
  and ``completion`` may also be conversational (``prompt`` a system and a user turn or a user turn,
  ``completion`` one assistant turn), as in TRL.

``auto`` looks at the fields (after ``--columns``) of the first record: ``instruction`` means
official, else ``messages`` means messages, else ``prompt`` means prompt-completion, else
official (whose error then names the missing ``instruction``).

A conversation of several user or assistant turns is refused: CC-Tuning connects the prompt at one
position, the last prompt token; a record is one prompt and its response.

``--columns instruction=question,output=answer`` reads a field of the format from a column of
another name; errors name the data's own column.
"""

from __future__ import annotations

from dataclasses import dataclass

from cctuning.config import split_list
from cctuning.errors import CCError, DataError

FORMATS = ("auto", "official", "messages", "prompt-completion")
# the fields of each format: required ones first, then the English one(s), then the optional ones
FORMAT_FIELDS = {
    "official": ("instruction", "output", "instruction_en", "lang"),
    "messages": ("messages", "messages_en", "instruction_en", "lang"),
    "prompt-completion": ("prompt", "completion", "prompt_en", "lang"),
}
KNOWN_FIELDS = tuple(dict.fromkeys(f for fields in FORMAT_FIELDS.values() for f in fields))
ROLES = ("system", "user", "assistant")
TURN_ORDERS = (
    ("user",),
    ("user", "assistant"),
    ("system", "user"),
    ("system", "user", "assistant"),
)
MULTI_TURN = (
    "CC-Tuning defines one connection position per prompt (its last token), so a record must be one "
    "user turn and its assistant turn: make one record per turn"
)

_JSON_TYPE_NAMES = {
    "dict": "object",
    "list": "array",
    "NoneType": "null",
    "bool": "boolean",
    "int": "number",
    "float": "number",
}


def json_type(value: object) -> str:
    """The JSON name of a value's type (``object``, ``array``, ``number``, ...)."""
    name = type(value).__name__
    return _JSON_TYPE_NAMES.get(name, name)


def text_problem(item: object) -> str | None:
    """What is wrong with a text field's value (None: a usable string)."""
    if not isinstance(item, str):
        return f"must be a string, got {json_type(item)}"
    if not item.strip():
        return "empty"
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as err:  # a "\ud800" escape decodes to a lone surrogate
        return f"invalid Unicode (lone surrogate at character {err.start})"
    return None


def parse_columns(columns: str | dict | None, where: str = "--columns") -> tuple[tuple[str, str], ...]:
    """``"instruction=question,output=answer"`` or ``{"instruction": "question"}`` → pairs of
    (our field, the data's column); a one-line :class:`CCError` for anything else."""
    if columns is None or columns == "":
        return ()
    if isinstance(columns, dict):
        items = list(columns.items())
    elif isinstance(columns, str):
        items = []
        for item in split_list(columns):
            ours, sep, theirs = item.partition("=")
            if not sep:
                raise CCError(f"{where}: '{item}' is not FIELD=COLUMN (e.g. instruction=question)")
            items.append((ours.strip(), theirs.strip()))
    else:
        raise CCError(f"{where}: expected FIELD=COLUMN,... or a mapping, got {columns!r}")
    pairs: list[tuple[str, str]] = []
    for ours, theirs in items:
        if not isinstance(ours, str) or not isinstance(theirs, str) or not ours or not theirs:
            raise CCError(f"{where}: '{ours}={theirs}' needs a field name and a column name")
        if ours not in KNOWN_FIELDS:
            raise CCError(f"{where}: unknown field '{ours}' (fields: {', '.join(KNOWN_FIELDS)})")
        if any(ours == o for o, _ in pairs):
            raise CCError(f"{where}: field '{ours}' is mapped twice")
        if any(theirs == t for _, t in pairs):
            raise CCError(f"{where}: column '{theirs}' is mapped to two fields")
        pairs.append((ours, theirs))
    return tuple(pairs)


@dataclass(frozen=True)
class DataOptions:
    """How to read a data path: its format, the column mapping and the split of a DatasetDict."""

    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (our field, the data's column)
    split: str | None = None

    @classmethod
    def of(
        cls, data_format: str | None = "auto", columns: str | dict | None = None, split: str | None = None
    ) -> DataOptions:
        """Checked options from a config's ``data_format``, ``columns`` and ``split``."""
        data_format = data_format or "auto"
        if data_format not in FORMATS:
            raise CCError(f"--format: expected one of {', '.join(FORMATS)}, got {data_format!r}")
        return cls(data_format, parse_columns(columns), split or None)

    def describe(self) -> dict:
        """For run metadata: only what differs from the defaults."""
        out: dict = {}
        if self.format != "auto":
            out["format"] = self.format
        if self.columns:
            out["columns"] = dict(self.columns)
        if self.split:
            out["split"] = self.split
        return out


def detect_format(fields) -> str:
    """The format of a record (or table) with these field names, after the column mapping."""
    names = set(fields)
    if "instruction" in names:
        return "official"
    if "messages" in names:
        return "messages"
    if "prompt" in names:
        return "prompt-completion"
    return "official"


def apply_columns(value: dict, columns: tuple[tuple[str, str], ...]) -> dict:
    """The record with each mapped column under our field name (a mapped field hides a column of
    that name the data may also have)."""
    if not columns:
        return value
    out = {k: v for k, v in value.items() if not any(k == ours for ours, _ in columns)}
    for ours, theirs in columns:
        if theirs in value:
            out[ours] = value[theirs]
    return out


def field_names(columns: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Our field → the name the data uses for it (for error messages)."""
    return dict(columns)


@dataclass
class Converted:
    """One record in the official schema, with the data's name for each field and the system turn."""

    value: dict
    names: dict  # official field -> the data's field name, for errors
    system: str | None = None


class Converter:
    """Turns the records of one file, in one format, into official records (or raises
    :class:`DataError` naming the data's own field)."""

    def __init__(self, fmt: str, columns: tuple[tuple[str, str], ...], path: str):
        self.format, self.columns, self.path = fmt, columns, path
        rename = field_names(columns)
        self.name = lambda field: rename.get(field, field)
        if fmt == "official":
            self.names = {f: self.name(f) for f in FORMAT_FIELDS["official"]}
        elif fmt == "prompt-completion":
            self.names = {
                "instruction": self.name("prompt"),
                "output": self.name("completion"),
                "instruction_en": self.name("prompt_en"),
                "lang": self.name("lang"),
            }
        else:
            self.names = {
                "instruction": self.name("messages"),
                "output": self.name("messages"),
                "instruction_en": self.name("instruction_en"),
                "lang": self.name("lang"),
            }

    def required_fields(self, require_english: bool, output_required: bool = True) -> list[tuple[str, ...]]:
        """The data fields a table must have: each entry is a group of alternatives."""
        own = FORMAT_FIELDS[self.format]
        need: list[tuple[str, ...]] = [(self.name(own[0]),)]
        if output_required and self.format != "messages":
            need.append((self.name(own[1]),))
        if require_english:
            if self.format == "messages":
                need.append((self.name("messages_en"), self.name("instruction_en")))
            else:
                need.append((self.name(own[2]),))
        return need

    def convert(
        self, value: object, line: int | None, row: int | None, require_english: bool, output_required: bool
    ) -> Converted:
        if not isinstance(value, dict) or self.format == "official":
            return Converted(
                apply_columns(value, self.columns) if isinstance(value, dict) else value, self.names
            )
        value = apply_columns(value, self.columns)
        if self.format == "prompt-completion":
            return self._prompt_completion(value, line, row, output_required)
        return self._messages(value, line, row, require_english, output_required)

    # -- helpers ---------------------------------------------------------------------------------
    def _error(self, line, row, field: str, reason: str) -> DataError:
        return DataError(self.path, line, self.name(field), reason, row=row)

    def _turns(self, value: dict, field: str, line, row) -> dict[str, str]:
        """The turns of a conversation by role, checked: an optional system turn, one user turn,
        then an optional assistant turn."""
        conv = value[field]
        if not isinstance(conv, list):
            raise self._error(line, row, field, f"must be a list of messages, got {json_type(conv)}")
        roles, turns = [], {}
        for i, msg in enumerate(conv, start=1):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise self._error(
                    line, row, field, f"message {i} must be an object with 'role' and 'content'"
                )
            role = msg["role"]
            if role not in ROLES:
                raise self._error(
                    line,
                    row,
                    field,
                    f"message {i}: unsupported role {role!r} (system, user and assistant only)",
                )
            problem = text_problem(msg["content"])
            if problem:
                raise self._error(line, row, field, f"message {i} ({role}): content {problem}")
            roles.append(role)
            turns[role] = msg["content"]
        users, assistants = roles.count("user"), roles.count("assistant")
        if users > 1 or assistants > 1:
            raise self._error(
                line,
                row,
                field,
                f"a multi-turn conversation ({users} user and {assistants} assistant turns): {MULTI_TURN}",
            )
        if tuple(roles) not in TURN_ORDERS:
            got = ", ".join(roles) or "no messages"
            raise self._error(
                line,
                row,
                field,
                f"expected an optional system turn, one user turn and one assistant turn, in this order; got {got}",
            )
        return turns

    def _messages(self, value: dict, line, row, require_english: bool, output_required: bool) -> Converted:
        if value.get("messages") is None:
            raise self._error(line, row, "messages", "missing")
        turns = self._turns(value, "messages", line, row)
        if output_required and "assistant" not in turns:
            raise self._error(line, row, "messages", "no assistant turn (the response to train on)")
        out = {"instruction": turns["user"], "output": turns.get("assistant")}
        names = dict(self.names)
        english_turns = value.get("messages_en")
        english_text = value.get("instruction_en")
        if english_turns is not None and english_text is not None:
            raise self._error(
                line,
                row,
                "messages_en",
                f"give the English user turn once: in it or in '{self.name('instruction_en')}'",
            )
        if english_turns is not None:
            out["instruction_en"] = self._turns(value, "messages_en", line, row)["user"]
            names["instruction_en"] = self.name("messages_en")
        elif english_text is not None:
            out["instruction_en"] = english_text
        elif require_english:
            raise self._error(
                line,
                row,
                "messages_en",
                f"missing (the English user turn: give '{self.name('messages_en')}' or "
                f"'{self.name('instruction_en')}')",
            )
        if value.get("lang") is not None:
            out["lang"] = value["lang"]
        return Converted(out, names, turns.get("system"))

    def _prompt_completion(self, value: dict, line, row, output_required: bool) -> Converted:
        prompt, completion = value.get("prompt"), value.get("completion")
        out = {"lang": value["lang"]} if value.get("lang") is not None else {}
        system = None
        if isinstance(prompt, list):  # conversational prompt-completion (TRL)
            turns = self._turns(value, "prompt", line, row)
            if "assistant" in turns:
                raise self._error(line, row, "prompt", "the assistant turn belongs in the completion")
            out["instruction"], system = turns["user"], turns.get("system")
        elif prompt is not None:
            out["instruction"] = prompt
        if isinstance(completion, list):
            completion = self._completion_turn(completion, line, row)
        if completion is not None:
            out["output"] = completion
        elif not output_required:
            out["output"] = None
        english = value.get("prompt_en")
        if isinstance(english, list):
            english = self._turns(value, "prompt_en", line, row)["user"]
        if english is not None:
            out["instruction_en"] = english
        return Converted(out, self.names, system)

    def _completion_turn(self, completion: list, line, row) -> object:
        """The content of a conversational completion: exactly one assistant turn."""
        if len(completion) > 1:
            raise self._error(line, row, "completion", f"{len(completion)} turns: {MULTI_TURN}")
        turn = completion[0] if completion else None
        if not isinstance(turn, dict) or turn.get("role") != "assistant" or "content" not in turn:
            raise self._error(
                line, row, "completion", "must be one assistant turn ({'role': 'assistant', 'content': ...})"
            )
        return turn["content"]
