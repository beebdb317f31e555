"""Hostile inputs (issue 26): huge records in fit-matrix, prompts beyond the model's context, a matrix
that maps nothing, template tokens inside the data, lm-eval's own errors."""

import json
import logging
import shutil

import pytest
import torch

from cctuning.cli import main
from cctuning.data.encoding import CHARS_PER_TOKEN
from cctuning.data.records import Record
from cctuning.eval.nll import evaluate_nll
from cctuning.inference.matrix import WEAK_COSINE, fit_matrix_from_file, fit_transform_matrix
from cctuning.model.arch import context_length
from tests.conftest import connected_model, make_records, write_jsonl


class SpyTokenizer:
    """The tiny tokenizer, refusing a text longer than ``limit`` characters (a whole huge record)."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit = inner, limit

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        assert len(text) <= self.limit, f"the tokenizer got {len(text)} characters"
        return self.inner(text, **kwargs)


def _pairs(n: int = 6, long: str | None = None) -> list[Record]:
    """``n`` parallel records; ``long``: the first one's instruction and the second's English one."""
    rows = make_records(n)
    if long is not None:
        rows[0]["instruction"] = rows[1]["instruction_en"] = long
    return [Record(instruction=r["instruction"], output=r["output"], instruction_en=r["instruction_en"])
            for r in rows]  # fmt: skip


# -- 1. a token budget in fit-matrix ----------------------------------------------------------------
def test_fit_matrix_never_tokenises_a_huge_record_whole(tokenizer, tmp_path):
    huge = "Habari ya asubuhi rafiki yangu. " * 40_000  # 1.3 M characters
    rows = make_records(6)
    rows[0]["instruction"] = huge
    data = write_jsonl(tmp_path / "huge.jsonl", rows)
    # the default budget (at most 1024 tokens) cuts the record by characters first: at most 8 times
    # the first cut's length (one retry), plus the template's own characters
    spy = SpyTokenizer(tokenizer, limit=1024 * CHARS_PER_TOKEN * 8 + 1000)
    folder = tmp_path / "model"
    folder.mkdir()
    report = fit_matrix_from_file(connected_model(tokenizer), spy, data, folder, samples=6)
    assert report.pairs == 6 and report.max_length <= 1024


# -- 2. budgets capped to the model's context -------------------------------------------------------
LONG = "Habari ya asubuhi rafiki yangu " * 200  # about 1000 tokens: more than 512 positions


def _gpt2_model(tokenizer):
    model = connected_model(tokenizer, arch="gpt2")
    assert context_length(model) == 512  # GPT-2's n_positions: an index error beyond it
    return model


def test_fit_matrix_caps_its_budget_to_the_models_context(tokenizer, caplog):
    pairs = _pairs(long=LONG)
    with caplog.at_level(logging.INFO, logger="cctuning"):
        _, report = fit_transform_matrix(_gpt2_model(tokenizer), tokenizer, pairs, samples=6)
    assert report.max_length == 512 and report.warnings == []  # a matrix that works: no warning
    assert "capped to the model's context of 512" in caplog.text


def test_eval_nll_caps_its_budget_to_the_models_context(tokenizer, tmp_path, caplog):
    rows = make_records(4)
    rows[0]["instruction"], rows[1]["output"] = LONG, LONG
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="cctuning"):
        report = evaluate_nll(_gpt2_model(tokenizer), tokenizer, data, "transform", progress=False, reps=10)
    assert report["truncation"]["max_length"] == 512
    assert report["truncation"]["instructions_cut"] >= 1 and report["truncation"]["responses_cut"] >= 1
    assert "capped to the model's context of 512" in caplog.text


# -- 3. a weak matrix warns -------------------------------------------------------------------------
def _dead_model(tokenizer):
    """A CC model whose FFNs output nothing: every activation pair is zero, the matrix too."""
    model = connected_model(tokenizer)
    with torch.no_grad():
        for layer in model.base.model.layers:
            layer.mlp.down_proj.weight.zero_()
    return model


def test_a_weak_matrix_is_warned_about_and_recorded(tokenizer, tmp_path, caplog, capsys):
    folder = tmp_path / "dead"
    _dead_model(tokenizer).save_pretrained(folder, tokenizer=tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_records(8))
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        assert main(["fit-matrix", "--model", str(folder), "--data", str(data), "--samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert "warning: weak transform matrix" in printed
    assert "weak transform matrix" in caplog.text
    saved = json.loads((folder / "transform_matrix.json").read_text())
    assert saved["heldout"]["after"]["cosine"] <= WEAK_COSINE
    assert any("weak transform matrix" in w for w in saved["warnings"])


# -- 5. lm-eval's own errors in one line ------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.slow  # lm-eval indexes its tasks: about 20 s
def test_lm_eval_unknown_task_is_one_line(offline, base_dir, capsys):
    argv = [
        "lm-eval",
        "--model",
        "cctuning",
        "--model_args",
        f"pretrained={base_dir}",
        "--tasks",
        "nosuchtask",
    ]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert line.startswith("cctuning: error:") and "nosuchtask" in line and "ls tasks" in line


@pytest.mark.slow  # lm-eval indexes its tasks: about 20 s
def test_lm_eval_hf_on_remote_code_is_one_line_and_runs_nothing(offline, base_dir, tmp_path, capsys):
    folder = tmp_path / "remote"
    shutil.copytree(base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil"  # a type transformers does not know: only the folder's code loads it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "the_code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    argv = ["lm-eval", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "cctuning_xnli_sw",
            "--limit", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert str(folder) in line and "trust_remote_code=True" in line
    assert not marker.exists()
