"""Building a converted folder beside its target and renaming it into place once complete.

An interrupted conversion therefore never leaves a folder that :func:`~cctuning.presets.resolve_model`
would reuse; what it leaves is a hidden build folder, deleted by the next conversion once abandoned.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from cctuning.presets.registry import Preset, is_converted

logger = logging.getLogger("cctuning.presets")


def new_build_dir(target: Path) -> Path:
    """A fresh private folder beside ``target`` (``.NAME.XXXX.tmp``) to build the conversion in."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def remove_abandoned_builds(target: Path, older_than_s: float = 3600.0) -> None:
    """Delete build folders that a killed conversion left beside ``target`` (about 1 GB each).

    A conversion takes minutes, so a build untouched for an hour belongs to no live process.
    """
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > older_than_s:
                logger.info("removing %s, left by an interrupted conversion", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def publish_build(build: Path, target: Path, preset: Preset) -> None:
    """Rename the finished folder into place; a stale target is moved aside first, then deleted."""
    # mkdtemp made the folder private (0700) and some writers make 0600 files; a cache shared
    # through CCTUNING_CACHE must be readable as the umask allows, like any other folder. A probe
    # folder reads the umask without os.umask(), which would change it for every thread.
    probe = build / ".umask-probe"
    probe.mkdir()
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    for path in (build, *build.iterdir()):
        os.chmod(path, dir_mode if path.is_dir() else dir_mode & 0o666)
    if target.exists():
        if is_converted(target, preset):  # another process finished first: keep its folder
            shutil.rmtree(build, ignore_errors=True)
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if not is_converted(target, preset):
            raise
        shutil.rmtree(build, ignore_errors=True)
