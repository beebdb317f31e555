"""The multi-seed experiment grid on a tiny model."""

import json
import math
from pathlib import Path

import pytest

from cctuning.errors import CCError
from cctuning.experiment import _train_key, load_config, mean_interval, run_experiment


def test_mean_interval_by_hand():
    m = mean_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) × sd / √n
    assert m["mean"] == 2.0 and math.isclose(m["ci_low"], 2 - half) and math.isclose(m["ci_high"], 2 + half)
    assert mean_interval([5.0]) == {"mean": 5.0, "ci_low": None, "ci_high": None, "n": 1}


def test_config_errors_name_the_file_and_option(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("cells:\n  - name: a\n    metod: cc\n")
    with pytest.raises(CCError, match="e.yaml: cell 'a': unknown option 'metod'"):
        load_config(path)
    path.write_text("cells: []\n")
    with pytest.raises(CCError, match="'cells' is empty"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("seeds: [1, x]\ncells: [{name: a}]\n", "option 'seeds': expected int, got 'x'"),
        ("seeds: 3\ncells: [{name: a}]\n", "option 'seeds': expected a non-empty list"),
        ("train_per_lang: many\ncells: [{name: a}]\n", "option 'train_per_lang': expected int"),
        ("train: {max_steps: ten}\ncells: [{name: a}]\n", "train: option 'max_steps': expected int"),
        ("cells: [{name: a, lr: fast}]\n", "cell 'a': option 'lr': expected float"),
        ("cells: [{name: a, connection: french}]\n", "cell 'a': option 'connection': expected one of"),
        ("cells: [{name: a}]\nbenchmarks: {names: XNLI, limt: 3}\n", "benchmarks: unknown option 'limt'"),
        ("cells: [{name: a}]\nbenchmarks: {names: 'XNLI,GSM8K'}\n", "unknown benchmark 'GSM8K'"),
        (
            "cells: [{name: a}]\nbenchmarks: {names: XNLI, scoring: exact}\n",
            "expected generate or likelihood",
        ),
        ("cells: [{name: a}]\nbenchmarks: {names: XNLI, limit: 2.5}\n", "option 'limit': expected int"),
        ("cells: [{name: a}]\nbenchmarks: {names: XNLI, limits: 3}\n", "option 'limits': expected dict"),
        (
            "cells: [{name: a}]\nbenchmarks: {names: XNLI, limits: {GSM8K: 2}}\n",
            "option 'limits': unknown benchmark 'GSM8K'",
        ),
        (
            "cells: [{name: a}]\nbenchmarks: {names: XNLI, limits: {XNLI: many}}\n",
            "option 'limits': 'XNLI': expected int",
        ),
        ("heldout_seed: x\ncells: [{name: a}]\n", "option 'heldout_seed': expected int"),
    ],
)
def test_bad_values_fail_at_load_time(tmp_path, text, message):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    with pytest.raises(CCError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_per_benchmark_limits_override_the_limit(tmp_path):
    from cctuning.eval.runner import EvalConfig
    from cctuning.experiment import bench_config

    ecfg = EvalConfig(model="m", limit=4, limits={"xl-sum": 2})
    assert ecfg.limit_for("XLSum") == 2 and ecfg.limit_for("xnli") == 4
    assert EvalConfig(model="m").limit_for("XNLI") is None
    path = tmp_path / "e.yaml"
    path.write_text("cells: [{name: a}]\nbenchmarks: {names: 'XNLI,XLSum', limit: 4, limits: {xlsum: 2}}\n")
    cfg = load_config(path)
    assert cfg.heldout_seed == 0  # the default: existing experiments keep their held-out sample
    ecfg = bench_config(cfg, "m", "none", tmp_path / "out", 1)
    assert (ecfg.limit_for("XNLI"), ecfg.limit_for("XL-Sum")) == (4, 2)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("experiment_*.yaml")))
