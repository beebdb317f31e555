"""``--device`` of the inference commands (fit-matrix, generate, eval, eval --nll) and the
experiment's stages: what ``auto`` resolves to, and one-line errors for devices that are not here."""

import pytest
import torch

from cctuning.errors import CCError
from cctuning.loading import DEVICE_ENV, load_for_inference, resolve_device


def test_auto_is_the_environment_else_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device wins over the variable


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "name, message",
    [
        ("cuda", "--device cuda: torch sees no CUDA device here"),
        ("cuda:1", "--device cuda:1: torch sees no CUDA device here"),
        ("gpu", "--device: unknown device 'gpu'"),
    ],
)
def test_devices_that_are_not_here_are_one_line_errors(name, message, monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    with pytest.raises(CCError, match=message):
        resolve_device(name)
    monkeypatch.setenv(DEVICE_ENV, name)  # the variable is checked the same way
    with pytest.raises(CCError, match="torch sees no CUDA|unknown device"):
        resolve_device("auto")


def test_a_bad_device_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    with pytest.raises(CCError, match="unknown device 'tpu9'"):
        load_for_inference(str(tmp_path / "no-such-model"), device="tpu9")


def test_the_cli_flag_reaches_the_loader(base_dir, capsys, monkeypatch):
    from cctuning.cli import main

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert main(["generate", "--model", str(base_dir), "--prompt", "hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--model", str(base_dir), "--prompt", "hi", "--device", "quantum"]) != 0
    assert "--device: unknown device 'quantum'" in capsys.readouterr().err


def test_inference_dtype_and_autocast_flags(tokenizer, tmp_path, monkeypatch, capsys):
    """``eval --nll --dtype bfloat16`` loads bf16 weights, ``--bf16`` runs under bf16 autocast; both
    stay within bf16 rounding of the float32 run of the same connected model, and neither equals
    it exactly (so each flag did something)."""
    import json

    from cctuning.cli import main
    from tests.conftest import connected_model, make_records, write_jsonl

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    folder = tmp_path / "model"
    connected_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "held.jsonl", make_records(6))
    nll = {}
    for name, extra in (("fp32", []), ("bf16-weights", ["--dtype", "bfloat16"]), ("autocast", ["--bf16"])):
        out = tmp_path / name
        args = ["eval", "--model", str(folder), "--nll", str(data), "--connection", "transform",
                "--output", str(out), "--batch-size", "3", *extra]  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
        nll[name] = json.loads((out / "nll.json").read_text())["nll"]["all"]["nll"]
    capsys.readouterr()
    for name in ("bf16-weights", "autocast"):
        assert nll[name] != nll["fp32"]
        assert abs(nll[name] - nll["fp32"]) < 0.02 * nll["fp32"], nll
    model, _, _ = load_for_inference(str(folder), dtype="bfloat16", device="cpu")
    assert model.base.get_input_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(CCError, match="--dtype: expected float32, bfloat16 or float16, got 'int8'"):
        load_for_inference(str(folder), dtype="int8", device="cpu")
