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


def check_output(
    output: str | Path,
    inputs: Mapping[str, str | Path | None],
    *,
    option: str = "--output",
    own: Callable[[Path], bool] | None = None,
    inside: Mapping[str, Iterable[str]] | None = None,
) -> Path:
    """Refuse ``output`` where writing it could destroy an input (see the module's docstring).

    ``inputs`` maps an option (``--model``, ``--data``, ``base model``) to its path; values that are
    not paths on disk are skipped. ``own(path)`` says whether an existing file at ``output`` is this
    command's own result (then it may be replaced); without it any existing file is refused.
    ``inside`` maps an input's option to the places inside it (relative paths) where the command
    keeps its own results. Returns ``output`` as given, as a :class:`Path`."""
    out = _resolved(output)
    inside = inside or {}
    for label, path in _existing_inputs(inputs):
        if out == path:
            raise CCError(f"{option} {output}: is the input {label} {path}; choose another {option}")
        if _is_within(path, out):
            raise CCError(
                f"{option} {output}: contains the input {label} {path}, which writing there could "
                f"destroy; choose another {option}"
            )
        if _is_within(out, path) and not _inside_allowed(out, path, inside.get(label, ())):
            raise CCError(
                f"{option} {output}: lies inside the input {label} {path}; choose a folder outside it"
            )
    if out.is_file() and not (own and own(out)):
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


def within(root: str | Path, path: str | Path, what: str) -> Path:
    """``path`` if it lies inside ``root`` once resolved; else a one-line error naming ``what``."""
    if not _is_within(_resolved(path), _resolved(root)):
        raise CCError(f"{what} {path}: lies outside {root}")
    return Path(path)
