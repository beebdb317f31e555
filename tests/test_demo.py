"""The demo pipeline end to end on a tiny model, and its reuse of finished stages."""

import json

import pytest

import cctuning.training.run as run_module
from cctuning.data.mix import sample_mix
from cctuning.lab.demo import DemoConfig, experiment_config, run_demo
from cctuning.lab.experiment import resolve_cells

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
def test_demo_runs_end_to_end_and_reuses_finished_stages(base_dir, tmp_path, monkeypatch, capsys):
    cfg = DemoConfig(model=str(base_dir), output=str(tmp_path / "demo"), **TINY)
    table, report_dir = run_demo(cfg)
    root = tmp_path / "demo"
    cc_train = [c for c in resolve_cells(experiment_config(cfg)) if c.name == "cc"][0].train_name
    assert (root / "train" / cc_train / "seed42" / "transform_matrix.safetensors").is_file()
    sft = json.loads((root / "eval" / "sft" / "seed42" / "bench" / "results.json").read_text())
    cc = json.loads((root / "eval" / "cc" / "seed42" / "bench" / "results.json").read_text())
    assert cc["connection"] == "transform" and sft["method"] == "sft"
    assert set(cc["benchmarks"]) == {"XNLI", "MKQA"}
    xnli = 100 * sft["benchmarks"]["XNLI"]["average"]["accuracy"]
    assert f"| XNLI (accuracy) | {xnli:.1f} /" in table
    nll = json.loads((root / "eval" / "cc-none" / "seed42" / "nll" / "nll.json").read_text())
    assert f"{nll['nll']['all']['nll']:.3f}" in table
    assert (report_dir / "report.png").is_file() and (report_dir / "summary.md").read_text().strip() == table
    # the held-out sample is drawn with the demo's seed
    held = [
        json.loads(line) for line in (root / "data" / "seed42" / "heldout.jsonl").read_text().splitlines()
    ]
    assert held == sample_mix("heldout", 1, ["sw", "zh", "ar", "hi"], 42)
    # one timing mechanism: the experiment's stages.json, which the time line reads
    assert not (root / "timings.json").exists()
    stages = json.loads((root / "stages.json").read_text())
    assert sorted(k.split("/")[0] for k in stages) == sorted(
        ["train"] * 2 + ["matrix"] + ["nll"] * 3 + ["bench"] * 3
    )
    assert f"the stages took {sum(stages.values()) / 60:.1f} min" in table.split("\n")[-1]
    # a second run trains nothing and regenerates nothing
    import cctuning.training

    for module in (run_module, cctuning.training):
        monkeypatch.setattr(module, "train", lambda *a, **k: pytest.fail("trained again"))
    import cctuning.eval.runner as runner

    monkeypatch.setattr(runner, "_run_items", lambda *a, **k: pytest.fail("generated again"))
    table2, _ = run_demo(cfg)
    assert table2.split("\n")[:-1] == table.split("\n")[:-1]  # same numbers; only the timing line differs
    assert json.loads((root / "stages.json").read_text()) == stages  # nothing ran again
    # other settings over the same folder (here bf16, a CLI flag) stop before anything trains, in one
    # line that names the result and the setting: the float32 numbers are never shown as bf16 ones
    from cctuning.cli import main

    flags = [f for key, value in TINY.items() for f in (f"--{key.replace('_', '-')}", str(value))]
    capsys.readouterr()
    assert main(["demo", "--model", str(base_dir), "--output", str(root), "--bf16", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.options.bf16 was null, the config now gives true" in err, err
    nll_dir = root / "eval" / "sft" / "seed42" / "nll"
    assert err.startswith(f"cctuning: error: {nll_dir}: made with other settings"), err


def test_demo_is_an_experiment_preset():
    """The demo's budget as an experiment: one seed, three cells, the demo's limits and held-out seed."""
    cfg = DemoConfig(seed=7, eval_langs="all")
    exp = experiment_config(cfg)
    assert exp.seeds == [7] and exp.heldout_seed == 7 and exp.heldout_per_lang == cfg.nll_per_lang
    assert [(c.name, c.options["method"], c.connection) for c in resolve_cells(exp)] == [
        ("sft", "sft", "none"),
        ("cc", "cc", "transform"),
        ("cc-none", "cc", "none"),
    ]
    cells = resolve_cells(exp)
    assert (
        cells[1].train_name == cells[2].train_name != cells[0].train_name
    )  # cc and cc-none share a training
    assert exp.train == {
        "max_steps": 24,
        "batch_size": 4,
        "lr": 1e-4,
        "max_length": 128,
        "logging_steps": 4,
        "save_steps": 12,
        "save_total_limit": 1,
    }
    b = exp.benchmarks
    assert (b["limit"], b["limits"], b["max_new_tokens"]) == (4, {"XLSum": 2}, 40) and "langs" not in b
    assert b["names"] == "XNLI,XStoryCloze,MMMLU,XQuAD,MKQA,XLSum"


def test_demo_bf16_option_reaches_the_trainings_and_the_summary():
    """--bf16 trains under autocast and says so in the summary; off, the training keys are exactly
    the float32 demo's, so finished runs are reused."""
    from cctuning.lab.demo import summary_header

    plain, bf16 = experiment_config(DemoConfig()), experiment_config(DemoConfig(bf16=True))
    assert "bf16" not in plain.train and bf16.train == {**plain.train, "bf16": True}
    assert resolve_cells(plain)[0].train_name != resolve_cells(bf16)[0].train_name
    assert summary_header(DemoConfig(bf16=True)).endswith(" · trained under bf16 autocast")
    assert summary_header(DemoConfig(bf16=True)).startswith(summary_header(DemoConfig()))
    assert "bf16" not in summary_header(DemoConfig())
