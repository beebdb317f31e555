"""Resolve a model argument (folder or preset) and load its tokenizer or the whole CCModel."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cctuning.errors import CCError, first_line
from cctuning.model.baseref import find_base
from cctuning.model.ccmodel import CONFIG_NAME, CCConfig, CCModel
from cctuning.model.lora import ADAPTER_CONFIG_NAME
from cctuning.presets import PRESETS, preset_dir, resolve_model

#: the files of a tokenizer (those present are saved with a run, and copied byte for byte by export)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def resolve_model_path(name_or_path: str) -> str:
    """A folder as is; a preset name through :mod:`cctuning.presets` (anything else: a one-line error)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    return resolve_model(name_or_path)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The folder's tokenizer; a missing pad token falls back to eos (never a new token id)."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise CCError(f"cannot load a tokenizer from '{path}': {first}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CCError(f"the tokenizer in '{path}' has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def lora_base_path(folder: str | Path, base_model: str | None = None) -> str | None:
    """The resolved base model folder of a LoRA run (None for a folder with full weights): the
    model records its base as a folder (absolute and relative to the run) or a preset name, which only
    this layer can resolve, and a weights fingerprint (:func:`~cctuning.model.baseref.find_base`).
    ``base_model`` (a folder or preset name) overrides the record."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = (
        CCConfig.load(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else CCConfig(method="none")
    )
    given = resolve_model_path(base_model) if base_model else None
    return find_base(folder, config, given=given, resolve_name=resolve_model_path)


def recorded_bases(folder: str | Path) -> list[str]:
    """The base model folders a run records, those on disk: a LoRA run's base (as it loads) and the
    base a run with full weights was trained from (``base_model`` of its ``cctuning_config.json``:
    absolute, relative to the run, or a preset's folder in the cache). For the output guard
    (:func:`cctuning.guard.check_output`): a command may never write over them."""
    folder = Path(folder)
    try:
        config = CCConfig.load(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    except (CCError, OSError, ValueError):
        config = None
    found: list[str] = []
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        with contextlib.suppress(CCError):  # a base not found: loading names it later, in one line
            found.append(str(lora_base_path(folder)))
    if config is not None:
        ref, relative = config.base_model, config.base_model_relative
        if ref and os.path.isabs(ref):
            found.append(ref)
        elif ref and ref in PRESETS:
            found.append(str(preset_dir(ref)))
        if relative:
            found.append(os.path.normpath(folder / relative))
    return [b for b in dict.fromkeys(found) if Path(b).is_dir()]


def model_inputs(model: str, option: str = "--model") -> dict[str, str]:
    """``{option: model, "--model's base": ...}``: the model folder and the bases it records
    (:func:`recorded_bases`), as the inputs of :func:`cctuning.guard.check_output`. A preset name
    is its folder in the cache; a name that is no folder is left to the loader to report."""
    path = model if Path(model).is_dir() else None
    if path is None and model in PRESETS:
        path = str(preset_dir(model))
    if path is None:
        return {option: model}
    bases = recorded_bases(path)
    labels = [f"{option}'s base"] + [f"{option}'s base ({i})" for i in range(2, len(bases) + 1)]
    return {option: path, **dict(zip(labels, bases))}


#: environment variable naming the inference device when ``--device`` is not given
DEVICE_ENV = "CCTUNING_DEVICE"


def resolve_device(device: str | None = "auto"):
    """The torch device of the inference commands: ``auto`` (or None) is ``$CCTUNING_DEVICE`` when
    set, else the first CUDA device when there is one, else the CPU (as the Trainer chooses for
    training); ``cpu``, ``cuda``, ``cuda:N`` name one. A CUDA device on a machine without CUDA, or a
    name torch does not know, is a one-line error."""
    name = device or "auto"
    if name == "auto":
        name = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CCError(f"--device: unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CCError(f"--device {name}: torch sees no CUDA device here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CCError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu" and dev.type not in ("mps", "xpu"):
        raise CCError(f"--device: unsupported device '{name}' (use auto, cpu, cuda or cuda:N)")
    return dev


def load_for_inference(
    model: str,
    trust_remote_code: bool = False,
    dtype=None,
    load_transform: bool = True,
    device: str | None = "auto",
):
    """``(CCModel in eval mode on the device, tokenizer, folder)`` for a trained, SFT or plain HF
    model folder (``load_transform=False``: without its Transform Matrix, for refitting it);
    ``device``: see :func:`resolve_device`; ``dtype``: a torch dtype or its name (None: as saved)."""
    dev = resolve_device(device)  # a bad device fails before the model loads
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CCError(f"--dtype: expected float32, bfloat16 or float16, got '{dtype}'")
        dtype = getattr(torch, dtype)
    path = resolve_model_path(model)
    cc = CCModel.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        base_model=lora_base_path(path),
        load_transform=load_transform,
    )
    if dev.type != "cpu":
        cc.to(dev)
    return cc, load_tokenizer(path, trust_remote_code), path
