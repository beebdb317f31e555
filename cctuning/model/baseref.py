"""Where a LoRA folder's base model is: recorded portably, found again after a move.

A LoRA folder holds only the adapter, so its base model is loaded from elsewhere. Before this
module the folder named its base by one absolute path, and a run moved to another directory or
machine no longer loaded. ``cctuning_config.json`` now records the base four ways (filled in by
:func:`record_base` on every :meth:`~cctuning.model.ccmodel.CCModel.save_pretrained`):

* ``base_model``: the folder (absolute) or the preset name, as before; an older folder has only this;
* ``base_model_relative``: the base folder relative to the saved folder, when the two share a folder
  other than the file system root, so a project copied or moved as a whole keeps working;
* ``base_model_id``: the preset name when known (read from the base folder's preset record), else a
  name given at training time;
* ``base_model_fingerprint``: a fingerprint of the base's ``config.json`` and weight files
  (:func:`weights_fingerprint`), checked when the base is found, so another model that happens to sit
  at one of those places is never used silently.

:func:`find_base` tries them in that order; names (presets) are resolved by the caller's
``resolve_name`` (the loading layer), and a base that cannot be found is a one-line error naming what
was recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cctuning.errors import CCError
from cctuning.model.lora import ADAPTER_CONFIG_NAME

logger = logging.getLogger(__name__)

PRESET_RECORD_NAME = "cctuning_preset.json"  # written by cctuning.presets into a converted folder
# bytes read per weight file: a file up to SAMPLES * SAMPLE_BYTES is hashed whole, a larger one at
# SAMPLES evenly spaced places (its first sample holds the safetensors header: every tensor's name,
# dtype, shape and offset)
SAMPLES = 8
SAMPLE_BYTES = 1 << 20


def _is_weight_file(name: str) -> bool:
    if name == "config.json":
        return True
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".json"))


def weights_fingerprint(folder: str | Path) -> str | None:
    """A sha256 over ``config.json`` and the weight files of a model folder (``model*.safetensors``,
    their index, ``pytorch_model*.bin``): each file's name and size, and its bytes, whole up to 8 MiB
    and otherwise 8 samples of 1 MiB (so a 15 GB model costs a few dozen MiB of reads, not a full
    pass). It tells another model, size, dtype, quantization or a fine-tune of the whole model from the
    base; it is not a full checksum. Content only: a copy on another machine has the same one.
    None for a folder without such files."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_weight_file(p.name))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\n".encode())
        with open(path, "rb") as fh:
            if size <= SAMPLES * SAMPLE_BYTES:
                digest.update(fh.read())
                continue
            for i in range(SAMPLES):
                fh.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def near_relative(target: str | Path, folder: str | Path) -> str | None:
    """``target`` relative to ``folder`` when the two share a folder other than the file system root
    (a path that climbs to ``/`` says nothing a moved copy could use); else None."""
    target, folder = Path(target).resolve(), Path(folder).resolve()
    common = Path(os.path.commonpath([target, folder]))
    if common == Path(common.anchor):
        return None
    return Path(os.path.relpath(target, folder)).as_posix()


