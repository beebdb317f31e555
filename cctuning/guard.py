"""The one output guard of every writing command: nothing a command writes may destroy what it reads.

:func:`check_output` is called by ``train``, ``fit-matrix``, ``generate``, ``eval``, ``eval --nll``,
``export``, ``experiment`` and ``lm-eval --output_path`` before anything slow runs. It refuses, in one
line naming the option and both paths:

* an output that *is* an input (the model, its base, the data, the config, the input records);
* an output that *contains* an input (writing or clearing it would touch the input);
* an output that lies *inside* an input folder, except in the places a command keeps its own results
  there (``eval/`` inside a model folder, the Transform Matrix file of ``fit-matrix``);
* an existing file that is not the command's own result (``own`` says what is).

:func:`safe_name` refuses a name that would climb out of the folder it names a part of (an experiment
cell called ``../../x``). Paths are compared after resolving symbolic links, so a link to an input is
the input.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cctuning.errors import CCError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_allowed(out: Path, folder: Path, places: Iterable[str]) -> bool:
    """Whether ``out`` lies in one of ``places`` (paths relative to ``folder``), or is one of them."""
    return any(_is_within(out, folder / place) for place in places)


def _existing_inputs(inputs: Mapping[str, str | Path | None]) -> list[tuple[str, Path]]:
    """The inputs that are paths on disk (a preset name or a hub id is not), resolved."""
    found = []
    for label, value in inputs.items():
        if value is None or value == "":
            continue
        path = Path(value).expanduser()
        if path.exists() or path.is_symlink():
            found.append((label, _resolved(path)))
    return found


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (a hard link is another name of it)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_against(output, out: Path, label: str, path: Path, option: str, places: Iterable[str]) -> None:
    if out == path or _same_file(out, path):
        raise CCError(f"{option} {output}: is the input {label} {path}, which writing there would destroy")
    if _is_within(path, out):
        raise CCError(
            f"{option} {output}: contains the input {label} {path}, which writing there could destroy"
        )
    if _is_within(out, path) and not _inside_allowed(out, path, places):
        raise CCError(f"{option} {output}: lies inside the input {label} {path}; choose a place outside it")


def check_output(
    output: str | Path,
    inputs: Mapping[str, str | Path | None],
    *,
    option: str = "--output",
    own: Callable[[Path], bool] | None = None,
    inside: Mapping[str, Iterable[str]] | None = None,
    folder: bool = False,
) -> Path:
    """Refuse ``output`` where writing it could destroy an input (see the module's docstring).

    ``inputs`` maps an option (``--model``, ``--data``, ``base model``) to its path; values that are
    not paths on disk are skipped. ``folder``: the output is a folder (an existing file there is
    refused), else a file (an existing folder is refused, and an existing file unless ``own(path)``
    says it is this command's own result, which may be replaced). ``inside`` maps an input's option
    to the places inside it (relative paths) where the command keeps its own results. Returns
    ``output`` as given, as a :class:`Path`."""
    out = _resolved(output)
    inside = inside or {}
    for label, path in _existing_inputs(inputs):
        _check_against(output, out, label, path, option, inside.get(label, ()))
    if folder:
        if out.exists() and not out.is_dir():
            raise CCError(f"{option} {output}: exists and is not a folder")
    elif out.is_dir():
        raise CCError(f"{option} {output}: is a folder; give the path of a file")
    elif out.is_file() and not (own and own(out)):
        raise CCError(
            f"{option} {output}: exists and is not a result of this command; remove it or choose another {option}"
        )
    return Path(output)


def safe_name(name: str, what: str) -> str:
    """``name`` if it can name one folder or file inside another (letters, digits and ``._+=@-``, not
    starting with a dot); else a one-line error naming ``what``."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise CCError(
            f"{what} {name!r}: use letters, digits and . _ + = @ - only, not starting with a dot "
            "(it names a folder and may not climb out of its parent)"
        )
    return name
