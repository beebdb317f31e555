"""`cctuning train` end to end on a tiny model, with good and bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cctuning.cli import main
from cctuning.config import build_config
from cctuning.errors import CCError
from cctuning.model import CCModel
from cctuning.training import TrainConfig
from tests.conftest import flags, make_records, write_jsonl

FAST = [
    "--max-steps",
    "3",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--logging-steps",
    "1",
    "--warmup-ratio",
    "0",
]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", ["cc", "sft"])
def test_train_end_to_end(base_dir, data_file, tmp_path, capsys, method):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["train", *flags(model=base_dir, data=data_file, output=out, method=method), *FAST],
        capsys,
    )
    assert code == 0 and f"saved {method} model" in stdout
    cfg = json.loads((out / "cctuning_config.json").read_text())
    assert cfg["method"] == method and cfg["versions"]["torch"] == torch.__version__
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3 and results["records"] == 12
    base = load_file(str(base_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the LLM was trained
    model = CCModel.from_pretrained(out)
    assert model.cc_config.method == method
    if method == "cc":
        assert (out / "decision_maker.safetensors").is_file()
        assert sum(results["layer_choice_counts"]) == 12  # 3 steps × batch 4, one choice per example
    else:
        assert not (out / "decision_maker.safetensors").exists() and model.decision_maker is None


def test_sft_trains_on_records_without_english(base_dir, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "instruction_en"} for r in make_records(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    args = ["train", *flags(model=base_dir, data=data, output=tmp_path / "o"), *FAST]
    code, _, err = run_cli(args + ["--method", "sft"], capsys)
    assert code == 0
    code, _, err = run_cli(args + ["--method", "cc"], capsys)
    assert code == 2 and "sft.jsonl:1: field 'instruction_en': missing" in err


BAD_LINES = [
    ('{"instruction": "a", "output": ', "bad.jsonl:3: malformed JSON"),
    ('{"instruction": "", "output": "b", "instruction_en": "c"}', "bad.jsonl:3: field 'instruction': empty"),
    (
        '{"instruction": "a", "output": ["b"], "instruction_en": "c"}',
        "bad.jsonl:3: field 'output': must be a string",
    ),
]


@pytest.mark.parametrize("line,expected", BAD_LINES)
def test_bad_data_is_one_line_error_without_traceback(base_dir, tmp_path, capsys, line, expected):
    rows = make_records(4)
    data = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [line] + rows[2:])
    code, _, err = run_cli(
        ["train", *flags(model=base_dir, data=data, output=tmp_path / "o"), *FAST],
        capsys,
    )
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_user_errors_are_reported_in_one_line(base_dir, data_file, tmp_path, capsys):
    code, _, err = run_cli(
        ["train", *flags(model=tmp_path / "nope", data=data_file, output=tmp_path / "o")],
        capsys,
    )
    assert code == 2 and "nope" in err and err.count("\n") == 1
    code, _, err = run_cli(["train", *flags(data=data_file, output=tmp_path / "o")], capsys)
    assert code == 2 and "--model is required" in err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 1e-4\nbatchsize: 3\n")
    code, _, err = run_cli(["train", "--config", str(yaml_file)], capsys)
    assert code == 2 and "c.yaml: unknown option 'batchsize'" in err
    yaml_file.write_text("max_steps: many\n")
    code, _, err = run_cli(["train", "--config", str(yaml_file)], capsys)
    assert code == 2 and "option 'max_steps': expected int" in err


def test_yaml_config_and_flags_override_it(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "model: m\nlr: 1.0e-4\nmax-steps: 7\nenglish_grad: true\ntrainer:\n  adam_beta2: 0.95\n"
    )
    cfg = build_config(TrainConfig, str(yaml_file), {"max_steps": "9"})
    assert (cfg.model, cfg.lr, cfg.max_steps, cfg.english_grad) == ("m", 1e-4, 9, True)
    assert cfg.trainer == {"adam_beta2": 0.95} and cfg.batch_size == TrainConfig().batch_size
    with pytest.raises(CCError, match="expected float"):
        build_config(TrainConfig, None, {"lr": "fast"})


def test_resume_reaches_the_same_weights(base_dir, data_file, tmp_path, capsys):
    common = [
        "train",
        *flags(
            model=base_dir,
            data=data_file,
            max_steps="4",
            batch_size="2",
            lr="1e-3",
            save_steps="2",
            save_total_limit="5",
        ),
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(common + ["--output", str(full)], capsys)[0] == 0
    assert run_cli(common + ["--output", str(part)], capsys)[0] == 0
    # simulate a run killed right after its first checkpoint: only checkpoint-2 survives
    for item in part.iterdir():
        if item.name != "checkpoint-2":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    code, _, _ = run_cli(common + ["--output", str(part), "--resume", "last"], capsys)
    assert code == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        load_file(str(full / "decision_maker.safetensors"))["weight"],
        load_file(str(part / "decision_maker.safetensors"))["weight"],
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.slow
def test_console_script_runs_as_a_process(base_dir, data_file, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cctuning.cli",
            "train",
            "--model",
            str(base_dir),
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and "missing.jsonl: no such file" in proc.stderr
        and "Traceback" not in proc.stderr
    )
