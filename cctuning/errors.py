"""User-facing errors.

Everything a user can cause (bad data, a wrong path, a model we cannot connect to) raises a
:class:`CCError`. The CLI prints it as one line and exits with status 2; a traceback means a bug.
"""

from __future__ import annotations


class CCError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class DataError(CCError):
    """A problem with one record of a data file; names the file, the line and the field:
    ``data.jsonl:3: field 'output': empty``. A record of a table (parquet, arrow, csv, a datasets
    folder) is named by its 0-based ``row`` instead: ``data.parquet: row 17: field 'x': missing``."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str, row: int | None = None):
        self.path, self.line, self.field, self.reason, self.row = str(path), line, field, message, row
        if row is not None:
            where = f"{self.path}: row {row}"
        else:
            where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that wrap a library's multi-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
