"""scripts/gpu_check.py, checked on the CPU: what it refuses, how it reports, and (slow) every step
with ``--cpu`` (the plumbing; a GPU result needs a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line_and_exits_2(gpu_check, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--cpu" in err


def test_unknown_models_and_steps_are_refused(gpu_check, tmp_path):
    for flag in (["--models", "tiny,gpt5"], ["--steps", "tests,fly"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(["--out", str(tmp_path), *flag])
        assert exit_info.value.code == 2


def test_smollm2_without_its_package_is_skipped_with_the_reason(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "smollm2_folder", lambda: (None, "preset 'smollm2-135m' needs gguf"))
    args = gpu_check.parse_args(["--out", str(tmp_path), "--models", "smollm2-135m", "--quick"])
    (entry,) = gpu_check.step_train(args, gpu_check.child_env(True))
    assert entry["status"] == "skipped" and entry["detail"] == "preset 'smollm2-135m' needs gguf"
    _, (bench,) = gpu_check.step_bench(args, "cpu")
    assert bench["status"] == "skipped" and "needs gguf" in bench["detail"]


def test_the_table_names_the_device_and_every_step(gpu_check):
    results = {
        "date": "2026-11-26T00:00:00+00:00",
        "machine": {
            "device": "cuda",
            "device_name": "NVIDIA H100",
            "capability": "9.0",
            "memory_gb": 79.1,
            "cuda": "12.8",
            "torch": "2.13.0",
            "transformers": "5.23.0",
            "forced_cpu": False,
        },  # fmt: skip
        "steps": [
            {
                "name": "CUDA-marked tests (pytest -m cuda)",
                "status": "passed",
                "seconds": 12.0,
                "detail": "19 passed",
            },
            {
                "name": "train smollm2-135m (--bf16)",
                "status": "skipped",
                "seconds": 0,
                "detail": "no package",
            },
        ],
        "bench": {"matmul_peak_gflops": {"fp32": {"peak": 51000.0}, "bf16": {"peak": 700000.0}}},
    }
    text = gpu_check.table(results)
    assert "NVIDIA H100 (compute capability 9.0, 79.1 GB, CUDA 12.8)" in text
    assert "| CUDA-marked tests (pytest -m cuda) | passed | 12.0 | 19 passed |" in text
    assert "| train smollm2-135m (--bf16) | skipped | 0 | no package |" in text
    assert "fp32 51000; bf16 700000" in text


@pytest.mark.slow
def test_every_step_runs_on_the_cpu_with_cpu(tmp_path):
    """``--cpu --quick --models tiny``: the CUDA-marked tests run (on the CPU), two tiny trainings, the
    benchmark; the JSON and the table are written and nothing failed."""
    out = tmp_path / "check"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--quick", "--models", "tiny", "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["machine"]["device"] == "cpu" and results["machine"]["forced_cpu"]
    steps = {s["name"]: s for s in results["steps"]}
    tests = steps["CUDA-marked tests (pytest -m cuda)"]
    assert tests["status"] == "passed" and tests["counts"]["skipped"] == 0 and tests["counts"]["tests"] >= 10
    trained = [s for name, s in steps.items() if name.startswith("train tiny")]
    assert len(trained) == 2 and all(s["status"] == "passed" for s in trained)
    assert all(0 < s["train_loss"] < 10 for s in trained)
    assert steps["bench tiny"]["status"] == "passed"
    bench = results["bench"]["models"]["tiny"]
    assert set(bench["flops"]["paths"]) == {"nll-none", "nll-transform", "likelihood", "generate"}
    assert bench["precision"]["nll"]["same_layers"]
    assert (out / "gpu_check.md").read_text() in proc.stdout


def test_attention_flops_of_grouped_query_kernels():
    """The CUDA attention kernels see fewer key/value heads than query heads (grouped-query
    attention); torch 2.11's formula refused those shapes on an H200, ours counts per query head."""
    import torch

    from bench.flops import ATTENTION_KERNELS, _sdpa_flops

    q, k, v = (2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16)
    assert _sdpa_flops(q, k, v) == 2 * (2 * 8) * 5 * 7 * (16 + 16)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"):
        assert name in ATTENTION_KERNELS and hasattr(torch.ops.aten, name)
