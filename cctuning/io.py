"""Files and folders, safely: atomic writes (a crash never leaves a half-written file that later loads
silently; a full disk is an :class:`OSError` naming the file asked for), the reader/writer lock of a
folder (:func:`folder_lock`), the checks of an output before anything slow runs, and the content
fingerprint of a model folder (:func:`folder_fingerprint`), memoized in the cache folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
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


logger = logging.getLogger(__name__)


_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors' Rust writer reports the OS's error


def _write_error(err: Exception, rename) -> Exception:
    """``err``, a failed write, as an :class:`OSError` naming the file the user asked for:
    ``rename(file name the error carries, or None)`` gives that file, or None when the error is not
    about our scratch files (it then stays as it is). A safetensors error that wraps an OS error
    (``os error 28``: a full disk) counts as one."""
    if isinstance(err, OSError):
        code, name = err.errno, err.filename
    elif type(err).__name__ == "SafetensorError" and _OS_ERROR.search(str(err)):
        code, name = int(_OS_ERROR.search(str(err)).group(1)), None
    else:
        return err
    target = rename(None if name is None else str(name))
    if code is None or target is None:
        return err
    return OSError(code, os.strerror(code), str(target))


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. A
    write that fails (a full disk, a read-only folder) leaves no temporary file and raises an
    :class:`OSError` naming ``path``."""
    path = Path(path)
    tmp = None

    def ours(name: str | None) -> Path | None:
        scratch = name is None or name == str(path.parent) or Path(name).name.startswith(f".{path.name}.")
        return path if scratch else None

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        open_modes(tmp)  # after the writer: mkstemp and safetensors both make 0600 files
        os.replace(tmp, path)
    except Exception as err:
        named = _write_error(err, ours)
        if named is err:
            raise
        raise named from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def writes_into(where: str | Path):
    """A write error that names no file (a full disk, a quota or a read-only file system, met by a
    library's own writer when it closes a file) raised again naming ``where``, what the block writes."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise OSError(err.errno, err.strerror, str(where)) from err


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

    def ours(name: str | None) -> Path | None:  # a file of the stage is named as the one it becomes
        if name is None:
            return target
        return target / Path(name).relative_to(stage) if stage in Path(name).parents else None

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
    except Exception as err:  # a full disk, a read-only folder: named as the files asked for
        named = _write_error(err, ours)
        if named is err:
            raise
        raise named from err
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
# how long a lock that is busy is tried again before giving up: another holder that is just releasing
# it holds it exclusively for a moment (see :func:`_release`)
LOCK_RETRY_SECONDS = 0.2


def _holders(fd: int) -> str:
    """The live holders a lock file records (``pid N (job)``, one a line), for the error message."""
    lines = os.pread(fd, 4096, 0).decode("utf-8", "replace").splitlines()
    alive = []
    for line in dict.fromkeys(line.strip() for line in lines if line.strip()):
        words = line.split()
        if len(words) > 1 and words[0] == "pid" and words[1].isdigit():
            try:
                os.kill(int(words[1]), 0)
            except ProcessLookupError:
                continue  # a reader that released while another still held the lock
            except PermissionError:
                pass
        alive.append(line)
    return ", ".join(alive) or "another process"


def _flock(fd: int, mode: int, retry: float = LOCK_RETRY_SECONDS) -> bool:
    """Take ``mode`` on ``fd`` without blocking, trying again for ``retry`` seconds."""
    deadline = time.monotonic() + retry
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _open_lock_file(path: Path, shared: bool) -> int | None:
    """The lock file, opened (and created) for writing; a reader of a folder it may not write into
    opens an existing lock file read-only, or gets None (no lock file can be made there)."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if shared else 0)
    try:
        return os.open(path, flags, 0o666)  # the kernel applies the umask
    except OSError:
        if not shared:
            raise
    try:  # read-only, a read-only mount, a file system that takes no new files (/proc)
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _acquire(folder: Path, shared: bool) -> int | None:
    """An open file description of ``folder``'s lock file holding the lock (see :func:`folder_lock`)."""
    path = folder / LOCK_NAME
    while True:
        fd = _open_lock_file(path, shared)
        if fd is None:
            return None
        if not _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            holder = _holders(fd)
            os.close(fd)
            raise CCError(f"{folder}: in use by {holder}; wait for it to finish or choose another folder")
        try:  # the holder before us may have removed the file between our open and our lock: retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(fd: int, path: Path, shared: bool) -> None:
    """Remove the lock file when no other process holds it, then unlock. A reader finds out by
    asking for the lock exclusively: granted, it was the last holder; refused, others still read."""
    try:
        last = not shared or _flock(fd, fcntl.LOCK_EX, retry=0)
        if last:
            with contextlib.suppress(OSError):  # still locked: whoever opened it meanwhile retries
                os.unlink(path)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def folder_lock(folder: str | Path, what: str, shared: bool = False):
    """Hold a lock on ``folder`` for the block (``what`` names the job, for the error another process
    gets). Exclusive (the default) for a command that writes the folder; ``shared`` for one that
    reads it: any number of readers hold it together, and a writer and a reader refuse each other,
    so that ``train --overwrite`` cannot delete a model that ``eval`` is reading, nor ``eval`` read one
    that ``train`` is writing.

    The lock is an ``flock`` on ``folder/.cctuning.lock``, which the kernel releases when its process
    dies however it dies, so a killed run never blocks the next one; the file records its holders
    (``pid N (job)``) for that error message and is removed when the last holder releases it. A
    writer creates ``folder`` when missing, and removes what it created again when the block fails
    and left it empty; a reader of a missing folder, or of one it may not write into where no lock
    file exists, reads unlocked (nobody can write there through cctuning either)."""
    folder = Path(folder)
    if shared and not folder.is_dir():
        yield
        return
    created = [] if shared else [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder, shared)
    if fd is None:
        logger.debug("%s: cannot make a lock file there, read without a lock", folder)
    ok = False
    try:
        if fd is not None:
            _record(fd, what, shared)
        yield
        ok = True
    finally:
        if fd is not None:
            _release(fd, folder / LOCK_NAME, shared)
        for made in created if not ok else ():
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def _record(fd: int, what: str, shared: bool) -> None:
    """Write this holder into the lock file: a writer alone, a reader beside the other readers."""
    line = f"pid {os.getpid()} ({what})\n".encode()
    with contextlib.suppress(OSError):  # a read-only lock file (a reader of a read-only folder)
        if shared:
            os.write(fd, line)  # O_APPEND: beside the other readers
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)


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


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Make sure a file can be written at ``path`` before anything slow runs: not a folder, and its
    folder (or the first of its parents that exists) writable; a one-line error otherwise. Creates
    nothing."""
    path = Path(path)
    if path.is_dir():
        raise CCError(f"{option} {path}: is a folder; give the path of a file")
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise CCError(f"{option} {path}: {parent} is not a folder")
    try:  # the parent's permissions alone can lie (root, read-only mounts, ACLs): try it
        fd, probe = tempfile.mkstemp(prefix=".cctuning-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CCError(f"{option} {path}: cannot write into {parent} ({err.strerror})") from None
    return path


#: the memo of :func:`folder_fingerprint` in the cache folder
FINGERPRINT_INDEX = "fingerprints.json"
# a file changed this close (ns) to the moment it was hashed may change again within the same tick of
# the file system's clock, unseen by its times: its memo entry is not trusted (git's "racy clean")
RACY_NS = 2_000_000_000


def cache_dir() -> Path:
    """cctuning's cache folder: ``$CCTUNING_CACHE``, else ``~/.cache/cctuning``."""
    return Path(os.environ.get("CCTUNING_CACHE") or Path.home() / ".cache" / "cctuning").expanduser()


