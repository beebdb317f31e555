"""The multi-seed experiment grid on a tiny model."""

import json
import math
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from cctuning.errors import CCError
from cctuning.lab.experiment import load_config, run_experiment
from cctuning.lab.experiment.config import _train_key


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
        ("cells: [{name: a}]\nanswer_nll: {names: XQuAD, limt: 3}\n", "answer_nll: unknown option 'limt'"),
        ("cells: [{name: a}]\nanswer_nll: {limit: 3}\n", "answer_nll: 'names' is missing"),
        (
            "cells: [{name: a}]\nanswer_nll: {names: XNLI}\n",
            "answer_nll: option 'names': XNLI is multiple choice",
        ),
        (
            "cells: [{name: a}]\nanswer_nll: {names: GSM8K}\n",
            "answer_nll: option 'names': unknown benchmark 'GSM8K'",
        ),
        (
            "cells: [{name: a}]\nanswer_nll: {names: XQuAD, limit: 0}\n",
            "answer_nll: option 'limit': expected > 0",
        ),
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
    from cctuning.lab.experiment import bench_config

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
    from cctuning.lab.demo import DemoConfig
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
answer_nll: {{names: xquad, langs: "de,en", limit: 2}}
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
        ["train"] * 2 + ["matrix"] + ["nll"] * 3 + ["bench"] * 3 + ["answer-nll-XQuAD"] * 3
    )
    # stage by stage over the cells: trainings and held-out NLL first, generation last
    assert [k.rsplit("/", 1)[0] for k in stages] == [
        f"train/{_train_key_of(load_config(path), 'sft')}", "nll/sft",
        f"train/{_train_key_of(load_config(path), 'cc')}", f"matrix/{_train_key_of(load_config(path), 'cc')}",
        "nll/cc", "nll/cc-none",
        "answer-nll-XQuAD/sft", "answer-nll-XQuAD/cc", "answer-nll-XQuAD/cc-none",
        "bench/sft", "bench/cc", "bench/cc-none",
    ]  # fmt: skip
    # the answer likelihood is `eval --nll XQuAD --langs de,en --limit 2` of each cell's model with its
    # connection, and its paired difference is taken on the same items
    from cctuning.cli import main

    cc_run = root / "train" / next(p.name for p in (root / "train").iterdir() if p.name.startswith("cc-"))
    by_hand = tmp_path / "by-hand"
    assert main(["eval", "--model", str(cc_run / "seed7"), "--nll", "XQuAD", "--langs", "de,en", "--limit", "2",
                 "--connection", "transform", "--seed", "7", "--output", str(by_hand)]) == 0  # fmt: skip
    answers = {cell: root / "eval" / cell / "seed7" / "answer-nll-XQuAD" for cell in ("sft", "cc", "cc-none")}
    hand = json.loads((by_hand / "nll.json").read_text())["nll"]
    staged = json.loads((answers["cc"] / "nll.json").read_text())["nll"]
    assert set(staged) == {"de", "en", "all"} and staged["all"]["items"] == 4
    assert math.isclose(staged["all"]["nll"], hand["all"]["nll"], rel_tol=1e-5)
    xquad = report["cells"]["cc"]["answer_nll"]["XQuAD"]
    assert xquad["nll"]["all"]["mean"] == staged["all"]["nll"]
    direct = paired_difference(load_items(answers["cc"]), load_items(answers["sft"]), seed=7)["all"]
    got = xquad["diff"]["all"]
    assert (got["mean"], got["ci_low"], got["ci_high"]) == (
        direct["diff"],
        direct["ci_low"],
        direct["ci_high"],
    )
    assert "diff" not in report["cells"]["sft"]["answer_nll"]["XQuAD"]
    assert "XQuAD: NLL per token of the gold answers" in (root / "report.md").read_text()
    assert f"{sum(stages.values()) / 60:.1f} min" in (root / "report.md").read_text()
    # resumable: nothing is trained or evaluated again
    import cctuning.training.run

    monkeypatch.setattr(cctuning.training.run, "train", lambda *a, **k: pytest.fail("trained again"))
    again = run_experiment(load_config(path), progress=False)
    assert again["cells"] == report["cells"]
    assert again["stage_seconds"] == stages  # nothing ran again, so no stage was re-timed
    # its small results alone (scripts/pack_results.sh: no weights, no samples) finish it elsewhere
    packed, elsewhere = tmp_path / "small.tgz", tmp_path / "elsewhere"
    script = Path(__file__).resolve().parents[1] / "scripts" / "pack_results.sh"
    subprocess.run(["bash", str(script), "-C", str(tmp_path), "--matrices", "exp", str(packed)], check=True)
    with tarfile.open(packed) as tar:
        tar.extractall(elsewhere, filter="data")
    assert list(elsewhere.rglob("transform_matrix.safetensors")) and not list(
        elsewhere.rglob("model.safetensors")
    )
    moved = tmp_path / "moved.yaml"
    moved.write_text(path.read_text().replace(f"output: {root}", f"output: {elsewhere / 'exp'}"))
    import cctuning.lab.experiment.stages

    monkeypatch.setattr(
        cctuning.lab.experiment.stages, "load_for_inference", lambda *a, **k: pytest.fail("evaluated again")
    )
    restored = run_experiment(load_config(moved), progress=False)
    for cell, numbers in report["cells"].items():
        for key in ("nll", "nll_diff_to_baseline", "answer_nll", "benchmarks"):
            assert restored["cells"][cell].get(key) == numbers.get(key), (cell, key)
    monkeypatch.undo()
    monkeypatch.setattr(cctuning.training.run, "train", lambda *a, **k: pytest.fail("trained again"))

    # a result made with other settings is refused in one line naming it and the setting, before
    # anything runs or is written: the old numbers are never reported under a changed config
    from cctuning.errors import CCError
    from cctuning.lab.experiment import select_cells

    text = path.read_text()
    sidecars = sorted(root.rglob("experiment_settings.json")) + sorted(root.rglob("*.settings.json"))
    recorded = {p: p.read_text() for p in sidecars}
    assert len(recorded) == 2 + 2 + 1 + 3 * 3 + 1  # samples, trainings, matrix, 3 evaluations a cell, answers
    cc_train = next(p for p in (root / "train").iterdir() if p.name.startswith("cc-")) / "seed7"
    new_cell = "  - {name: cc-new, method: cc, connection: transform}\n"
    assert "connection: none}\n" in text

    def refused(old, new, mode="run"):
        """The one-line error of a run (``report``: --report-only; ``cell``: a new cell run alone, so that
        no finished evaluation is checked first) with ``old`` changed to ``new`` in the config."""
        changed = text.replace(old, new)
        if mode == "cell":
            changed = changed.replace("connection: none}\n", "connection: none}\n" + new_cell)
        path.write_text(changed)
        cfg = load_config(path)
        if mode == "cell":
            select_cells(cfg, ["cc-new"])
        with pytest.raises(CCError) as err:
            run_experiment(cfg, progress=False, report_only=mode == "report")
        assert "\n" not in str(err.value)
        return str(err.value)

    eval_sft, eval_ccnone = root / "eval" / "sft" / "seed7", root / "eval" / "cc-none" / "seed7"
    for old, new, where, said, mode in [
        # finished evaluations are checked before anything runs, and before a report
        ("heldout_per_lang: 1", "heldout_per_lang: 2", eval_sft / "nll", "heldout.heldout_per_lang was 1, the config now gives 2", "run"),
        ("train_per_lang: 1", "train_per_lang: 2", eval_sft / "nll", "training.data.train_per_lang was 1, the config now gives 2", "run"),
        ("max_steps: 2", "max_steps: 3", eval_sft / "nll", "training.options.max_steps was 2, the config now gives 3", "run"),
        ("matrix_samples: 4", "matrix_samples: 5", root / "eval" / "cc" / "seed7" / "nll", "matrix_samples was 4, the config now gives 5", "run"),
        ("connection: none}", "connection: english}", eval_ccnone / "nll", 'connection was "none", the config now gives "english"', "run"),
        ('langs: "de,en", limit: 2', 'langs: "de,en", limit: 3', eval_sft / "answer-nll-XQuAD", "answers.limit was 2, the config now gives 3", "run"),
        ("limit: 5,", "limit: 4,", eval_sft / "bench", "benchmarks.limit was 5, the config now gives 4", "run"),
        ("max_steps: 2", "max_steps: 3", eval_sft / "nll", "training.options.max_steps was 2, the config now gives 3", "report"),
        ('langs: "de,en", limit: 2', 'langs: "de,en", limit: 3', eval_sft / "answer-nll-XQuAD", "answers.limit was 2, the config now gives 3", "report"),
        # a new cell does not reuse the samples or the matrix made with other settings
        ("heldout_per_lang: 1", "heldout_per_lang: 2", root / "data" / "seed7" / "heldout.jsonl", "heldout_per_lang was 1, the config now gives 2", "cell"),
        ("train_per_lang: 1", "train_per_lang: 2", root / "data" / "seed7" / "train.jsonl", "train_per_lang was 1, the config now gives 2", "cell"),
        ("matrix_samples: 4", "matrix_samples: 5", cc_train / "transform_matrix.safetensors", "matrix_samples was 4, the config now gives 5", "cell"),
        ('langs: "de,en", limit: 2', 'langs: "de,en", limit: 3', root / "data" / "answers" / "XQuAD.jsonl", "limit was 2, the config now gives 3", "cell"),
    ]:  # fmt: skip
        assert old in text
        message = refused(old, new, mode)
        assert message.startswith(f"{where}: made with other settings ({said})"), message
    # nor a training (resumed or finished) on other records: a sample drawn again reaches it
    shutil.rmtree(root / "eval" / "cc-new")  # the new cell's held-out NLL ran before its answers were refused
    sample = root / "data" / "seed7" / "train.jsonl"
    kept = {f: f.read_bytes() for f in (sample, sample.with_suffix(".settings.json"))}
    for f in kept:
        f.unlink()
    message = refused("train_per_lang: 1", "train_per_lang: 2", "cell")
    assert message.startswith(f"{cc_train}: made with other settings (data.train_per_lang was 1"), message
    for f, data in kept.items():
        f.write_bytes(data)
    assert {p: p.read_text() for p in sidecars} == recorded  # nothing was recorded over
    # what does not change a result is no reason to refuse: the batch size, a new cell on a shared training
    path.write_text(text.replace("matrix_samples: 4", "matrix_samples: 4\neval_batch_size: 3"))
    assert run_experiment(load_config(path), progress=False)["cells"] == report["cells"]
    # results from before the settings were recorded take the current ones
    for p in sidecars:
        p.unlink()
    path.write_text(text)
    assert run_experiment(load_config(path), progress=False)["cells"] == report["cells"]
    assert {p: p.read_text() for p in sidecars} == recorded