def test_shipped_experiment_configs_load(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.cells and len(cfg.seeds) >= 1


def test_oracle_config_reuses_the_main_experiment():
    """experiment_smollm2_oracle.yaml claims to reuse every training and evaluation of
    experiment_smollm2.yaml: same output, data, budget and seeds, and the same cells plus one."""
    main = load_config(EXAMPLES / "experiment_smollm2.yaml")
    oracle = load_config(EXAMPLES / "experiment_smollm2_oracle.yaml")
    for key in (
        "output",
        "seeds",
        "train_per_lang",
        "heldout_per_lang",
        "langs",
        "matrix_samples",
        "benchmarks",
    ):
        assert getattr(main, key) == getattr(oracle, key), key
    assert _train_key(main.train) == _train_key(oracle.train)
    assert oracle.cells[: len(main.cells)] == main.cells
    assert [c["connection"] for c in oracle.cells[len(main.cells) :]] == ["english"]


def test_shipped_train_and_demo_configs_load():
    from cctuning.config import build_config
    from cctuning.demo import DemoConfig
    from cctuning.training import TrainConfig

    lora = build_config(TrainConfig, str(EXAMPLES / "train_lora.yaml"), {})
    assert lora.lora_r == 16 and lora.method == "cc"
    demo = build_config(DemoConfig, str(EXAMPLES / "demo_full.yaml"), {})
    assert demo.max_steps == 200


@pytest.mark.slow
def test_two_cell_one_seed_experiment_end_to_end(base_dir, tmp_path, monkeypatch):
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
model: {base_dir}
output: {tmp_path / "exp"}
seeds: [7]
train_per_lang: 1
heldout_per_lang: 1
langs: sw,zh,ar
matrix_samples: 4
train: {{max_steps: 2, batch_size: 2, lr: 1.0e-3, max_length: 128}}
cells:
  - {{name: sft, method: sft}}
  - {{name: cc, method: cc, connection: transform}}
  - {{name: cc-none, method: cc, connection: none}}
benchmarks: {{names: XStoryCloze, langs: "sw,en", limit: 5, limits: {{xstorycloze: 2}}, scoring: likelihood}}
""")
    report = run_experiment(load_config(path), progress=False)
    root = tmp_path / "exp"
    trainings = sorted(p.name for p in (root / "train").iterdir())
    assert len(trainings) == 2  # cc and cc-none share one training
    assert set(report["cells"]) == {"sft", "cc", "cc-none"}
    # the report's numbers are the runs' numbers
    sft_nll = json.loads((root / "eval" / "sft" / "seed7" / "nll" / "nll.json").read_text())["nll"]["all"][
        "nll"
    ]
    cc_nll = json.loads((root / "eval" / "cc" / "seed7" / "nll" / "nll.json").read_text())["nll"]["all"][
        "nll"
    ]
    assert report["cells"]["sft"]["nll"]["all"]["mean"] == sft_nll
    assert math.isclose(
        report["cells"]["cc"]["nll_diff_to_baseline"]["all"]["mean"], cc_nll - sft_nll, rel_tol=1e-9
    )
    # one seed: the interval of the paired difference is the bootstrap over items of that seed's runs
    from cctuning.eval.nll import load_items, paired_difference

    by_items = paired_difference(
        load_items(root / "eval" / "cc" / "seed7" / "nll"),
        load_items(root / "eval" / "sft" / "seed7" / "nll"),
        seed=7,
    )["all"]
    diff = report["cells"]["cc"]["nll_diff_to_baseline"]["all"]
    assert (diff["ci_low"], diff["ci_high"]) == (by_items["ci_low"], by_items["ci_high"])
    assert diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    assert "bootstrap over items" in (root / "report.md").read_text()
    assert "XStoryCloze" in report["cells"]["cc"]["benchmarks"]
    # the per-benchmark limit overrides the limit
    bench = json.loads((root / "eval" / "cc" / "seed7" / "bench" / "results.json").read_text())
    assert [v["n"] for v in bench["benchmarks"]["XStoryCloze"]["per_language"].values()] == [2, 2]
    # the held-out sample is drawn with heldout_seed (default 0), whatever the training seed
    from cctuning.data.mix import sample_mix

    held = [json.loads(line) for line in (root / "data" / "seed7" / "heldout.jsonl").read_text().splitlines()]
    assert held == sample_mix("heldout", 1, ["sw", "zh", "ar"], 0)
    assert "| all |" in (root / "report.md").read_text()
    # every stage that ran has its time recorded, once
    stages = json.loads((root / "stages.json").read_text())
    assert sorted(k.split("/")[0] for k in stages) == sorted(
        ["train"] * 2 + ["matrix"] + ["nll"] * 3 + ["bench"] * 3
    )
    assert f"{sum(stages.values()) / 60:.1f} min" in (root / "report.md").read_text()
    # resumable: nothing is trained or evaluated again
    import cctuning.training.run

    monkeypatch.setattr(cctuning.training.run, "train", lambda *a, **k: pytest.fail("trained again"))
    again = run_experiment(load_config(path), progress=False)
    assert again["cells"] == report["cells"]
    assert again["stage_seconds"] == stages  # nothing ran again, so no stage was re-timed