def _file_key(stat: os.stat_result) -> list[int]:
    # the change time cannot be set back by a user: a rewrite always changes the key
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _content_hash(path: Path, index: dict) -> str:
    """sha256 of the file at ``path``, from ``index`` when the file's key (size, times, inode) is the
    one it was hashed with and it was not changed just before; else read (and ``index`` updated)."""
    key = str(path.resolve())
    stat = path.stat()
    entry = index.get(key)
    if isinstance(entry, dict) and entry.get("key") == _file_key(stat):
        if stat.st_ctime_ns < entry.get("hashed_at", 0) - RACY_NS:
            return entry["sha256"]
    hashed_at = time.time_ns()
    digest = sha256_file(path)
    index[key] = {"key": _file_key(stat), "hashed_at": hashed_at, "sha256": digest}
    return digest


def folder_fingerprint(folder: str | Path) -> str:
    """A fingerprint of the files directly in a model folder (weights, Decision Maker, matrix,
    configs): the name and the content (sha256) of each, hashed. The hashes are memoized in the cache
    folder (:data:`FINGERPRINT_INDEX`) by each file's size, modification and change times and inode,
    so an unchanged folder is not read again; a rewritten file is, whatever times it was given."""
    index_path = cache_dir() / FINGERPRINT_INDEX
    index = _read_index(index_path)
    before = json.dumps(index, sort_keys=True)
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            digest.update(f"{path.name}\0{_content_hash(path, index)}\n".encode())
    if json.dumps(index, sort_keys=True) != before:
        index = {k: v for k, v in index.items() if os.path.isfile(k)}  # forget files that are gone
        with contextlib.suppress(OSError):  # a read-only cache only costs the next run a re-read
            write_json(index_path, index)
    return digest.hexdigest()[:16]
