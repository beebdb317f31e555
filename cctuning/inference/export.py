"""``cctuning export``: a trained run as a self-contained folder for serving or sharing.

What goes in: the model (full weights; for a LoRA run with ``merge_lora`` the adapter merged into the
base weights by PEFT's ``merge_and_unload``, else the adapter itself), the tokenizer files as they are,
the Decision Maker with its fusion gates, the Transform Matrix (re-stamped with the Decision Maker it
belongs to) and ``cctuning_config.json`` with the base model recorded portably
(:mod:`cctuning.model.baseref`) and an ``export`` entry saying where it came from. Checkpoints, eval
results, logs and the Trainer's pickles stay behind.

A LoRA run exported without ``merge_lora`` is an adapter folder: small, and still in need of its base
model, which it records (absolute and relative to the export, preset name, fingerprint).

The export is built in a hidden sibling of the output folder and moved in by rename once complete;
while the files move the folder holds the incomplete-save marker, which loaders refuse. The run is
read under a shared lock (``train`` and ``fit-matrix``, which write it, are refused meanwhile) and the
output folder written under an exclusive one. The output is never the run, its base (LoRA or the base
a run with full weights was trained from) or inside them (:func:`cctuning.guard.check_output`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cctuning.errors import CCError
from cctuning.guard import check_output
from cctuning.io import (
    INCOMPLETE_MARKER,
    LOCK_NAME,
    check_output_folder,
    folder_lock,
    is_incomplete,
    open_modes,
    write_json,
    write_text,
)
from cctuning.loading import TOKENIZER_FILES, lora_base_path, model_inputs, resolve_model_path
from cctuning.model.ccmodel import CONFIG_NAME, CCConfig, CCModel
from cctuning.model.lora import ADAPTER_CONFIG_NAME

logger = logging.getLogger(__name__)

# what makes a folder a model folder, which --overwrite may replace (a typo must not empty a home)
MODEL_MARKERS = ("config.json", ADAPTER_CONFIG_NAME, CONFIG_NAME, INCOMPLETE_MARKER)
KINDS = ("full", "merged", "adapter")


@dataclass
class ExportResult:
    """What :func:`export_model` wrote. ``kind``: ``full`` (a run with full weights, or a plain model),
    ``merged`` (a LoRA run merged into its base) or ``adapter`` (a LoRA run as an adapter, which still
    loads its base: ``base_model``)."""

    output: Path
    kind: str
    method: str
    files: list[str] = field(default_factory=list)
    base_model: str | None = None
    merge_ignored: bool = False  # merge_lora asked of a run that has no adapter


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_paths(source: Path, output: Path, overwrite: bool, base: str | None = None) -> None:
    """Refuse an output that is the run or inside it, a non-empty output without ``overwrite``, and
    with ``overwrite`` anything but a model folder, or one that holds the run or its base."""
    src, out = source.resolve(), output.resolve()
    if _inside(out, src):
        raise CCError(f"--output {output} is the model folder or inside it; choose a folder outside {source}")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if not entries:
        return
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        raise CCError(
            f"--output {output} is not empty ({listed}); choose a new or empty folder, or --overwrite to "
            "replace an earlier export"
        )
    for held, what in ((src, "the model folder"), (Path(base).resolve() if base else None, "its base model")):
        if held is not None and _inside(held, out):
            raise CCError(
                f"--output {output} holds {what}; --overwrite would delete it, choose another folder"
            )
    if not any((out / name).exists() for name in MODEL_MARKERS):
        raise CCError(
            f"--output {output} holds files that are not a model folder ({listed}); --overwrite replaces "
            "only an earlier export, choose a new or empty folder"
        )


def _merged(cc: CCModel) -> CCModel:
    """A CCModel on the LoRA-merged base, with the same Decision Maker, gates and Transform Matrix."""
    merged = CCModel(cc.base.merge_and_unload(), cc.cc_config)
    cc.hooks.remove()  # the decoder layers are shared with the new model: its hooks only
    if cc.decision_maker is not None:
        merged.decision_maker.load_state_dict(cc.decision_maker.state_dict())
        merged.fusion.load_state_dict(cc.fusion.state_dict())
        merged.decision_maker_sha256 = cc.decision_maker_sha256
        merged.set_transform(cc.transform)
    merged.eval()
    return merged


def _copy_tokenizer(sources: list[Path], stage: Path) -> list[str]:
    for source in sources:
        found = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        if found:
            for name in found:
                shutil.copy2(source / name, stage / name)
            return found
    logger.warning("no tokenizer files in %s: the export has none", ", ".join(map(str, sources)))
    return []


def _publish(stage: Path, output: Path) -> None:
    """Move the built files into the (locked) output folder: the incomplete-save marker first, then an
    earlier export's files out, the new ones in by rename, the marker last."""
    write_text(output / INCOMPLETE_MARKER, "an interrupted export left this folder incomplete\n")
    for old in output.iterdir():
        if old.name in (LOCK_NAME, INCOMPLETE_MARKER):
            continue
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    open_modes(stage)  # copied tokenizer files keep their source's modes; give them open()'s
    for item in sorted(stage.iterdir()):
        os.replace(item, output / item.name)
    os.unlink(output / INCOMPLETE_MARKER)


