"""Atomic file writes: a crash never leaves a half-written file that later loads silently."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    """One JSON object a line (UTF-8, not ASCII-escaped), written atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


INCOMPLETE_MARKER = ".cctuning-incomplete"


def is_incomplete(folder: str | Path) -> bool:
    """True when a :func:`staged_dir` save into ``folder`` started and never finished (a crash)."""
    return (Path(folder) / INCOMPLETE_MARKER).exists()


@contextmanager
def staged_dir(target: str | Path):
    """Write a folder's files into a staging folder, then move each into ``target`` by rename.

    Each file lands whole, but a crash between two renames would leave old and new files side by
    side; so a marker file is written first and removed only after the last rename. Loaders refuse
    a folder that still holds the marker (:func:`is_incomplete`), so a half-saved folder never
    loads silently, even after SIGKILL, which skips every ``finally``.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=target))
    try:
        yield stage
        write_text(target / INCOMPLETE_MARKER, "an interrupted save left this folder incomplete\n")
        for item in sorted(stage.iterdir()):
            dest = target / item.name
            if item.is_dir():
                if dest.exists():
                    shutil.rmtree(dest)
            os.replace(item, dest)
        os.unlink(target / INCOMPLETE_MARKER)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
