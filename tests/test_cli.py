"""`cctuning train` on a tiny model with good and bad input, options from flags and YAML, the console
script. What a run saves and resuming it: tests/test_trainer.py."""

import subprocess
import sys

import pytest

from cctuning.cli import main
from cctuning.config import build_config, split_list
from cctuning.errors import CCError
from cctuning.training import TrainConfig
from tests.conftest import FAST, flags, make_records, write_jsonl


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sft_trains_on_records_without_english(base_dir, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "instruction_en"} for r in make_records(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    args = ["train", *flags(model=base_dir, data=data, output=tmp_path / "o"), *FAST]
    code, _, err = run_cli(args + ["--method", "sft"], capsys)
    assert code == 0
    # a fresh --output: the one above now holds a run, which is refused before the data is read
    args[args.index(str(tmp_path / "o"))] = str(tmp_path / "o2")
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


def test_split_list_strips_items_and_drops_empty_ones():
    assert split_list("XNLI, MKQA ,,xlsum,") == ["XNLI", "MKQA", "xlsum"]
    assert split_list("en") == ["en"]
    assert split_list("") == split_list(None) == split_list(" , ") == []


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
