"""What a new user meets in the first hour (issue 30): files others can read, runs that say what ran
(the connection and the layers chosen), a warning where a default silently does less than it seems,
and the demo's defaults sized to what it measures."""

import json
import logging
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest
import torch

from cctuning.cli import main
from tests.conftest import make_records, train, write_jsonl


@pytest.fixture
def umask():
    """Run the test under umask 022; yields the mask, read back from the process."""
    old = os.umask(0o022)
    mask = os.umask(0o022)  # read back, not assumed
    yield mask
    os.umask(old)


def wrong_modes(folder: Path, mask: int) -> list[str]:
    """Every file or folder under ``folder`` (itself included) whose permissions are not those that
    open() and mkdir() give under ``mask``."""
    wrong = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        have = stat.S_IMODE(path.lstat().st_mode)
        if have != want:
            wrong.append(f"{path.relative_to(folder.parent)}: {oct(have)}, not {oct(want)}")
    return wrong


# -- permissions ---------------------------------------------------------------------------------
def test_a_trained_run_its_matrix_and_its_export_are_readable_as_the_umask_allows(
    base_dir, data_file, tmp_path, umask, capsys
):
    run, export = tmp_path / "run", tmp_path / "export"
    assert train(model=base_dir, data=data_file, output=run, max_steps=2, batch_size=4, save_steps=1) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert main(["fit-matrix", "--model", run, "--data", data_file, "--samples", 8]) == 0
    assert main(["export", "--model", run, "--output", export]) == 0
    weights = ("model.safetensors", "decision_maker.safetensors", "transform_matrix.safetensors")
    assert all((folder / name).is_file() for folder in (run, export) for name in weights)
    assert wrong_modes(run, umask) == []
    assert wrong_modes(export, umask) == []


def test_the_writers_follow_the_umask_of_the_moment(tmp_path):
    """Not the umask the process had when cctuning was imported: the files of each writer get the
    mode open() gives under the umask in force when they are written."""
    from cctuning.io import save_safetensors, staged_dir, write_text

    old = os.umask(0o027)
    try:
        mask = os.umask(0o027)
        out = tmp_path / "out"
        out.mkdir()
        save_safetensors(out / "a.safetensors", {"x": torch.zeros(2)})
        write_text(out / "b.txt", "b")
        with staged_dir(out / "staged") as stage:
            save_safetensors(stage / "c.safetensors", {"x": torch.zeros(2)})
            (stage / "sub").mkdir()
            (stage / "sub" / "d.txt").write_text("d")
    finally:
        os.umask(old)
    assert wrong_modes(out, mask) == []


