"""Atomic file writes: a crash never leaves a half-written file that later loads silently."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cctuning.errors import CCError


def current_umask() -> int:
    """The process's umask now, read from ``/proc/self/status`` where there is one; elsewhere by
    setting and restoring it (which another thread could see for an instant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_modes(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions that ``open()`` and
    ``mkdir()`` give under the umask: files 0o666 & ~umask, folders 0o777 & ~umask. mkstemp, mkdtemp
    and safetensors' writer make 0600 files and 0700 folders, which other users of a shared machine
    cannot read."""
    mask = current_umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, with the
    permissions ``open()`` would have given it (:func:`open_modes`), whatever wrote it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        open_modes(tmp)  # after the writer: mkstemp and safetensors both make 0600 files
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
    from safetensors.torch import save_file  # deferred: imports torch (5.5 s measured); io needs it here only

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
        open_modes(stage)  # what the writers made (0600 safetensors files) as open() would have
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


LOCK_NAME = ".cctuning.lock"


@contextmanager
def folder_lock(folder: str | Path, what: str):
    """Hold an exclusive lock on ``folder`` for the block (``what`` names the job, for the error a
    second process gets). The lock is an ``flock`` on ``folder/.cctuning.lock``, which the kernel
    releases when its process dies however it dies, so a killed run never blocks the next one; the
    file records the holder's pid and job for that error message and is removed on release. A folder
    that the lock itself created is removed again when the block fails and left it empty."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CCError(
                f"{folder}: in use by {holder}; wait for it to finish or choose another folder"
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock: retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what})\n".encode(), 0)
        yield
        ok = True
    finally:
        os.unlink(path)  # still locked: whoever opened it meanwhile retries on a new file
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        for made in created if not ok else ():
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def check_output_folder(path: str | Path, option: str = "--output") -> Path:
    """Make sure ``path`` is (or can be made) a writable folder before anything slow runs; a file in
    its place, or a folder we cannot write, is a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CCError(f"{option} {path}: exists and is not a folder")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CCError(f"{option} {path}: cannot create the folder ({err.strerror})") from None
    probe = path / f".cctuning-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CCError(f"{option} {path}: cannot write into the folder ({err.strerror})") from None
    finally:
        for folder in missing:  # only a check: what it created is removed again
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return path


def folder_fingerprint(folder: str | Path) -> str:
    """A fingerprint of the files directly in a model folder (weights, Decision Maker, matrix,
    configs): name, size and modification time of each, hashed. Any save, retraining or refit
    rewrites a file and so changes it; reading the files is not needed."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
