"""Tables read through the ``datasets`` library (the optional extra ``cctuning[data]``).

* ``.parquet``, ``.arrow`` (Arrow IPC stream or file) and ``.csv`` files are streamed
  (``load_dataset(..., streaming=True)``): rows are read batch by batch as they are validated, the
  file is never read whole and no cache copy of it is written. CSV cells are read as text (never
  as numbers or NaN); an empty cell is a missing field, as a null is in parquet and arrow.
* A folder written by ``Dataset.save_to_disk`` is memory-mapped (``load_from_disk``) and read in
  batches. A ``DatasetDict`` folder needs ``--split`` when it has several splits (one split is used
  as it is); only that split is opened. Rows of a split are named after its folder,
  ``data/dd/train: row 17``.

Rows are numbered from 0, as ``dataset[i]`` indexes them. ``datasets`` is imported only here, only
when a table is read, so the core works without it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cctuning.errors import CCError, DataError, first_line

logger = logging.getLogger(__name__)

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
DATASET_DICT_FILE = "dataset_dict.json"  # what save_to_disk writes for a DatasetDict
DATASET_FILE = "state.json"  # ... and for a Dataset
BATCH_ROWS = 256
INSTALL_HINT = "pip install cctuning[data]"


def is_table(path: Path) -> bool:
    """A path read through ``datasets``: a table file by its suffix, or a folder."""
    return path.suffix.lower() in SUFFIXES or path.is_dir()


def _import_datasets(path: Path, what: str):
    try:
        import datasets  # deferred: optional dependency (the data extra)
    except ImportError:
        raise CCError(f"{path}: reading {what} needs the datasets library: {INSTALL_HINT}") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """Keep ``datasets``' own log handler and progress bars silent while we read: a problem is
    reported by us, in one line."""
    verbosity = datasets.logging.get_verbosity()
    bars = not datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def dataset_folder(path: Path, split: str | None) -> Path:
    """The folder of the one Dataset to read in ``path``: the folder itself (a Dataset) or the
    chosen split of a DatasetDict; a one-line :class:`DataError` otherwise."""
    if (path / DATASET_DICT_FILE).is_file():
        try:
            splits = json.loads((path / DATASET_DICT_FILE).read_text(encoding="utf-8"))["splits"]
            splits = [str(s) for s in splits]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                str(path), None, None, f"unreadable {DATASET_DICT_FILE}: {first_line(err)}"
            ) from None
        if not splits:
            raise DataError(str(path), None, None, "a DatasetDict without splits")
        if split is None:
            if len(splits) > 1:
                raise DataError(
                    str(path),
                    None,
                    None,
                    f"a DatasetDict with the splits {', '.join(splits)}: choose one with --split",
                )
            split = splits[0]
        elif split not in splits:
            raise DataError(str(path), None, None, f"no split '{split}' (splits: {', '.join(splits)})")
        return path / split
    if (path / DATASET_FILE).is_file():
        if split is not None:
            raise DataError(
                str(path), None, None, f"--split {split}: the folder holds one Dataset, not a DatasetDict"
            )
        return path
    raise DataError(
        str(path),
        None,
        None,
        "is a directory, not a data file nor a folder written by datasets' save_to_disk",
    )


def _csv_columns(path: Path) -> list[str]:
    """The header of a CSV file (so that every column is read as text); only its first record is
    read (a quoted name may span lines)."""
    raw = b""
    try:
        with open(path, "rb") as fh:
            for line in fh:
                raw += line
                if raw.count(b'"') % 2 == 0:
                    break
    except OSError as err:
        raise DataError(str(path), None, None, f"cannot read the file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), 1, None, f"invalid UTF-8 in the header (byte {err.start})") from None
    try:
        header = next(csv.reader(io.StringIO(text)), None)
    except csv.Error as err:
        raise DataError(str(path), 1, None, f"unreadable CSV header: {first_line(err)}") from None
    if not header:
        raise DataError(str(path), None, None, "no records (no CSV header)")
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(str(path), 1, name, "duplicate column")
        seen.add(name)
    return header


def _rows(dataset, empty_is_null: bool = False) -> Iterator[dict]:
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            row = {name: batch[name][i] for name in names}
            if empty_is_null:  # a CSV cell cannot be null: an empty one is a missing field
                row = {name: (None if value == "" else value) for name, value in row.items()}
            yield row


def iter_table(path: Path, split: str | None) -> tuple[str, Iterator[tuple[int, dict]]]:
    """The name rows are reported under and an iterator of ``(row index, row)``; the folder or
    file checks and the split choice happen now, reading happens as the rows are consumed."""
    if path.is_dir():
        folder = dataset_folder(path, split)
        return str(folder), _iter_folder(folder)
    if split is not None:
        raise DataError(str(path), None, None, f"--split {split}: only a DatasetDict folder has splits")
    kind = SUFFIXES[path.suffix.lower()]
    columns = _csv_columns(path) if kind == "csv" else None
    return str(path), _iter_file(path, kind, columns)


def _iter_folder(folder: Path) -> Iterator[tuple[int, dict]]:
    datasets = _import_datasets(folder, "a datasets folder")
    with _quiet(datasets):
        try:
            dataset = datasets.load_from_disk(str(folder))
            if not isinstance(dataset, datasets.Dataset):
                raise DataError(str(folder), None, None, "is not one Dataset (a DatasetDict? give --split)")
            yield from enumerate(_rows(dataset))
        except CCError:
            raise
        except Exception as err:  # a truncated or foreign folder: the library's error, in one line
            raise DataError(str(folder), None, None, f"cannot read the dataset: {first_line(err)}") from None


def _iter_file(path: Path, kind: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    datasets = _import_datasets(path, f"a .{kind} file")
    options: dict = {}
    if columns is not None:
        options = {
            "features": datasets.Features({name: datasets.Value("string") for name in columns}),
            "keep_default_na": False,
            "na_filter": False,
        }
    if kind == "parquet" and _parquet_rows(path) == 0:  # datasets' streaming reader fails on it
        raise DataError(str(path), None, None, "no records")
    with _quiet(datasets), tempfile.TemporaryDirectory(prefix="cctuning-datasets-") as cache:
        try:
            dataset = datasets.load_dataset(
                kind, data_files=str(path), split="train", streaming=True, cache_dir=cache, **options
            )
            yield from enumerate(_rows(dataset, empty_is_null=kind == "csv"))
        except CCError:
            raise
        except Exception as err:  # not a parquet/arrow/csv file, truncated, unreadable
            raise DataError(str(path), None, None, f"cannot read as {kind}: {first_line(err)}") from None


def _parquet_rows(path: Path) -> int | None:
    """The number of rows a parquet file's footer records (None when it cannot be read: the reader
    reports that)."""
    try:
        import pyarrow.parquet  # deferred: optional (extra data), as the datasets reader it comes with

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not a parquet file, truncated, pyarrow missing
        return None