def _grid(path, base_dir, output, cells, extra=""):
    path.write_text(f"""
model: {base_dir}
output: {output}
seeds: [3, 4]
train_per_lang: 1
heldout_per_lang: 1
langs: sw,zh
matrix_samples: 4
train: {{max_steps: 2, batch_size: 2, lr: 1.0e-3, max_length: 96}}
cells:
{cells}
{extra}
""")
    return path


def test_a_stopped_stage_adds_its_time_to_the_invocation_that_finishes_it(tmp_path, monkeypatch):
    from cctuning.lab.experiment import stages

    now = iter([100.0, 105.5, 200.0, 203.25, 300.0, 301.0])  # perf_counter at each start and end
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(now))
    path = tmp_path / "stages.json"
    with pytest.raises(KeyboardInterrupt), stages.StageClock(path)("train/sft-x/seed1"):
        raise KeyboardInterrupt  # Ctrl-C in the first invocation, 5.5 s in
    assert not path.exists()
    assert json.loads((tmp_path / "stages_unfinished.json").read_text()) == {"train/sft-x/seed1": 5.5}
    clock = stages.StageClock(path)  # the next invocation resumes and finishes it in 3.25 s
    with clock("train/sft-x/seed1"):
        pass
    with clock("nll/sft/seed1"):
        pass
    assert json.loads(path.read_text()) == {"train/sft-x/seed1": 8.8, "nll/sft/seed1": 1.0}  # 5.5 + 3.25
    assert json.loads((tmp_path / "stages_unfinished.json").read_text()) == {}


