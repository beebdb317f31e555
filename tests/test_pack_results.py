"""scripts/pack_results.sh: what it packs (against a hand-written list), what it leaves out, and that
the archive restores the same bytes."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pack_results.sh"

FILES = {
    "runs/x/experiment_config.json": True,
    "runs/x/report.md": True,
    "runs/x/train/sft-ab/seed1/train_results.json": True,
    "runs/x/train/sft-ab/seed1/trainer_state.json": True,
    "runs/x/train/sft-ab/seed1/model.safetensors": False,
    "runs/x/train/sft-ab/seed1/tokenizer.json": False,
    "runs/x/train/sft-ab/seed1/tokenizer_config.json": False,
    "runs/x/train/sft-ab/seed1/vocab.json": False,
    "runs/x/train/sft-ab/seed1/checkpoint-40/trainer_state.json": False,
    "runs/x/train/cc-cd/seed1/transform_matrix.safetensors": "matrices",
    "runs/x/train/cc-cd/seed1/transform_matrix.json": True,
    "runs/x/eval/sft/seed1/nll/nll_items.jsonl": True,
    "runs/x/eval/sft/seed1/bench/results.csv": True,
    "runs/x/jobs/seed1-sft.log": True,
    "runs/x/data/seed1/train.jsonl": False,
}


def _tree(base: Path) -> None:
    for i, name in enumerate(FILES):
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name} {i}\n".encode())


def _pack(base: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "-C", str(base), *flags, "runs/x", str(out)], capture_output=True, text=True
    )


def test_packs_the_small_results_and_restores_them(tmp_path):
    base = tmp_path / "base"
    _tree(base)
    for flags, with_matrices in (((), False), (("--matrices",), True)):
        out = tmp_path / f"r{int(with_matrices)}.tgz"
        assert _pack(base, out, *flags).returncode == 0
        expected = sorted(
            n for n, keep in FILES.items() if keep is True or (keep == "matrices" and with_matrices)
        )
        with tarfile.open(out) as tar:
            assert sorted(m.name for m in tar.getmembers() if m.isfile()) == expected
            restored = tmp_path / f"restored{int(with_matrices)}"
            tar.extractall(restored, filter="data")
        for name in expected:
            assert (restored / name).read_bytes() == (base / name).read_bytes()
        assert not (tmp_path / f"{out.name}.part").exists()


def test_a_missing_folder_is_one_line(tmp_path):
    result = _pack(tmp_path, tmp_path / "r.tgz")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "runs/x: no such folder" in result.stderr and not (tmp_path / "r.tgz").exists()
