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