def test_plan_jobs_groups_the_cells_of_one_training(tmp_path):
    from cctuning.lab.experiment import plan_jobs

    path = tmp_path / "e.yaml"
    path.write_text(
        "seeds: [1, 2]\ncells:\n  - {name: sft, method: sft}\n  - {name: cc}\n"
        "  - {name: cc-none, connection: none}\n  - {name: f3, layer_choice: 'fixed:3'}\n"
    )
    cfg = load_config(path)
    jobs = plan_jobs(cfg)
    assert [(j.seed, j.cells) for j in jobs] == [
        (1, ("sft",)), (1, ("cc", "cc-none")), (1, ("f3",)),
        (2, ("sft",)), (2, ("cc", "cc-none")), (2, ("f3",)),
    ]  # fmt: skip
    assert len({j.name for j in jobs}) == 6
    # the cells a job holds share its training folder, and no other job trains it
    assert jobs[1].train_name == _train_key_of(cfg, "cc") == _train_key_of(cfg, "cc-none")


def _train_key_of(cfg, name):
    from cctuning.lab.experiment import resolve_cells

    return next(c.train_name for c in resolve_cells(cfg) if c.name == name)


@pytest.mark.slow
def test_parallel_jobs_match_the_sequential_run(base_dir, tmp_path, capsys):
    """--jobs 2 runs each seed × training in its own process and folder; the report equals the one
    the in-process runner writes for the same grid (to float noise from other thread counts), and
    --report-only rebuilds it from the folders without training."""
    from cctuning.cli import main

    cells = "  - {name: sft, method: sft}\n  - {name: cc-none, method: cc, connection: none}\n"
    answers = "answer_nll: {names: XQuAD, langs: en, limit: 2}"
    seq_cfg = _grid(tmp_path / "seq.yaml", base_dir, tmp_path / "seq", cells, answers)
    par_cfg = _grid(tmp_path / "par.yaml", base_dir, tmp_path / "par", cells, answers)
    sequential = run_experiment(load_config(seq_cfg), progress=False)
    assert main(["experiment", "--config", str(par_cfg), "--jobs", "2", "--no-progress"]) == 0
    par = tmp_path / "par"
    assert sorted(p.name for p in (par / "jobs").iterdir() if p.is_dir()) == sorted(
        f"seed{s}-{t}" for s in (3, 4) for t in (_train_key_of(load_config(par_cfg), "sft"),
                                                 _train_key_of(load_config(par_cfg), "cc-none"))
    )  # fmt: skip
    parallel = json.loads((par / "report.json").read_text())
    for cell in ("sft", "cc-none"):
        assert parallel["cells"][cell]["nll"]["all"]["n"] == 2
        assert math.isclose(
            parallel["cells"][cell]["nll"]["all"]["mean"], sequential["cells"][cell]["nll"]["all"]["mean"],
            rel_tol=1e-5,
        )  # fmt: skip
    seq_diff = sequential["cells"]["cc-none"]["nll_diff_to_baseline"]["all"]
    par_diff = parallel["cells"]["cc-none"]["nll_diff_to_baseline"]["all"]
    assert math.isclose(par_diff["mean"], seq_diff["mean"], rel_tol=1e-3, abs_tol=1e-6)
    # every job's stage times reach the report, which says that they overlapped
    assert sorted(k.split("/")[0] for k in parallel["stage_seconds"]) == (
        ["answer-nll-XQuAD"] * 4 + ["nll"] * 4 + ["train"] * 4
    )
    # two seeds: the difference pooled over seeds and items has the mean of the seeds' differences
    for report in (sequential, parallel):
        cell = report["cells"]["cc-none"]
        for pooled, per_seed in (
            (cell["nll_diff_pooled"]["all"], cell["nll_diff_to_baseline"]["all"]),
            (cell["answer_nll"]["XQuAD"]["pooled"]["all"], cell["answer_nll"]["XQuAD"]["diff"]["all"]),
        ):
            assert pooled["n"] == per_seed["n"] == 2
            assert math.isclose(pooled["mean"], per_seed["mean"], rel_tol=1e-9, abs_tol=1e-12)
            assert pooled["ci_low"] <= pooled["mean"] <= pooled["ci_high"]
    assert math.isclose(
        parallel["cells"]["cc-none"]["answer_nll"]["XQuAD"]["diff"]["all"]["mean"],
        sequential["cells"]["cc-none"]["answer_nll"]["XQuAD"]["diff"]["all"]["mean"],
        rel_tol=1e-3, abs_tol=1e-6,
    )  # fmt: skip
    assert "pooled over the seeds" in (par / "report.md").read_text()
    # each cell's two trainings compared with each other: seed 4 − seed 3 on the same items
    from cctuning.eval.nll import load_items, paired_difference

    seq = tmp_path / "seq"
    for cell in ("sft", "cc-none"):
        direct = paired_difference(
            load_items(seq / "eval" / cell / "seed4" / "nll"),
            load_items(seq / "eval" / cell / "seed3" / "nll"),
            seed=3,
        )["all"]
        got = sequential["cells"][cell]["nll_between_seeds"]["4-3"]
        assert (got["mean"], got["ci_low"], got["ci_high"]) == (
            direct["diff"],
            direct["ci_low"],
            direct["ci_high"],
        )
    assert (
        "| sft | " in (seq / "report.md").read_text() and "seed 4 − seed 3" in (seq / "report.md").read_text()
    )
    assert parallel["parallel_jobs"] == 4 and "parallel_jobs" not in sequential
    assert "4 jobs ran as parallel processes" in (par / "report.md").read_text()
    assert "parallel" not in (tmp_path / "seq" / "report.md").read_text()
    capsys.readouterr()
    # --report-only trains nothing and gives the same cells
    (par / "report.json").unlink()
    assert main(["experiment", "--config", str(par_cfg), "--report-only"]) == 0
    assert json.loads((par / "report.json").read_text())["cells"] == parallel["cells"]
    # --baseline: the paired differences against another cell; sft − cc-none is minus cc-none − sft
    assert main(["experiment", "--config", str(par_cfg), "--report-only", "--baseline", "cc-none"]) == 0
    swapped = json.loads((par / "report.json").read_text())
    assert (
        swapped["baseline"] == "cc-none"
        and "Paired NLL difference to `cc-none`" in (par / "report.md").read_text()
    )
    for key in ("nll_diff_to_baseline", "nll_diff_pooled"):
        assert math.isclose(
            swapped["cells"]["sft"][key]["all"]["mean"], -parallel["cells"]["cc-none"][key]["all"]["mean"],
            rel_tol=1e-9, abs_tol=1e-12,
        )  # fmt: skip
    capsys.readouterr()
    assert main(["experiment", "--config", str(par_cfg), "--report-only", "--baseline", "cc"]) == 2
    assert "--baseline: 'cc' is not a cell of this run (cells: sft, cc-none)" in capsys.readouterr().err
    assert main(["experiment", "--config", str(par_cfg), "--report-only", "--cells", "sft,cc,xx"]) == 2
    assert "unknown cell cc, xx (cells: sft, cc-none)" in capsys.readouterr().err
    # a job's finished evaluation made with other settings stops a parallel run before any job starts
    par_cfg.write_text(par_cfg.read_text().replace("langs: en, limit: 2", "langs: en, limit: 3"))
    capsys.readouterr()
    logs = {log: log.stat().st_mtime_ns for log in par.glob("jobs/*.log")}
    assert len(logs) == 4
    assert main(["experiment", "--config", str(par_cfg), "--jobs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "answer-nll-XQuAD: made with other settings (answers.limit was 2, the config now gives 3)" in err
    assert str(par / "jobs" / "seed3-") in err
    assert {log: log.stat().st_mtime_ns for log in par.glob("jobs/*.log")} == logs  # no job ran
    par_cfg.write_text(par_cfg.read_text().replace("langs: en, limit: 3", "langs: en, limit: 2"))
    # an evaluation missing: one line naming it
    missing = (
        next(p for p in (par / "jobs").glob("seed4-sft-*") if p.is_dir())
        / "eval"
        / "sft"
        / "seed4"
        / "nll"
        / "nll.json"
    )
    missing.unlink()
    with pytest.raises(CCError, match=r"nll\.json: missing: cell 'sft' seed 4 has no held-out NLL yet"):
        run_experiment(load_config(par_cfg), report_only=True)


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_log(base_dir, tmp_path):
    """A job that fails does not stop the others; the error names it and its log's last line."""
    cells = "  - {name: sft, method: sft}\n  - {name: bad, method: cc, layer_choice: 'fixed:99'}\n"
    path = _grid(tmp_path / "e.yaml", base_dir, tmp_path / "out", cells)
    cfg = load_config(path)
    cfg.seeds = [3]
    with pytest.raises(
        CCError, match=r"1 of 2 experiment jobs failed: seed3-cc-\w+ \(exit \d+, .*\.log: .*fixed:99"
    ):
        run_experiment(cfg, progress=False, jobs=2, config_path=path)
    # the other job ran to the end
    assert (
        tmp_path / "out" / "jobs" / f"seed3-{_train_key_of(cfg, 'sft')}" / "eval" / "sft" / "seed3"
    ).is_dir()


def test_a_cell_without_benchmarks_for_every_seed_shows_a_dash():
    from cctuning.lab.experiment import experiment_markdown

    nll = {"all": {"mean": 2.0, "ci_low": None, "ci_high": None, "n": 1}}
    bench = {
        "XQuAD": {"metric": "contains", "average": {"mean": 0.05, "ci_low": None, "ci_high": None, "n": 1}}
    }
    diff = {"all": {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 1}}
    report = {
        "baseline": "sft",
        "seeds": [1],
        "cells": {
            "sft": {"nll": nll, "benchmarks": bench},
            "cc": {"nll": nll, "nll_diff_to_baseline": diff},
        },
    }
    text = experiment_markdown(report)
    assert "| XQuAD (contains) | 5.0 | — |" in text
    assert "not evaluated for every seed" in text
    del report["cells"]["cc"]
    assert "not evaluated" not in experiment_markdown(report)


@pytest.mark.slow
def test_a_stopped_parallel_run_stops_its_jobs(base_dir, tmp_path):
    """SIGTERM to a parallel runner (``kill``) stops the jobs it started, rather than leaving them
    training alone; the runner exits as interrupted."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "e.yaml"
    path.write_text(f"""
model: {base_dir}
output: {tmp_path / "out"}
seeds: [3]
train_per_lang: 1
heldout_per_lang: 1
langs: sw,zh
train: {{max_steps: 100000, batch_size: 2, lr: 1.0e-3, max_length: 64, save_steps: 100000}}
cells:
  - {{name: sft, method: sft}}
  - {{name: cc-none, method: cc, connection: none}}
""")
    log = tmp_path / "runner.log"
    with open(log, "w") as fh:
        runner = subprocess.Popen(
            [sys.executable, "-m", "cctuning.cli", "experiment", "--config", str(path), "--jobs", "2", "--no-progress"],
            stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    jobs = tmp_path / "out" / "jobs"
    deadline = time.time() + 120
    while time.time() < deadline:  # both jobs are training
        logs = list(jobs.glob("*.log")) if jobs.is_dir() else []
        if len(logs) == 2 and all("training" in f.read_text() for f in logs):
            break
        time.sleep(0.5)
    else:
        runner.kill()
        pytest.fail("the jobs did not start training: " + log.read_text()[-2000:])
    pids = [int(p) for p in re.findall(r"started \(pid (\d+)", log.read_text())]
    assert len(pids) == 2
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 130
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_jobs_take_the_devices_in_turn_and_share_the_threads(tmp_path, monkeypatch):
    """--devices hands CUDA_VISIBLE_DEVICES out in turn; each job gets its share of the CPU threads;
    at most --jobs run at once; each job re-reads the config for its own folder, seed and cells."""
    import os
    import subprocess

    from cctuning.lab.experiment import jobs as experiment_jobs

    path = tmp_path / "e.yaml"
    path.write_text(
        f"output: {tmp_path / 'out'}\nseeds: [1, 2]\n"
        "cells:\n  - {name: sft, method: sft}\n  - {name: cc}\n  - {name: cc-none, connection: none}\n"
    )
    cfg = load_config(path)
    launched, peak = [], [0]

    class Fake:
        running = 0

        def __init__(self, cmd, stdout=None, stderr=None, env=None):
            launched.append((cmd, env))
            Fake.running += 1
            peak[0] = max(peak[0], Fake.running)
            self.pid, self.returncode, self.polls = 1000 + len(launched), None, 0

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            if self.returncode is None:
                Fake.running -= 1
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Fake)
    monkeypatch.setattr(experiment_jobs.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    experiment_jobs._run_jobs(cfg, tmp_path / "out", 2, ["0", "1", "2"], path, progress=False)
    assert len(launched) == 4 and peak[0] == 2
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in launched] == ["0", "1", "2", "0"]
    assert {env["OMP_NUM_THREADS"] for _, env in launched} == {"4"}  # 8 threads / 2 jobs at a time
    jobs = experiment_jobs.plan_jobs(cfg)
    for (cmd, _), job in zip(launched, jobs):
        assert cmd[cmd.index("--seeds") + 1] == str(job.seed)
        assert cmd[cmd.index("--cells") + 1] == ",".join(job.cells)
        assert cmd[cmd.index("--output") + 1] == str(experiment_jobs.job_root(tmp_path / "out", job))
        assert "--no-report" in cmd and cmd[cmd.index("--config") + 1] == str(path)