def preset_name(folder: str | Path) -> str | None:
    """The preset a converted folder was made from (its record), or None."""
    try:
        record = json.loads((Path(folder) / PRESET_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = record.get("preset") if isinstance(record, dict) else None
    return name if isinstance(name, str) and name else None


def record_base(cc_config, folder: str | Path, loaded_from: str | Path | None) -> None:
    """Fill the portable fields of ``cc_config`` for a save into ``folder``.

    ``loaded_from``: the folder the base weights of a LoRA model were loaded from (None for a model
    with full weights, or a base built in memory). For a LoRA model it becomes ``base_model`` (a preset
    name stays a name), and its fingerprint is taken once, the first time, so that every later save
    keeps the one of the base the adapter was trained on. The relative path is computed anew for each
    folder saved into."""
    here = Path(loaded_from).resolve() if loaded_from and Path(loaded_from).is_dir() else None
    ref = cc_config.base_model
    if ref and not os.path.isabs(ref) and Path(ref).is_dir():  # a folder given relative to the cwd
        cc_config.base_model = ref = str(Path(ref).resolve())
    if here is not None:
        if not ref or os.path.isabs(ref):
            cc_config.base_model = ref = str(here)
        if cc_config.base_model_fingerprint is None:
            cc_config.base_model_fingerprint = weights_fingerprint(here)
    base_dir = Path(ref) if ref and os.path.isabs(ref) and Path(ref).is_dir() else None
    cc_config.base_model_relative = near_relative(base_dir, folder) if base_dir is not None else None
    if cc_config.base_model_id is None:
        known = here or base_dir
        cc_config.base_model_id = (preset_name(known) if known else None) or (
            ref if ref and not os.path.isabs(ref) else None
        )


def _peft_base(folder: Path) -> str | None:
    try:
        value = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def describe(folder: str | Path, cc_config) -> str:
    """What a folder records about its base, for error messages: ``'/abs/base', '../base' relative to
    the folder, preset 'name'``."""
    folder = Path(folder)
    parts = []
    ref = cc_config.base_model or _peft_base(folder)
    if ref:
        parts.append(f"'{ref}'")
    if cc_config.base_model_relative:
        parts.append(f"'{cc_config.base_model_relative}' relative to the folder")
    if cc_config.base_model_id and cc_config.base_model_id != ref:
        parts.append(f"'{cc_config.base_model_id}'")
    return ", ".join(parts)


def find_base(
    folder: str | Path,
    cc_config,
    given: str | Path | None = None,
    resolve_name: Callable[[str], str] | None = None,
) -> str:
    """The base model folder of the LoRA folder ``folder``.

    ``given`` (a folder) wins; a fingerprint that differs from the recorded one is then only logged.
    Otherwise the first of: the recorded absolute folder, the relative one (against ``folder``), PEFT's
    ``base_model_name_or_path`` when it is a folder, then the names (preset, id) through ``resolve_name``
    (without it, a name is tried as a folder relative to the working directory). A folder whose
    fingerprint differs from the recorded one is passed over. Nothing found is a one-line
    :class:`CCError` naming what was recorded."""
    folder = Path(folder)
    expected = cc_config.base_model_fingerprint
    if given is not None:
        return _given_base(folder, given, expected)
    paths, names = _recorded_bases(folder, cc_config)
    mismatched: list[str] = []
    resolve_errors: list[str] = []
    found = _first_base(paths, names, resolve_name, expected, mismatched, resolve_errors)
    if found is not None:
        return found
    what = f"{folder}: base model of the LoRA adapter"
    if mismatched:
        raise CCError(
            f"{what}: '{mismatched[0]}' holds other weights than the base the adapter was trained on "
            "(weights fingerprint differs); pass base_model=PATH (cctuning export --base-model PATH) to "
            "use a base anyway"
        )
    hint = (
        "load with cctuning.loading.load_for_inference to resolve a preset name, or pass base_model=PATH"
        if names and resolve_name is None
        else "put it back, or pass base_model=PATH (cctuning export --base-model PATH)"
    )
    detail = f" ({resolve_errors[0]})" if resolve_errors else ""
    raise CCError(f"{what} not found: recorded {describe(folder, cc_config)}{detail}; {hint}")


def _given_base(folder: Path, given: str | Path, expected: str | None) -> str:
    """The base folder the caller gave: it must exist; other weights than recorded are only logged."""
    if not Path(given).is_dir():
        raise CCError(f"{folder}: base model of the LoRA adapter: model folder '{given}' does not exist")
    if expected and weights_fingerprint(given) != expected:
        logger.warning(
            "%s: the base model given (%s) is not the one the adapter was trained on (its weights "
            "fingerprint differs); using it as asked",
            folder,
            given,
        )
    return str(given)


def _recorded_bases(folder: Path, cc_config) -> tuple[list[str], list[str]]:
    """The folders (the first absolute one, the relative one, the other absolute ones) and the names
    that ``folder`` records for its base, in the order they are tried."""
    recorded = [r for r in (cc_config.base_model, _peft_base(folder)) if r]
    if not recorded and not cc_config.base_model_relative:
        raise CCError(f"{folder}: a LoRA folder that does not name its base model; pass base_model=PATH")
    relative = cc_config.base_model_relative
    absolute = [r for r in recorded if os.path.isabs(r)]
    paths = absolute[:1] + ([os.path.normpath(folder / relative)] if relative else []) + absolute[1:]
    names = [n for n in (cc_config.base_model_id, *recorded) if n and not os.path.isabs(n)]
    return paths, names


def _first_base(
    paths: list[str],
    names: list[str],
    resolve_name: Callable[[str], str] | None,
    expected: str | None,
    mismatched: list[str],
    resolve_errors: list[str],
) -> str | None:
    """The first of ``paths``, then ``names``, that is a folder with the ``expected`` fingerprint;
    the folders passed over for their weights go to ``mismatched``, the names that did not resolve
    to ``resolve_errors``."""

    def verified(path: str) -> bool:
        if expected and weights_fingerprint(path) != expected:
            mismatched.append(path)
            return False
        return True

    for path in dict.fromkeys(paths):
        if Path(path).is_dir() and verified(path):
            return str(path)
    for name in dict.fromkeys(names):
        if resolve_name is None:
            if Path(name).is_dir() and verified(name):
                return name
            continue
        try:
            path = resolve_name(name)
        except CCError as err:
            resolve_errors.append(str(err))
            continue
        if verified(path):
            return str(path)
    return None