def _stage_prefix(output: Path) -> str:
    return f".{output.name}.export-"


def _remove_abandoned_stages(output: Path) -> None:
    """Stages a killed export left beside ``output`` (only the holder of its lock makes them)."""
    for stale in output.parent.glob(glob.escape(_stage_prefix(output)) + "*"):
        if stale.is_dir():
            logger.info("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)


def export_model(
    model: str | Path,
    output: str | Path,
    merge_lora: bool = False,
    overwrite: bool = False,
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export the run ``model`` (a folder or preset name) into ``output`` (see the module docstring).

    ``base_model`` (a folder or preset name) replaces the base a LoRA run records, for a run whose base
    has moved. ``output`` must be new or empty; ``overwrite`` replaces an earlier export (a model
    folder), never the run, its base or a folder of other files."""
    source = Path(resolve_model_path(str(model)))
    output = Path(output)
    if is_incomplete(source):
        raise CCError(f"{source}: an interrupted save left this folder incomplete; save it again first")
    check_export_paths(source, output, overwrite)
    # never over the run's base either (a run with full weights records the base it was trained from)
    check_output(output, {**model_inputs(str(source)), "--base-model": base_model}, folder=True)
    check_output_folder(output)
    # the run read under a shared lock (train and fit-matrix write it under an exclusive one)
    with folder_lock(source, "cctuning export", shared=True), folder_lock(output, "cctuning export"):
        base = lora_base_path(source, base_model)
        check_export_paths(source, output, overwrite, base)  # again, under the lock and with the base
        _remove_abandoned_stages(output)
        stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(output), dir=output.parent))
        try:
            kind, method, merge_ignored = _build(source, stage, base, merge_lora, trust_remote_code)
            _publish(stage, output)
        except OSError as err:  # a full disk while building: named as the output, not the hidden stage
            name = Path(err.filename) if err.filename else None
            if name is None or not (name == stage or stage in name.parents):
                raise
            raise OSError(err.errno, err.strerror, str(output / name.relative_to(stage))) from err
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    logger.info("exported %s (%s) to %s", source, kind, output)
    saved = CCConfig.load(output / CONFIG_NAME)
    return ExportResult(
        output=output,
        kind=kind,
        method=method,
        files=sorted(p.name for p in output.iterdir() if not p.name.startswith(".")),
        base_model=saved.base_model if kind == "adapter" else None,
        merge_ignored=merge_ignored,
    )


def _build(
    source: Path, stage: Path, base: str | None, merge_lora: bool, trust_remote_code: bool
) -> tuple[str, str, bool]:
    """Load the run, merge its adapter when asked, save it and its tokenizer into ``stage``;
    ``(kind, method, whether merge_lora was asked of a run without adapter)``."""
    cc = CCModel.from_pretrained(source, dtype="auto", trust_remote_code=trust_remote_code, base_model=base)
    lora = cc.uses_lora
    kind = "full" if not lora else "merged" if merge_lora else "adapter"
    if kind == "merged":
        cc = _merged(cc)
    cc.save_pretrained(stage)
    _copy_tokenizer([source] + ([Path(base)] if base else []), stage)
    if kind == "adapter":  # PEFT's own loaders (AutoModelForCausalLM, AutoPeftModel) read the base here
        adapter_config = json.loads((stage / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = str(Path(base).resolve())
        write_json(stage / ADAPTER_CONFIG_NAME, adapter_config)
    config = json.loads((stage / CONFIG_NAME).read_text(encoding="utf-8"))
    config["export"] = {
        "source": str(source.resolve()),
        "kind": kind,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(stage / CONFIG_NAME, config)
    return kind, cc.cc_config.method, merge_lora and not lora
