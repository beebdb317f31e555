"""Faults: a killed run resumes to the same weights, interrupted saves never load, mismatches and
untrusted folders fail with one clear line."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cctuning.io as io
from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.inference import TransformMatrix
from cctuning.io import INCOMPLETE_MARKER
from cctuning.loading import load_tokenizer
from cctuning.model import CCConfig, CCModel
from cctuning.model.transform import DECISION_MAKER_STAMP, MATRIX_NAME, MATRIX_REPORT_NAME
from cctuning.testing import tiny_model, tiny_tokenizer
from cctuning.training.run import last_checkpoint
from tests.conftest import ResumeCheck, flags, make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "cli_worker.py"


def error_line(err: str) -> str:
    """The CLI's one error line (progress bars of model loading may precede it), and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("cctuning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- kill and resume -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_while_saving_a_checkpoint_then_resume_reaches_the_same_weights(
    base_dir, data_file, tmp_path, capsys
):
    check = ResumeCheck(tmp_path, base_dir, data_file, save_steps="1", warmup_ratio="0")
    part = check.part
    env = {
        **os.environ,
        "CCT_TEST_PAUSE_AT": "2",
        "CCT_TEST_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": str(ROOT),
    }
    # the run to kill: it stops (sleeps) half-way through writing checkpoint-2, after checkpoint-1
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *check.command, "--output", str(part)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        check.run_full()  # the uninterrupted run, meanwhile
        deadline = time.time() + 240
        while not (part / "paused").exists():
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "the run never reached checkpoint-2"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    capsys.readouterr()
    # what the kill left: checkpoint-1 complete, checkpoint-2 half-written and refused, no final model
    assert (part / "checkpoint-2" / "config.json").is_file()
    assert not (part / "checkpoint-2" / "model.safetensors").exists()
    assert not (part / "model.safetensors").exists()
    with pytest.raises(CCError, match="interrupted save"):
        CCModel.from_pretrained(part / "checkpoint-2")
    assert last_checkpoint(part) == str(part / "checkpoint-1")
    check.resume()
    assert json.loads((part / "train_results.json").read_text())["global_step"] == 4
    assert (
        not (part / INCOMPLETE_MARKER).exists() and not (part / "checkpoint-2" / INCOMPLETE_MARKER).exists()
    )


def test_resume_from_a_folder_that_is_not_a_finished_checkpoint_is_a_clear_error(
    base_dir, data_file, tmp_path, capsys
):
    (tmp_path / "half").mkdir()
    code = main(
        ["train", *flags(model=base_dir, data=data_file, output=tmp_path / "o", resume=tmp_path / "half")]
    )
    assert code == 2 and "not a finished checkpoint" in error_line(capsys.readouterr().err)


# -- atomic writes ----------------------------------------------------------------------------------------
def test_a_save_interrupted_at_any_rename_is_refused_and_a_good_save_repairs_it(
    tokenizer, tmp_path, monkeypatch
):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig()).eval()
    folder = tmp_path / "m"
    cc.save_pretrained(folder, tokenizer=tokenizer)  # a good old version
    old = cc.decision_maker.proj.weight.detach().clone()
    files = len([p for p in folder.iterdir() if not p.name.startswith(".")])
    real_replace = os.replace

    class Crash(BaseException):
        """Not an Exception: nothing on the way may swallow it, as with a kill."""

    def crash_at(limit: int, into: Path):
        moved = []

        def crashing_replace(src, dst, *args):
            dst = Path(dst)
            if dst.parent == into and dst.name != INCOMPLETE_MARKER:
                if len(moved) == limit:
                    raise Crash()
                moved.append(dst)
            return real_replace(src, dst, *args)

        return crashing_replace

    # a crash while the new version is still being written into the staging folder: the old one stands
    monkeypatch.setattr(io.os, "replace", lambda src, dst, *a: (_ for _ in ()).throw(Crash()))
    with torch.no_grad():
        cc.decision_maker.proj.weight.add_(1.0)
    with pytest.raises(Crash):
        cc.save_pretrained(folder, tokenizer=tokenizer)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert torch.equal(CCModel.from_pretrained(folder).decision_maker.proj.weight, old)
    # a crash before the 1st, 2nd, ... last rename into the folder: old and new files would mix
    for limit in range(files):
        monkeypatch.setattr(io.os, "replace", crash_at(limit, folder))
        with pytest.raises(Crash):
            cc.save_pretrained(folder, tokenizer=tokenizer)
        monkeypatch.setattr(io.os, "replace", real_replace)
        with pytest.raises(CCError, match="interrupted save"):
            CCModel.from_pretrained(folder)
    cc.save_pretrained(folder, tokenizer=tokenizer)
    loaded = CCModel.from_pretrained(folder)
    assert torch.equal(loaded.decision_maker.proj.weight, cc.decision_maker.proj.weight)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no marker, stage or temp file left


