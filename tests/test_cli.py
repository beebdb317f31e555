"""`cctuning train` on a tiny model with good and bad input, options from flags and YAML, the console
script, train's --help in sections, --no-checkpoints. What a run saves and resuming it:
tests/test_trainer.py; start-up, --version and -v: tests/test_cli_startup.py."""

import dataclasses
import json
import subprocess
import sys

import pytest

from cctuning.cli import build_parser, main
from cctuning.config import build_config, split_list
from cctuning.errors import CCError
from cctuning.training import TrainConfig
from cctuning.training.args import OPTION_GROUPS
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


# -- train --help ----------------------------------------------------------------------------------------
def train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out


def test_train_help_shows_the_common_options_first_with_their_defaults(capsys):
    text = train_help(capsys)
    titles = [*OPTION_GROUPS, "transformers.TrainingArguments"]
    starts = [text.index(f"\n{title}:\n") for title in titles]
    assert starts == sorted(starts)  # the sections in this order
    common = text[starts[0] : starts[1]]
    defaults = TrainConfig()
    for flag, value in [("--batch-size", defaults.batch_size), ("--lr", defaults.lr), ("--epochs", defaults.epochs),
                        ("--max-length", defaults.max_length), ("--save-total-limit", defaults.save_total_limit),
                        ("--method", defaults.method), ("--lora-r", defaults.lora_r)]:  # fmt: skip
        entry = common[common.index(f"  {flag} ") :].split("\n  --")[0]
        assert f"(default: {value})" in " ".join(entry.split()), flag
    for flag in (
        "--model MODEL",
        "--data DATA",
        "--output DIR",
        "--save-strategy",
        "--no-checkpoints",
        "--resume",
    ):
        assert f"  {flag}" in common, flag
    assert "--adam-beta2" in text[starts[-1] :] and "--adam-beta2" not in text[: starts[-1]]
    assert "--tau FLOAT" in text[starts[1] : starts[2]]  # the mechanism's options


def test_every_train_option_is_in_one_section():
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli") is not False]
    assert sorted(grouped) == sorted(fields)


# -- checkpoints -----------------------------------------------------------------------------------------
def test_no_checkpoints_keeps_only_the_final_folder(base_dir, data_file, tmp_path, capsys):
    argv = ["train", *flags(model=base_dir, data=data_file), *FAST, "--save-steps", "1"]
    assert main([*argv, "--output", str(tmp_path / "with")]) == 0
    assert sorted(p.name for p in (tmp_path / "with").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    out = tmp_path / "without"
    assert main([*argv, "--output", str(out), "--no-checkpoints"]) == 0
    # the same final folder, without the checkpoints
    final = {p.name for p in (tmp_path / "with").iterdir() if not p.name.startswith("checkpoint-")}
    assert {p.name for p in out.iterdir()} == final
    assert {"model.safetensors", "decision_maker.safetensors", "train_results.json"} <= final
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 3
    assert f"saved cc model to {out}" in capsys.readouterr().out


def test_save_strategy_no_in_yaml_is_no_checkpoints(tmp_path):
    from cctuning.training.options import build_train_config
    from cctuning.training.run import build_training_arguments

    path = tmp_path / "c.yaml"
    for text in ("save_strategy: no\n", "trainer:\n  save_strategy: 'no'\n", "save-strategy: steps\n"):
        path.write_text(f"output: {tmp_path / 'o'}\n{text}")
        cfg = build_train_config(str(path), {})
        expected = "steps" if "steps" in text else "no"
        assert cfg.trainer == {"save_strategy": expected}
        assert build_training_arguments(cfg).save_strategy == expected
    assert build_train_config(None, {"trainer.save_strategy": "no"}).trainer == {"save_strategy": "no"}
    parser = build_parser()
    assert vars(parser.parse_args(["train", "--no-checkpoints"]))["trainer.save_strategy"] == "no"