# -- say what ran ----------------------------------------------------------------------------------
NO_MATRIX = "has no Transform Matrix"


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """A CC-Tuning run without a Transform Matrix, a copy of it with one, and its training data."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "train.jsonl", make_records())
    bare = root / "cc"
    assert train(model=base_dir, data=data, output=bare, max_steps=2, batch_size=4) == 0
    fitted = root / "cc-matrix"
    shutil.copytree(bare, fitted)
    assert main(["fit-matrix", "--model", fitted, "--data", data, "--samples", 12]) == 0
    return {"bare": bare, "fitted": fitted, "data": data}


def warnings_of(caplog) -> int:
    """How many times the missing matrix was warned about (and each time as a warning)."""
    found = [r for r in caplog.records if NO_MATRIX in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in found)
    return len(found)


def histogram(layers) -> str:
    """The layers chosen as the commands print them, counted here from the rows they wrote."""
    counts = Counter(int(layer) for layer in layers if layer is not None)
    return ", ".join(f"layer {layer} ×{n}" for layer, n in sorted(counts.items())) or "no layer chosen"


@pytest.mark.parametrize(
    "which, extra, warned, connection",
    [
        ("bare", [], 1, "none"),
        ("bare", ["--connection", "none"], 0, "none"),  # chosen, not defaulted: nothing to say
        ("fitted", [], 0, "transform"),
        ("plain", [], 0, "none"),  # the base model: no connection to miss
    ],
)
def test_generate_says_the_connection_and_the_layers_and_warns_once_without_a_matrix(
    runs, base_dir, tmp_path, caplog, capsys, which, extra, warned, connection
):
    model = base_dir if which == "plain" else runs[which]
    gens = tmp_path / "gens.jsonl"
    caplog.set_level(logging.WARNING)
    command = ["generate", "--model", model, "--input", runs["data"], "--output", gens, "--max-new-tokens", 2]
    assert main([*command, *extra]) == 0
    assert warnings_of(caplog) == warned
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert {r["connection"] for r in rows} == {connection}
    assert (connection == "none") == all(r["layer"] is None for r in rows)
    printed = capsys.readouterr().out
    assert printed.strip().endswith(f"(connection {connection}: {histogram(r['layer'] for r in rows)})")
    # one prompt: the answer alone on stdout, what ran on stderr
    assert main(["generate", "--model", model, "--prompt", "Habari?", "--max-new-tokens", 2, *extra]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and f"connection {connection}: " in err
    assert warnings_of(caplog) == 2 * warned  # once per command, never per batch or per prompt


def test_the_library_warns_once_per_model_whatever_calls_it(tokenizer, caplog):
    """Each default resolution of a matrix-less CC model's connection (every generate() call, the
    runner, the NLL) warns through the one place, once per model."""
    from cctuning.inference.generate import CCGenerator
    from cctuning.model import CCConfig, CCModel
    from cctuning.testing import tiny_model

    caplog.set_level(logging.WARNING)
    models = [CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig()) for _ in range(2)]
    for model in models:
        generator = CCGenerator(model, tokenizer, max_new_tokens=1)
        for _ in range(3):
            assert [g.layer for g in generator.generate(["Habari?", "你好"])] == [None, None]
    assert warnings_of(caplog) == len(models)


def test_eval_records_and_prints_the_connection_and_the_layers(runs, tmp_path, caplog, capsys):
    caplog.set_level(logging.WARNING)
    options = ["--benchmarks", "XNLI", "--langs", "sw,zh", "--limit", 3, "--max-new-tokens", 2]
    for which, connection, warned in (("bare", "none", 1), ("fitted", "transform", 0)):
        out = tmp_path / which
        assert main(["eval", "--model", runs[which], *options, "--output", out]) == 0
        assert warnings_of(caplog) == warned
        caplog.clear()
        report = json.loads((out / "results.json").read_text())
        assert report["connection"] == connection
        rows = {
            lang: [json.loads(line) for line in (out / "generations" / "XNLI" / f"{lang}.jsonl").read_text().splitlines()]
            for lang in ("sw", "zh")
        }  # fmt: skip
        expected = "; ".join(f"{lang}: {histogram(r['layer'] for r in rs)}" for lang, rs in rows.items())
        line = (
            f"connection {connection}, layers chosen: {expected}"
            if connection != "none"
            else "connection none: no layer chosen"
        )
        assert all(r["layer"] is None for rs in rows.values() for r in rs) == (connection == "none")
        assert line + " (every benchmark)" in (out / "results.md").read_text()
        assert line in capsys.readouterr().out


def test_eval_nll_names_its_default_folder_after_the_connection_that_ran(runs, caplog, capsys):
    caplog.set_level(logging.WARNING)
    for which, connection, warned in (("bare", "none", 1), ("fitted", "transform", 0)):
        assert main(["eval", "--model", runs[which], "--nll", runs["data"], "--batch-size", 4]) == 0
        assert warnings_of(caplog) == warned  # once, though the command and the scorer both resolve it
        caplog.clear()
        folder = runs[which] / "eval" / f"nll-{connection}"
        report = json.loads((folder / "nll.json").read_text())
        assert report["connection"] == connection
        items = [json.loads(line) for line in (folder / "nll_items.jsonl").read_text().splitlines()]
        langs = dict.fromkeys(i["lang"] for i in items)
        expected = {
            lang: {str(k): v for k, v in Counter(i["layer"] for i in items if i["lang"] == lang).items()}
            for lang in langs
            if connection != "none"
        }
        assert report["layer_choice"] == expected
        printed = capsys.readouterr().out
        assert f"saved to {folder}" in printed and f"connection {connection}" in printed
        if connection != "none":
            lang = next(iter(langs))
            assert f"{lang}: {histogram(i['layer'] for i in items if i['lang'] == lang)}" in printed


# -- fit-matrix on too few pairs -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "samples, extra",
    [(11, []), (12, []), (12, ["--per-layer"]), (8, ["--ridge", "0.1"])],
)
def test_fit_matrix_warns_when_the_pairs_cannot_determine_the_matrix(
    runs, tmp_path, caplog, capsys, samples, extra
):
    model = tmp_path / "m"
    shutil.copytree(runs["bare"], model)
    caplog.set_level(logging.WARNING)
    assert main(["fit-matrix", "--model", model, "--data", runs["data"], "--samples", samples, *extra]) == 0
    config = json.loads((model / "config.json").read_text())
    fit_pairs = json.loads((model / "transform_matrix.json").read_text())["fit_pairs"]
    rows = fit_pairs * (1 if "--per-layer" in extra else config["num_hidden_layers"])
    expected = rows < config["hidden_size"] and "--ridge" not in extra
    found = [r.getMessage() for r in caplog.records if "underdetermined" in r.getMessage()]
    assert len(found) == int(expected), found
    if expected:
        assert f"{fit_pairs} fit pairs give {rows} activation rows" in found[0]
        assert "--ridge" in found[0] and "--samples" in found[0]


# -- the demo's held-out budget --------------------------------------------------------------------
def short_responses(tokenizer, records, budget: int, fewest: int = 4) -> int:
    """How many responses a budget of ``budget`` tokens (prompt and response) cuts to fewer than
    ``fewest`` tokens, counted with the tokenizer's own chat template rather than cctuning's encoder:
    the prompt as the template renders one user turn, the response as its text and the end of turn."""
    short = 0
    for rec in records:
        messages = [{"role": "user", "content": rec["instruction"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": rec["output"]}], tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response = len(tokenizer(whole, add_special_tokens=False)["input_ids"]) - len(prompt_ids)
        kept = max(budget - len(prompt_ids), 1)  # what the budget leaves the response, at least a token
        short += response > kept and kept < fewest
    return short


def test_the_demo_scores_its_held_out_responses_within_a_budget_that_fits_them():
    """At most 5 % of the demo's held-out responses are cut to fewer than 4 tokens (at the training
    budget of 128 tokens, which the held-out NLL used before, more than half were)."""
    from transformers import AutoTokenizer

    from cctuning.data.mix import sample_mix
    from cctuning.lab.demo import DemoConfig, experiment_config
    from cctuning.lab.experiment import resolve_cells
    from cctuning.lab.experiment.config import heldout_budget
    from cctuning.presets.registry import get_preset, is_converted, preset_dir

    cfg = DemoConfig()
    folder = preset_dir(cfg.model)
    if not is_converted(folder, get_preset(cfg.model)):
        pytest.skip(
            f"preset {cfg.model} is not converted here: the count needs its own tokenizer (another one "
            "cuts its own numbers of tokens, which says nothing of the demo's)"
        )
    exp = experiment_config(cfg)
    records = sample_mix("heldout", exp.heldout_per_lang, None, exp.heldout_seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    budgets = {heldout_budget(exp, cell) for cell in resolve_cells(exp)}
    assert budgets == {cfg.nll_max_length}
    assert short_responses(tokenizer, records, cfg.nll_max_length) <= 0.05 * len(records)
    assert short_responses(tokenizer, records, exp.train["max_length"]) > 0.05 * len(records)
    assert exp.train["max_length"] == 128  # the training budget is unchanged


def test_the_held_out_budget_reaches_the_nll_stage_and_its_settings(tmp_path, monkeypatch):
    """The NLL stage scores with ``heldout_max_length`` and records it (a changed budget is never
    reused); without it, with the cell's training budget as before."""
    from cctuning.lab.experiment import ExperimentConfig, resolve_cells, stages
    from cctuning.lab.experiment.reuse import _Evaluation, _stage_settings

    seen = []
    monkeypatch.setattr(stages, "load_for_inference", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(stages, "evaluate_nll", lambda *a, **k: seen.append(k["max_length"]))
    for held, expected in ((None, 96), (300, 300)):
        cfg = ExperimentConfig(
            output=str(tmp_path), train={"max_length": 96}, cells=[{"name": "c"}], heldout_max_length=held
        )
        cell = resolve_cells(cfg)[0]
        folder = tmp_path / str(held)
        ev = _Evaluation("nll", folder, folder / "nll.json")
        run = stages._SeedRun(
            tmp_path, "m", 1, tmp_path / "t", tmp_path / "h", stages.StageClock(tmp_path / "s"), False
        )
        stages._nll_stage(cfg, cell, tmp_path, ev, run)
        assert seen.pop() == expected
        assert _stage_settings(cfg, cell, 1, "nll")["max_length"] == expected


# -- the experiment's training stage: checkpoints only while they can serve ------------------------------
def _experiment(base_dir, output):
    from cctuning.lab.experiment import ExperimentConfig

    return ExperimentConfig(
        model=str(base_dir),
        output=str(output),
        seeds=[5],
        train_per_lang=2,
        heldout_per_lang=1,
        langs="sw,zh,ar",
        train={
            "max_steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "max_length": 64,
            "save_steps": 1,
            "save_total_limit": 5,
        },
        cells=[{"name": "cc", "method": "cc", "connection": "transform"}],
        matrix_samples=6,
    )


def test_a_finished_experiment_training_keeps_no_checkpoint_and_an_interrupted_one_resumes(
    base_dir, tmp_path, monkeypatch, caplog
):
    import cctuning.training.run as run_module
    from cctuning.lab.experiment import resolve_cells, run_experiment
    from cctuning.lab.experiment.config import train_dir
    from cctuning.lab.experiment.stages import drop_checkpoints

    cfg = _experiment(base_dir, tmp_path / "exp")
    tdir = train_dir(cfg.output, resolve_cells(cfg)[0], 5)
    real_train = run_module.train

    def killed(tcfg):
        """The training, killed right after its first checkpoint (what is left of it then)."""
        real_train(tcfg)
        for item in tdir.iterdir():
            if item.name not in ("checkpoint-1", "experiment_settings.json"):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    assert sorted(p.name for p in tdir.glob("checkpoint-*")) == ["checkpoint-1"]
    drop_checkpoints(tdir)  # not finished: nothing to drop
    assert (tdir / "checkpoint-1").is_dir()
    monkeypatch.setattr(run_module, "train", real_train)
    caplog.set_level(logging.INFO)
    run_experiment(cfg, progress=False)  # resumes from checkpoint-1 and finishes
    assert json.loads((tdir / "train_results.json").read_text())["global_step"] == 2
    assert json.loads((tdir / "train_results.json").read_text())["config"]["resume"] == "last"
    assert list(tdir.glob("checkpoint-*")) == []
    assert json.loads((tdir / "trainer_state.json").read_text())["global_step"] == 2  # the log is kept
    freed = [r.getMessage() for r in caplog.records if "checkpoint(s) were removed" in r.getMessage()]
    assert len(freed) == 1 and "2 checkpoint(s)" in freed[0] and "MB freed" in freed[0]
    # the report says what the matrix was fitted on: of the 6 records sampled, 10 % (at least one) held out
    held = max(1, round(0.1 * 6))
    report = (tmp_path / "exp" / "report.md").read_text()
    assert f"Transform Matrix fitted on {6 - held} parallel pairs ({held} more held out" in report
    assert "of up to 6 sampled training records" in report
