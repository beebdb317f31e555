"""Nothing a command writes may destroy what it reads (issue 26): the output guard (unit cases worked
out by hand, symbolic links included), the guard of every writing command, the reader/writer lock of a
model folder, the content fingerprint of cached evaluations, full disks and read-only folders, and the
one-line errors of hostile configs and half-written runs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.guard import check_output, safe_name
from cctuning.io import (
    FINGERPRINT_INDEX,
    INCOMPLETE_MARKER,
    LOCK_NAME,
    folder_fingerprint,
    folder_lock,
    save_safetensors,
    writes_into,
)
from tests.conftest import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


# -- the guard, by hand --------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    """``model/`` (weights, eval/), ``data.jsonl``, ``conf.yaml``, ``out/`` (empty) and ``old.jsonl``."""
    (tmp_path / "model" / "eval").mkdir(parents=True)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "conf.yaml").write_text("a: 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "old.jsonl").write_text("old\n")
    return tmp_path


def _inputs(t: Path) -> dict:
    return {"--model": t / "model", "--data": t / "data.jsonl", "--config": t / "conf.yaml", "--hub": "org/x"}


# (output, folder, expected error or None): the output relative to the tree
GUARD_CASES = [
    ("model", True, "is the input --model"),
    ("model/model.safetensors", False, "lies inside the input --model"),
    ("model/sub", True, "lies inside the input --model"),
    ("model/eval/run", True, None),  # the place eval keeps its results
    ("model/eval", True, None),
    ("model/evaluation", True, "lies inside the input --model"),  # a prefix is not the place
    ("model/eval/../model.safetensors", False, "lies inside the input --model"),
    ("data.jsonl", False, "is the input --data"),
    ("conf.yaml", False, "is the input --config"),
    (".", True, "contains the input --model"),
    ("out", True, None),
    ("out/new.jsonl", False, None),
    ("out", False, "is a folder"),
    ("data.jsonl/x", True, "lies inside the input --data"),
    ("old.jsonl", False, "exists and is not a result of this command"),
    ("old.jsonl", True, "exists and is not a folder"),
    ("org/x", False, None),  # a hub id is not a path: nothing to compare
]


@pytest.mark.parametrize("output, folder, expected", GUARD_CASES)
def test_the_guard_by_hand(tree, output, folder, expected):
    def run():
        return check_output(tree / output, _inputs(tree), inside={"--model": ["eval"]}, folder=folder)

    if expected is None:
        assert run() == tree / output
    else:
        with pytest.raises(CCError, match=expected) as err:
            run()
        assert "\n" not in str(err.value) and str(tree / output) in str(err.value)


def test_the_guard_lets_a_command_replace_its_own_result(tree):
    own = tree / "old.jsonl"
    assert check_output(own, _inputs(tree), own=lambda p: p.read_text() == "old\n") == own
    with pytest.raises(CCError, match="not a result of this command"):
        check_output(own, _inputs(tree), own=lambda p: False)


SYMLINK_CASES = [
    # (link, what it points to, the output: relative to the tree, expected)
    ("link.jsonl", "data.jsonl", "link.jsonl", "is the input --data"),
    ("mlink", "model", "mlink/model.safetensors", "lies inside the input --model"),
    ("mlink", "model", "mlink/eval/x", None),  # the model's own eval/ through a link to the model
    ("mlink", "model", "mlink", "is the input --model"),
    ("elink", "model/eval", "elink/x", None),
    ("olink", ".", "olink/out/new.jsonl", None),
    # eval/loop → model: the output's real path is model/weights, not in eval/
    ("model/eval/loop", "model", "model/eval/loop/weights", "lies inside the input --model"),
    ("dangling", "nowhere.jsonl", "dangling", None),
]


@pytest.mark.parametrize("link, target, output, expected", SYMLINK_CASES)
def test_the_guard_follows_symbolic_links(tree, link, target, output, expected):
    (tree / link).symlink_to(tree / target)

    def run():
        return check_output(tree / output, _inputs(tree), inside={"--model": ["eval"]})

    if expected is None:
        run()
    else:
        with pytest.raises(CCError, match=expected):
            run()


def test_an_input_given_through_a_link_is_the_file_it_names(tree):
    (tree / "in.jsonl").symlink_to(tree / "data.jsonl")
    with pytest.raises(CCError, match="is the input --input"):
        check_output(tree / "data.jsonl", {"--input": tree / "in.jsonl"})


def test_a_hard_link_to_an_input_is_the_input(tree):
    os.link(tree / "data.jsonl", tree / "hard.jsonl")
    with pytest.raises(CCError, match="is the input --data"):
        check_output(tree / "hard.jsonl", {"--data": tree / "data.jsonl"}, own=lambda p: True)


@pytest.mark.parametrize("name", ["../x", "..", ".", ".hidden", "a/b", "", "a\\b", "x\0", 3, "-rf", "a b"])
def test_unsafe_names_are_refused_in_one_line(name):
    with pytest.raises(CCError, match="cell") as err:
        safe_name(name, "exp.yaml: cell")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["sft", "cc-none", "fixed-8", "lr1e-4", "a.b", "A_1+x=y@z"])
def test_safe_names_pass(name):
    assert safe_name(name, "cell") == name


# -- the commands ----------------------------------------------------------------------------------------
def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cctuning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_dir, tokenizer) -> Path:
    """``base/`` (a copy of the tiny base model) and ``run/``, a CC-Tuning run with full weights trained
    from it (it records ``base/`` as its base), ``data.jsonl`` and ``conf.yaml``."""
    from cctuning.model import CCConfig, CCModel

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(base_dir, root / "base")
    CCModel.from_base(str(root / "base"), CCConfig()).save_pretrained(root / "run", tokenizer=tokenizer)
    write_jsonl(root / "data.jsonl", make_records(8))
    (root / "conf.yaml").write_text("seed: 0\n")
    return root


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_NAME}


def test_generate_never_writes_over_the_models_weights(project, capsys):
    before = snapshot(project / "run")
    out = project / "run" / "model.safetensors"
    assert main(["generate", "--model", str(project / "run"), "--prompt", "hi", "--output", str(out)]) == 2
    assert "lies inside the input --model" in one_error(capsys)
    assert snapshot(project / "run") == before


def test_generate_never_writes_over_its_input(project, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "inp.jsonl", make_records(2))
    before = inp.read_bytes()
    argv = ["generate", "--model", str(project / "run"), "--input", str(inp), "--output", str(inp)]
    assert main(argv) == 2
    assert "is the input --input" in one_error(capsys)
    assert inp.read_bytes() == before


def test_generate_replaces_its_own_result_but_no_other_file(project, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", str(project / "run"), "--prompt", "hi", "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # its own earlier result
    capsys.readouterr()
    out.write_text('{"instruction": "mine", "output": "not a generation"}\n')
    assert main(argv) == 2
    assert "exists and is not a result of this command" in one_error(capsys)
    assert "not a generation" in out.read_text()


@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_generate_refuses_an_output_it_cannot_write_before_the_work(
    project, tmp_path, monkeypatch, capsys, where
):
    out = {"folder": tmp_path, "unwritable": Path("/proc/self/gen.jsonl")}[where]
    import cctuning.cli.inference as cli_inference

    monkeypatch.setattr(cli_inference, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--model", str(project / "run"), "--prompt", "hi", "--output", str(out)]) == 2
    assert {"folder": "is a folder", "unwritable": "cannot write into"}[where] in one_error(capsys)


def test_export_never_replaces_the_base_a_full_weights_run_was_trained_from(project, capsys):
    before = snapshot(project / "base")
    argv = ["export", "--model", str(project / "run"), "--output", str(project / "base"), "--overwrite"]
    assert main(argv) == 2
    assert "is the input --model's base" in one_error(capsys)
    assert snapshot(project / "base") == before


def _experiment_config(p: Path, tmp: Path) -> str:
    path = tmp / "exp.yaml"
    path.write_text(
        f"model: {p / 'base'}\noutput: {p}\ndata: {p / 'data.jsonl'}\ncells: [{{name: sft, method: sft}}]\n"
    )
    return str(path)


def _matrix_as_data(p: Path, tmp: Path) -> str:
    shutil.copytree(p / "run", tmp / "run")
    write_jsonl(tmp / "run" / "transform_matrix.json", make_records(4))
    return str(tmp / "run" / "transform_matrix.json")


# (id, the command line built from the project p and a scratch folder t, the error expected)
COMMAND_CASES = [
    ("train-over-the-runs-base", lambda p, t: ["train", "--model", p / "run", "--data", p / "data.jsonl",
        "--output", p / "base", "--overwrite"], "is the input --model's base"),
    ("train-around-its-inputs", lambda p, t: ["train", "--model", p / "base", "--data", p / "data.jsonl",
        "--output", p], "contains the input"),
    ("train-over-its-config", lambda p, t: ["train", "--config", p / "conf.yaml", "--model", p / "base",
        "--data", p / "data.jsonl", "--output", p / "conf.yaml"], "is the input --config"),
    ("train-inside-its-model", lambda p, t: ["train", "--model", p / "run", "--data", p / "data.jsonl",
        "--output", p / "run" / "sub"], "lies inside the input --model"),
    ("fit-matrix-over-its-data", lambda p, t: ["fit-matrix", "--model", t / "run", "--data",
        _matrix_as_data(p, t)], "is the input --data"),
    ("eval-inside-the-model", lambda p, t: ["eval", "--model", p / "run", "--output", p / "run" / "results"],
        "lies inside the input --model"),
    ("eval-over-its-data-dir", lambda p, t: ["eval", "--model", p / "run", "--data-dir", t, "--output", t],
        "is the input --data-dir"),
    ("eval-nll-around-its-inputs", lambda p, t: ["eval", "--model", p / "run", "--nll", p / "data.jsonl",
        "--output", p], "contains the input"),
    ("eval-over-its-config", lambda p, t: ["eval", "--config", p / "conf.yaml", "--model", p / "run",
        "--output", p / "conf.yaml"], "is the input --config"),
    ("experiment-around-its-data", lambda p, t: ["experiment", "--config", _experiment_config(p, t),
        "--report-only"], "contains the input"),
    ("lm-eval-inside-the-model", lambda p, t: ["lm-eval", "--model", "cctuning", "--model_args",
        f"pretrained={p / 'run'}", "--tasks", "cctuning_xnli", "--limit", "1", "--output_path", p / "run" / "res"],
        "lies inside the input pretrained"),
]  # fmt: skip


@pytest.mark.parametrize("build, expected", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_no_command_writes_over_or_into_what_it_reads(project, tmp_path, capsys, build, expected):
    argv = [str(a) for a in build(project, tmp_path)]
    if argv[0] == "lm-eval":
        pytest.importorskip("lm_eval")
    before = {name: snapshot(project / name) for name in ("base", "run")}
    assert main(argv) == 2
    assert expected in one_error(capsys)
    assert {name: snapshot(project / name) for name in ("base", "run")} == before


def test_an_experiment_cell_cannot_climb_out_of_the_experiment(base_dir, tmp_path, capsys):
    from cctuning.lab.experiment import load_config, resolve_cells

    path = tmp_path / "exp.yaml"
    path.write_text(f"model: {base_dir}\noutput: {tmp_path / 'exp'}\ncells: [{{name: ../../../escape}}]\n")
    assert main(["experiment", "--config", str(path), "--report-only"]) == 2  # nothing to run if accepted
    line = one_error(capsys)
    assert str(path) in line and "../../../escape" in line
    path.write_text("cells: [{name: ok, method: ../../x}]\n")
    # a method names the training folder: only the known ones are accepted, when the config loads
    with pytest.raises(
        CCError, match=r"cell 'ok': option 'method': expected one of cc, sft, got '\.\./\.\./x'"
    ):
        resolve_cells(load_config(path))


# -- the reader/writer lock of a folder -------------------------------------------------------------------
def test_a_writer_is_refused_while_a_reader_holds_the_folder_and_the_reverse(tmp_path):
    me = os.getpid()
    with folder_lock(tmp_path, "cctuning eval", shared=True):
        with pytest.raises(CCError, match=rf"in use by pid {me} \(cctuning eval\)"):
            with folder_lock(tmp_path, "cctuning train"):
                pass
    with folder_lock(tmp_path, "cctuning train"):
        with pytest.raises(CCError, match=rf"in use by pid {me} \(cctuning train\)"):
            with folder_lock(tmp_path, "cctuning eval", shared=True):
                pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_readers_share_the_folder_and_the_last_one_removes_the_lock_file(tmp_path):
    first = folder_lock(tmp_path, "cctuning eval", shared=True)
    first.__enter__()
    with folder_lock(tmp_path, "cctuning generate", shared=True):
        assert (tmp_path / LOCK_NAME).exists()
        first.__exit__(None, None, None)
        assert (tmp_path / LOCK_NAME).exists()  # the other reader still holds it
        with pytest.raises(CCError, match=r"\(cctuning generate\)") as err:
            with folder_lock(tmp_path, "cctuning train"):
                pass
        assert str(os.getpid()) in str(err.value)
    assert not (tmp_path / LOCK_NAME).exists()
    with folder_lock(tmp_path, "cctuning train"):  # free again
        pass


def test_a_reader_of_a_missing_folder_creates_nothing(tmp_path):
    with folder_lock(tmp_path / "none", "cctuning eval", shared=True):
        pass
    assert not (tmp_path / "none").exists()


def test_a_reader_of_a_folder_that_takes_no_lock_file_reads_unlocked():
    # /proc refuses new entries even to root: a model folder on a read-only mount is in the same case
    with folder_lock("/proc/self", "cctuning eval", shared=True):
        pass


def _holder(folder: Path, what: str, shared: bool) -> subprocess.Popen:
    code = (
        "import sys; from cctuning.io import folder_lock\n"
        "with folder_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == 'shared'):\n"
        "    print('locked', flush=True); sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), what, "shared" if shared else "exclusive"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_the_lock_between_two_processes(tmp_path):
    reader = _holder(tmp_path, "cctuning eval", shared=True)
    try:
        with pytest.raises(CCError, match=rf"in use by pid {reader.pid} \(cctuning eval\)"):
            with folder_lock(tmp_path, "cctuning train"):
                pass
        with folder_lock(tmp_path, "cctuning generate", shared=True):
            _release(reader)
            assert (tmp_path / LOCK_NAME).exists()  # we still read
    finally:
        if reader.poll() is None:
            reader.kill()
    assert not (tmp_path / LOCK_NAME).exists()
    writer = _holder(tmp_path, "cctuning train", shared=False)
    try:
        with pytest.raises(CCError, match=rf"in use by pid {writer.pid} \(cctuning train\)"):
            with folder_lock(tmp_path, "cctuning eval", shared=True):
                pass
        _release(writer)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not (tmp_path / LOCK_NAME).exists()  # the last holder removed it


def test_train_overwrite_is_refused_while_eval_reads_the_run(project, tmp_path, monkeypatch, capsys):
    """Case (c) of the issue: ``train --output rX --overwrite`` deleted the model an ``eval`` of rX was
    reading. The eval now holds rX for its whole run: the training is refused, naming it."""
    run = tmp_path / "rX"
    shutil.copytree(project / "run", run)
    before = snapshot(run)
    seen = {}

    def evaluate_while_training(cfg, model, tok, progress=True):
        seen["train"] = main(
            ["train", "--model", str(project / "base"), "--data", str(project / "data.jsonl"),
             "--output", str(run), "--overwrite", "--max-steps", "1"]
        )  # fmt: skip
        seen["error"] = capsys.readouterr().err
        raise CCError("stopped by the test")

    monkeypatch.setattr("cctuning.eval.runner.evaluate", evaluate_while_training)
    assert main(["eval", "--model", str(run), "--benchmarks", "XNLI", "--limit", "1"]) == 2
    assert seen["train"] == 2
    assert f"{run}: in use by pid {os.getpid()} (cctuning eval)" in seen["error"]
    assert snapshot(run) == before
    assert not (run / LOCK_NAME).exists()


READERS = {
    "eval": lambda run, data: ["eval", "--model", run, "--benchmarks", "XNLI", "--limit", "1"],
    "eval --nll": lambda run, data: ["eval", "--model", run, "--nll", data],
    "generate": lambda run, data: ["generate", "--model", run, "--prompt", "hi"],
    "lm-eval": lambda run, data: ["lm-eval", "--model", "cctuning", "--model_args", f"pretrained={run}",
        "--tasks", "cctuning_xnli", "--limit", "1"],
}  # fmt: skip


@pytest.mark.parametrize("reader", list(READERS))
def test_a_reader_of_a_run_is_refused_while_it_is_written(project, tmp_path, capsys, reader):
    if reader == "lm-eval":
        pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    shutil.copytree(project / "run", run)
    with folder_lock(run, "cctuning train"):
        assert main([str(a) for a in READERS[reader](run, project / "data.jsonl")]) == 2
        assert f"in use by pid {os.getpid()} (cctuning train)" in one_error(capsys)
    assert not (tmp_path / "exported").exists()


# -- the fingerprint of cached evaluations ----------------------------------------------------------------
@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CCTUNING_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"A" * 4096)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_rewrite_of_the_same_size_with_the_old_times_changes_the_fingerprint(weights):
    path = weights / "model.safetensors"
    old = folder_fingerprint(weights)
    stat = path.stat()
    path.write_bytes(b"B" * 4096)  # other weights, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert folder_fingerprint(weights) != old


def test_the_fingerprint_of_an_unchanged_folder_reads_no_file_again(weights, monkeypatch):
    import cctuning.io as cc_io

    monkeypatch.setattr(
        cc_io, "RACY_NS", 0
    )  # files written just now may be trusted: no clock tick to wait for
    reads = []
    real = cc_io.sha256_file
    monkeypatch.setattr(cc_io, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    first = folder_fingerprint(weights)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert folder_fingerprint(weights) == first
    assert reads == []  # the memo answered
    (weights / "config.json").write_text('{"a": 1}')
    assert folder_fingerprint(weights) != first
    assert reads == ["config.json"]  # only the changed file is read
    (Path(os.environ["CCTUNING_CACHE"]) / FINGERPRINT_INDEX).write_text("not json")
    assert folder_fingerprint(weights) == folder_fingerprint(weights)  # a damaged memo is rebuilt


# -- full disks, read-only folders -------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_refused_write_is_one_line_naming_the_path(project, tmp_path, monkeypatch, capsys, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr("cctuning.inference.export.export_model", refuse)
    assert main(["export", "--model", str(project / "run"), "--output", str(tmp_path / "out")]) == 2
    assert (
        one_error(capsys) == f"cctuning: error: {tmp_path / 'out' / 'model.safetensors'}: {os.strerror(code)}"
    )


def _fill_the_disk(monkeypatch, written: list) -> None:
    """Every temporary file of the atomic writers gets a few bytes, then the disk is full."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(".") and self.name.endswith(".tmp"):
            real(self, text[:10], *args, **kwargs)
            written.append(self)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_while_generate_writes_leaves_no_partial_file(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen.jsonl"
    written: list = []
    _fill_the_disk(monkeypatch, written)
    assert main(["generate", "--model", str(project / "run"), "--prompt", "hi", "--output", str(out)]) == 2
    assert one_error(capsys) == f"cctuning: error: {out}: {os.strerror(errno.ENOSPC)}"
    assert written and list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_a_full_disk_while_eval_nll_writes_leaves_no_partial_result(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nll"
    written: list = []
    _fill_the_disk(monkeypatch, written)
    argv = [
        "eval",
        "--model",
        str(project / "run"),
        "--nll",
        str(project / "data.jsonl"),
        "--output",
        str(out),
    ]
    assert main(argv) == 2
    line = one_error(capsys)
    assert line.endswith(os.strerror(errno.ENOSPC)) and str(out) in line
    assert not [p for p in out.rglob("*") if p.name != LOCK_NAME and p.is_file()]


def test_a_full_disk_under_safetensors_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError) as err:
        save_safetensors(path, {"w": torch.zeros(2)})
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []


def _full_disk_while_saving(monkeypatch) -> None:
    """The Decision Maker's file is written inside CCModel.save_pretrained's staging folder: the disk
    is full there (an OSError without a file name, as a failed close gives)."""

    def full(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("cctuning.model.ccmodel.save_safetensors", full)


def test_a_full_disk_while_export_writes_names_the_output_and_leaves_nothing(
    project, tmp_path, monkeypatch, capsys
):
    _full_disk_while_saving(monkeypatch)
    out = tmp_path / "exported"
    assert main(["export", "--model", str(project / "run"), "--output", str(out)]) == 2
    assert one_error(capsys) == f"cctuning: error: {out}: {os.strerror(errno.ENOSPC)}"
    assert list(tmp_path.iterdir()) == []  # no output folder, no hidden stage beside it


def test_a_full_disk_while_train_saves_names_the_folder(project, tmp_path, monkeypatch, capsys):
    _full_disk_while_saving(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--model", project / "base", "--data", project / "data.jsonl", "--output", out,
            "--max-steps", "1", "--batch-size", "4", "--no-checkpoints"]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    assert one_error(capsys) == f"cctuning: error: {out}: {os.strerror(errno.ENOSPC)}"
    assert not (out / "model.safetensors").exists() and not list(out.glob(".stage-*"))


def test_a_full_disk_while_the_trainer_writes_a_checkpoint_is_one_line(
    project, tmp_path, monkeypatch, capsys
):
    import torch

    def full(*args, **kwargs):  # what torch.save raises when the disk fills under its archive writer
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 73216 vs 73104")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    argv = ["train", "--model", project / "base", "--data", project / "data.jsonl", "--output", out,
            "--max-steps", "1", "--batch-size", "4", "--save-steps", "1"]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    line = one_error(capsys)
    assert f"{out}: a checkpoint could not be written" in line and "disk full" in line
    assert not (out / "checkpoint-1" / "trainer_state.json").exists()  # never taken for a finished one


def test_a_write_that_names_no_file_is_named_by_where_it_writes(tmp_path):
    with pytest.raises(OSError) as err, writes_into(tmp_path / "cache.jsonl"):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # a library's close() on a full quota
    assert (err.value.errno, err.value.filename) == (errno.EDQUOT, str(tmp_path / "cache.jsonl"))
    with pytest.raises(OSError) as err, writes_into(tmp_path / "cache.jsonl"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # not a refused write: left as it is
    assert err.value.filename is None


# -- hostile configs, half-written runs, misleading messages ------------------------------------------------
@pytest.mark.parametrize("command", ["train", "eval", "experiment"])
def test_a_config_that_is_not_utf8_is_one_line_naming_the_file(project, tmp_path, capsys, command):
    path = tmp_path / "conf.yaml"
    path.write_bytes(b"seed: 1\nsystem_prompt: caf\xe9\n")
    argv = {
        "train": ["train", "--config", path, "--model", project / "base", "--data", project / "data.jsonl",
                  "--output", tmp_path / "out"],
        "eval": ["eval", "--config", path, "--model", project / "run"],
        "experiment": ["experiment", "--config", path],
    }[command]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    line = one_error(capsys)
    assert f"{path}:2: not UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_model_folder_left_incomplete(project, tmp_path, capsys):
    model = tmp_path / "half"
    shutil.copytree(project / "base", model)
    (model / INCOMPLETE_MARKER).write_text("interrupted\n")
    argv = ["train", "--model", model, "--data", project / "data.jsonl", "--output", tmp_path / "out"]
    assert main([str(a) for a in argv]) == 2
    assert f"--model {model}: an interrupted save left this folder incomplete" in one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("left", ["our files", "a checkpoint"])
def test_exporting_a_run_without_its_weights_says_so(project, tmp_path, capsys, left):
    run = tmp_path / "run"
    run.mkdir()
    if left == "our files":
        shutil.copy(project / "run" / "cctuning_config.json", run)
    else:
        (run / "checkpoint-2").mkdir()
    assert main(["export", "--model", str(run), "--output", str(tmp_path / "out")]) == 2
    line = one_error(capsys)
    assert f"{run}: an incomplete run, without its model weights" in line and "Unrecognized" not in line
    assert ("--resume last" in line) == (left == "a checkpoint")


def test_a_max_length_of_zero_is_reported_as_given(project, capsys):
    argv = [
        "eval",
        "--model",
        str(project / "run"),
        "--nll",
        str(project / "data.jsonl"),
        "--max-length",
        "0",
    ]
    assert main(argv) == 2
    assert "--max-length must be > 0 tokens, got 0" in one_error(capsys)


def test_a_parquet_file_without_rows_says_it_has_no_records(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from cctuning.data.records import load_records

    path = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({k: pa.array([], pa.string()) for k in ("instruction", "output", "instruction_en")}), path
    )
    with pytest.raises(CCError) as err:
        load_records(path)
    assert str(err.value) == f"{path}: no records"


def test_export_reads_a_run_beside_other_readers_but_not_while_it_is_written(project, tmp_path, capsys):
    """export read the run under an exclusive lock, refused while anything else read it; now a shared one."""
    run = tmp_path / "run"
    shutil.copytree(project / "run", run)
    argv = ["export", "--model", str(run), "--output", str(tmp_path / "exported")]
    with folder_lock(run, "cctuning eval", shared=True):
        assert main(argv) == 0
    with folder_lock(run, "cctuning train"):
        assert main([*argv[:-1], str(tmp_path / "again")]) == 2
        assert f"in use by pid {os.getpid()} (cctuning train)" in one_error(capsys)
    assert not (tmp_path / "again").exists() and not (run / LOCK_NAME).exists()
