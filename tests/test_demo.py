"""The demo pipeline end to end on a tiny model, and its reuse of finished stages."""

import json

import pytest

import cctuning.training.run as run_module
from cctuning.data.mix import sample_mix
from cctuning.demo import DemoConfig, run_demo

TINY = dict(
    train_per_lang=1,
    langs="sw,zh,ar,hi",
    max_steps=2,
    batch_size=2,
    matrix_samples=8,
    benchmarks="XNLI,MKQA",
    eval_langs="en,sw,zh",
    eval_limit=1,
    xlsum_limit=1,
    max_new_tokens=3,
    eval_batch_size=4,
    nll_per_lang=1,
)


def test_sample_mix_is_stratified_and_deterministic():
    a = sample_mix("train", 3, ["sw", "zh"], seed=1)
    assert [r["lang"] for r in a] == ["sw"] * 3 + ["zh"] * 3
    assert a == sample_mix("train", 3, ["sw", "zh"], seed=1)
    assert a != sample_mix("train", 3, ["sw", "zh"], seed=2)
    held = sample_mix("heldout", 3, ["sw"], seed=1)
    assert {r["item"] for r in held}.isdisjoint({r["item"] for r in sample_mix("train", 200, ["sw"], 1)})


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_finished_stages(base_dir, tmp_path, monkeypatch):
    cfg = DemoConfig(model=str(base_dir), output=str(tmp_path / "demo"), **TINY)
    table, report_dir = run_demo(cfg)
    root = tmp_path / "demo"
    assert (root / "cc" / "transform_matrix.safetensors").is_file()
    sft = json.loads((root / "eval" / "sft-none" / "results.json").read_text())
    cc = json.loads((root / "eval" / "cc-transform" / "results.json").read_text())
    assert cc["connection"] == "transform" and sft["method"] == "sft"
    assert set(cc["benchmarks"]) == {"XNLI", "MKQA"}
    xnli = 100 * sft["benchmarks"]["XNLI"]["average"]["accuracy"]
    assert f"| XNLI (accuracy) | {xnli:.1f} /" in table
    nll = json.loads((root / "eval" / "cc-none-nll" / "nll.json").read_text())
    assert f"{nll['nll']['all']['nll']:.3f}" in table
    assert (report_dir / "report.png").is_file() and (report_dir / "summary.md").read_text().strip() == table
    # a second run trains nothing and regenerates nothing
    import cctuning.training

    for module in (run_module, cctuning.training):
        monkeypatch.setattr(module, "train", lambda *a, **k: pytest.fail("trained again"))
    import cctuning.eval.runner as runner

    monkeypatch.setattr(runner, "_run_items", lambda *a, **k: pytest.fail("generated again"))
    table2, _ = run_demo(cfg)
    assert table2.split("\n")[:-1] == table.split("\n")[:-1]  # same numbers; only the timing line differs