# -- mismatches ------------------------------------------------------------------------------------------
def test_a_matrix_from_another_model_of_the_same_shape_is_refused(tokenizer, tmp_path):
    d = 32
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer, seed=seed), CCConfig())
        cc.set_transform(TransformMatrix(torch.randn(d, d)))
        cc.save_pretrained(tmp_path / name, tokenizer=tokenizer)
        models[name] = cc
    loaded = CCModel.from_pretrained(tmp_path / "a")
    torch.testing.assert_close(loaded.transform.matrix, models["a"].transform.matrix)
    for file in (MATRIX_NAME, MATRIX_REPORT_NAME):
        shutil.copy(tmp_path / "a" / file, tmp_path / "b" / file)
    with pytest.raises(CCError, match="fitted on another model"):
        CCModel.from_pretrained(tmp_path / "b")


def test_a_matrix_fitted_by_the_cli_is_tied_to_its_model(tokenizer, tmp_path, capsys):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    cc.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", make_records(12))
    assert (
        main(
            [
                "fit-matrix",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(data),
                "--samples",
                "12",
                "--heldout",
                "0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    loaded = CCModel.from_pretrained(tmp_path / "m")
    assert loaded.transform.meta[DECISION_MAKER_STAMP] == loaded.decision_maker_sha256
    assert loaded.decision_maker_sha256 is not None


def test_prompt_longer_than_the_models_context_names_file_line_and_field(base_dir, tmp_path, capsys):
    rows = make_records(3)
    rows[1]["instruction"] = " ".join(
        f"neno{i}" for i in range(400)
    )  # > 512 tokens, the tiny model's context
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    args = ["train", *flags(model=base_dir, data=data, output=tmp_path / "o", max_steps="1", batch_size="2")]
    code = main(args + ["--max-length", "4096"])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "long.jsonl:2: field 'instruction'" in err and "context of 512" in err
    assert main(args + ["--max-length", "512"]) == 0  # within the context it is truncated instead


def test_chat_template_required_but_missing_is_one_line(tmp_path, capsys):
    tok = tiny_tokenizer(chat_template=False)
    tiny_model("llama", tokenizer=tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", make_records(2))
    code = main(["train", *flags(model=tmp_path / "base", data=data, output=tmp_path / "o", template="chat")])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "no chat template" in err and "--template plain" in err


def test_unrecognisable_layers_through_the_cli_is_one_line(base_dir, data_file, tmp_path, capsys):
    code = main(
        ["train", *flags(model=base_dir, data=data_file, output=tmp_path / "o", layers_path="model.nothing")]
    )
    assert code == 2 and "--layers-path 'model.nothing'" in error_line(capsys.readouterr().err)


def test_a_damaged_cctuning_config_is_one_line(tokenizer, tmp_path):
    CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig()).save_pretrained(tmp_path)
    (tmp_path / "cctuning_config.json").write_text('{"method": "cc", "inject_layer": "first"}')
    with pytest.raises(CCError, match="'inject_layer': expected int"):
        CCModel.from_pretrained(tmp_path)
    (tmp_path / "cctuning_config.json").write_text('{"method": "cc", ')
    with pytest.raises(CCError, match="not a valid JSON file"):
        CCModel.from_pretrained(tmp_path)


# -- untrusted folders -------------------------------------------------------------------------------------
class _Planted:
    """Unpickling this runs code: what a malicious pickle would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle ran"))


def test_loading_a_folder_never_runs_code_from_it(tokenizer, tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "evil"
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    cc.save_pretrained(folder, tokenizer=tokenizer)
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('import ran')\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for load in (CCModel.from_pretrained, load_tokenizer):
        try:
            load(str(folder))
        except CCError as err:
            assert "\n" not in str(err)
        assert not marker.exists(), f"{load.__qualname__} ran code from the folder"
    # our folders are read as safetensors only: a planted pickle is refused, never unpickled
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Planted(str(marker)), fh)
    with pytest.raises(CCError):
        CCModel.from_pretrained(folder)
    assert not marker.exists()
