"""Every transformers.TrainingArguments field as a flag of `cctuning train` (generated), how flags, YAML
and our own options meet, the warmup ratio as the Trainer's schedule, --report-to tensorboard (read
back from the event file) and wandb offline; --config for generate, eval and fit-matrix."""

import dataclasses
import enum
import importlib.util
import json
import math
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from cctuning.cli import apply_config_file, build_parser, main
from cctuning.cli.common import given_flags
from cctuning.config import _base_type
from cctuning.errors import CCError
from cctuning.training import TrainConfig, options
from cctuning.training.options import (
    FIXED,
    OUR_DEFAULTS,
    SPEC_FILE,
    build_train_config,
    generate_trainer_specs,
    resolve_trainer_options,
    trainer_fields,
    trainer_flag_specs,
    twins,
)
from cctuning.training.run import build_training_arguments
from tests.conftest import FAST, flags


def parse(*argv: str, command: str = "train"):
    parser = build_parser()
    argv = [command, *map(str, argv)]
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def train_config(*argv: str) -> TrainConfig:
    args = parse(*argv)
    return build_train_config(args.config, given_flags(args))


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cctuning: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# -- the generated flags -------------------------------------------------------------------------------
def test_every_training_arguments_field_has_a_flag():
    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    options = set(train._option_string_actions)
    missing = []
    for name, tf in trainer_fields().items():
        if "--" + name.replace("_", "-") not in options:
            missing.append((name, _base_type(tf.type)))
    # only fields that hold a Python object (no text form) have none
    assert all(base not in (bool, int, float, str, list, dict) for _, base in missing), missing
    assert len(trainer_fields()) > 100 and len(missing) <= 2
    for flag in ("--deepspeed", "--report-to", "--adam-beta2", "--weight-decay", "--optim", "--fsdp"):
        assert flag in options


def pinned_transformers() -> str:
    constraints = Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt"
    return re.search(r"^transformers==(\S+)", constraints.read_text(), re.M).group(1)


def test_shipped_flags_are_those_of_the_pinned_transformers():
    """The flags `cctuning train --help` reads instead of importing transformers: the shipped file is
    for the version the project pins, and is what the installed dataclass generates."""
    shipped = json.loads(SPEC_FILE.read_text(encoding="utf-8"))
    assert shipped["transformers"] == pinned_transformers() and shipped["schema"] == options.SPEC_SCHEMA
    if metadata.version("transformers") != shipped["transformers"]:
        pytest.skip("another transformers than the pinned one is installed")
    # if this fails: python -c "from cctuning.training.options import write_spec_file; write_spec_file()"
    assert shipped["fields"] == generate_trainer_specs()
    assert trainer_flag_specs() == shipped["fields"]


def plain(value):
    """A default as JSON holds it, worked out from the value itself."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


WIDER = {("int", "float"), ("str", "list"), ("str", "dict")}


def test_flags_match_the_dataclass_fields():
    """Names, types, defaults and choices of the flags in use, against TrainingArguments itself."""
    specs = {s["name"]: s for s in trainer_flag_specs()}
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(specs) <= set(fields) and len(specs) >= len(fields) - 2
    kinds = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
    for name, spec in specs.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert spec["default"] == plain(default), name
        assert spec["choices"] == (list(f.metadata["choices"]) if f.metadata.get("choices") else None), name
        assert spec["flags"][0] == "--" + name.replace("_", "-")
        if default is not None and not isinstance(default, enum.Enum):  # the flag holds its default
            expected = kinds[type(plain(default))]
            # (a float field with an int default; a str-or-list field such as report_to)
            assert spec["type"] == expected or (expected, spec["type"]) in WIDER, name
        assert (spec["nargs"] == "+") == (spec["type"] == "list"), name
    assert specs["save_strategy"]["metavar"] == "{no,steps,epoch,best}"  # an enum: its values
    assert specs["liger_kernel_config"]["type"] == "dict" and specs["report_to"]["type"] == "list"


def test_flags_of_another_transformers_are_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTUNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(options.metadata, "version", lambda name: "9.9.9")
    calls = []

    def generate():
        calls.append(1)
        return [{"name": "made_up", "flags": ["--made-up"]}]

    monkeypatch.setattr(options, "generate_trainer_specs", generate)
    assert trainer_flag_specs() == trainer_flag_specs() == [{"name": "made_up", "flags": ["--made-up"]}]
    assert len(calls) == 1  # the second came from the cache
    cached = tmp_path / "cache" / "trainer-flags-9.9.9.json"
    assert json.loads(cached.read_text())["transformers"] == "9.9.9"
    cached.write_text('{"schema": 0, "transformers": "9.9.9", "fields": []}')  # an older layout
    assert trainer_flag_specs()[0]["name"] == "made_up" and len(calls) == 2
    cached.write_text("{cut")
    assert trainer_flag_specs()[0]["name"] == "made_up" and len(calls) == 3
    monkeypatch.setenv("CCTUNING_CACHE", str(cached / "not-a-folder"))  # cannot be written: still works
    assert trainer_flag_specs()[0]["name"] == "made_up" and len(calls) == 4


def test_flags_reach_the_trainer_and_only_those(tmp_path):
    cfg = train_config(
        *flags(output=tmp_path / "o", adam_beta2=0.95, weight_decay=0.1, optim="adamw_torch"),
        *("--report-to", "none"),
        *("--lr-scheduler-kwargs", '{"num_cycles": 2}'),
        *("--label-names", "labels", "extra"),
        "--no-dataloader-drop-last",
        *("--liger-kernel-config", '{"rope": false}'),
    )
    assert cfg.weight_decay == 0.1  # our own option (same name as the field)
    assert cfg.trainer == {
        "adam_beta2": 0.95,
        "optim": "adamw_torch",
        "lr_scheduler_kwargs": '{"num_cycles": 2}',
        "label_names": ["labels", "extra"],
        "dataloader_drop_last": False,
        "liger_kernel_config": {"rope": False},
    }
    args = build_training_arguments(cfg)
    assert (args.adam_beta2, args.weight_decay, args.optim) == (0.95, 0.1, "adamw_torch")
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.label_names == ["labels", "extra"]
    # what was not given keeps our defaults, not the Trainer's
    assert args.learning_rate == TrainConfig().lr and args.per_device_train_batch_size == 16
    assert args.data_seed == 42 and args.remove_unused_columns is False and args.report_to == []
    # a field given as a flag overrides one of our defaults
    args = build_training_arguments(train_config(*flags(output=tmp_path / "o", data_seed=7)))
    assert args.data_seed == 7 and args.seed == 42
    # a fixed field given our own value is accepted
    assert train_config("--no-remove-unused-columns").trainer == {}


def test_deepspeed_and_report_to_lists_are_parsed(tmp_path):
    cfg = train_config("--deepspeed", "ds.json", "--report-to", "tensorboard", "wandb")
    assert cfg.trainer == {"deepspeed": "ds.json"} and cfg.report_to == ["tensorboard", "wandb"]


def test_twins_set_our_options_and_disagreeing_ones_are_refused(tmp_path, capsys):
    cfg = train_config(
        *flags(
            learning_rate="3e-4",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            num_train_epochs=1,
            lr_scheduler_type="linear",
            output_dir=tmp_path / "o",
            resume_from_checkpoint="last",
        ),
        "--activation-checkpointing",
    )
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.scheduler) == (3e-4, 2, 4, 1.0, "linear")
    assert (cfg.output, cfg.resume, cfg.gradient_checkpointing) == (str(tmp_path / "o"), "last", True)
    assert cfg.trainer == {}
    assert train_config("--lr", "1e-4", "--learning-rate", "0.0001").lr == 1e-4  # the same value: fine
    err = one_line_error(capsys, ["train", "--lr", "1e-4", "--learning-rate", "1e-3"])
    assert "--lr 0.0001 and --learning-rate 0.001 disagree" in err
    err = one_line_error(capsys, ["train", "--batch-size", "4", "--per-device-train-batch-size", "8"])
    assert "--batch-size 4 and --per-device-train-batch-size 8 disagree" in err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--remove-unused-columns"], "--remove-unused-columns: cctuning sets it to False"),
        (["--adam-beta2", "high"], "--adam-beta2: expected float, got 'high'"),
        (["--log-level", "loud"], "--log-level: expected one of detail"),
        (["--warmup-ratio", "0.2", "--warmup-steps", "3"], "both set the warmup"),
        (["--report-to", "nosuchlogger"], "--report-to nosuchlogger: not an integration of the Trainer"),
        (["--optim", "nosuchoptim"], "invalid training arguments:"),
        (["--liger-kernel-config", "{broken"], "--liger-kernel-config: expected dict"),
    ],
)
def test_bad_trainer_flags_are_one_line_errors(base_dir, data_file, tmp_path, capsys, argv, expected):
    args = ["train", *flags(model=base_dir, data=data_file, output=tmp_path / "o"), *FAST, *argv]
    assert expected in one_line_error(capsys, args)
    assert not (tmp_path / "o").exists()


def test_yaml_top_level_and_trainer_mapping_then_flags_win(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        "lr: 1.0e-4\nadam_beta2: 0.9\nwarmup_steps: 5\ntrainer:\n  weight_decay: 0.2\n"
        "  adam_epsilon: 1.0e-6\n  learning_rate: 1.0e-4\n"
    )
    cfg = train_config("--config", path)
    assert (cfg.lr, cfg.weight_decay) == (1e-4, 0.2)
    assert cfg.trainer == {"adam_beta2": 0.9, "warmup_steps": 5.0, "adam_epsilon": 1e-6}
    cfg = train_config(
        "--config", path, "--adam-beta2", "0.95", "--learning-rate", "3e-4", "--warmup-ratio", "0.5"
    )
    assert cfg.lr == 3e-4 and cfg.warmup_ratio == 0.5  # flags win, the file's warmup_steps is dropped
    assert cfg.trainer == {"adam_beta2": 0.95, "adam_epsilon": 1e-6}
    # and the other way round: --warmup-steps on the command line beats the file's warmup_ratio
    path.write_text("warmup_ratio: 0.3\n")
    cfg = train_config("--config", path, "--warmup-steps", "7")
    assert cfg.warmup_ratio == TrainConfig().warmup_ratio and cfg.trainer == {"warmup_steps": 7.0}
    for text, expected in [
        (
            "lr: 1.0e-4\ntrainer:\n  learning_rate: 2.0e-4\n",
            "c.yaml: option 'lr' 0.0001 and option 'learning_rate'",
        ),
        (
            "trainer:\n  adam_beta3: 1\n",
            "c.yaml: option 'adam_beta3': not a transformers.TrainingArguments field",
        ),
        ("adam_beta2: 0.9\ntrainer:\n  adam_beta2: 0.8\n", "at the top level and under 'trainer:'"),
        ("trainer:\n  remove_unused_columns: true\n", "cctuning sets it"),
        ("trainer: 3\n", "c.yaml: option 'trainer': expected dict"),
    ]:
        path.write_text(text)
        assert expected in one_line_error(capsys, ["train", "--config", str(path)])


def test_trainer_mapping_of_a_python_config_is_resolved_too(tmp_path):
    cfg = resolve_trainer_options(TrainConfig(output="o", trainer={"learning_rate": 2e-4, "adam_beta1": 0.8}))
    assert cfg.lr == 2e-4 and cfg.trainer == {"adam_beta1": 0.8}
    assert resolve_trainer_options(cfg) == cfg
    with pytest.raises(CCError, match="disagree"):
        resolve_trainer_options(TrainConfig(lr=1e-3, trainer={"learning_rate": 2e-4}))
    args = build_training_arguments(TrainConfig(output=str(tmp_path), trainer={"num_train_epochs": 2}))
    assert args.num_train_epochs == 2


def test_our_defaults_are_listed(tmp_path):
    """Every field where our arguments differ from the Trainer's defaults is one of ours (a twin, a
    fixed field or one in OUR_DEFAULTS, whose help says so)."""
    ours = build_training_arguments(TrainConfig(output=str(tmp_path)))
    theirs = TrainingArguments(output_dir=str(tmp_path))
    differ = {
        f.name
        for f in dataclasses.fields(TrainingArguments)
        if getattr(ours, f.name) != getattr(theirs, f.name)
    }
    assert differ and differ <= set(twins()) | set(FIXED) | set(OUR_DEFAULTS)
    assert set(OUR_DEFAULTS) <= set(trainer_fields()) and not set(OUR_DEFAULTS) & set(twins())


# -- warmup ---------------------------------------------------------------------------------------------
def learning_rates(cfg: TrainConfig, steps: int) -> list[float]:
    """The learning rate of each optimizer step 0..steps-1 as the Trainer's scheduler gives it."""
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=build_training_arguments(cfg))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize("ratio,steps", [(0.5, 8), (1.0, 8), (0.25, 10), (0.0, 4), (1.0, 3)])
def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path, ratio, steps):
    cfg = TrainConfig(output=str(tmp_path), lr=1.0, scheduler="linear", warmup_ratio=ratio, max_steps=steps)
    warmup = math.ceil(steps * ratio)
    expected = [k / warmup if k < warmup else (steps - k) / (steps - warmup) for k in range(steps)]
    assert learning_rates(cfg, steps) == pytest.approx(expected)


def test_warmup_steps_flag_is_a_step_count(tmp_path):
    cfg = train_config(*flags(output=tmp_path, lr=1.0, scheduler="constant_with_warmup", warmup_steps=3))
    assert learning_rates(cfg, 6) == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])


# -- logging ---------------------------------------------------------------------------------------------
def test_report_to_tensorboard_logs_loss_and_layer_choices(base_dir, data_file, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    argv = ["train", *flags(model=base_dir, data=data_file, output=out), *FAST, "--report-to", "tensorboard"]
    assert main(argv) == 0
    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/layer_top", "train/layer_entropy", "train/learning_rate"):
        assert tag in scalars, scalars
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3]  # --max-steps 3, --logging-steps 1
    assert all(0 <= e.value for e in acc.Scalars("train/layer_entropy"))
    assert all(e.value == int(e.value) for e in acc.Scalars("train/layer_top"))


def test_report_to_a_missing_package_is_one_line(base_dir, data_file, tmp_path, capsys, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: False)
    args = ["train", *flags(model=base_dir, data=data_file, output=tmp_path / "o"), *FAST]
    err = one_line_error(capsys, [*args, "--report-to", "tensorboard"])
    assert "pip install 'cctuning[tensorboard]'" in err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_report_to_wandb_offline(base_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o"
    assert (
        main(["train", *flags(model=base_dir, data=data_file, output=out), *FAST, "--report-to", "wandb"])
        == 0
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


# -- --config for the other commands -----------------------------------------------------------------
@pytest.mark.parametrize(
    "command,yaml_text,argv,expected",
    [
        (
            "generate",
            "model: m\nprompt: hi\nmax-new-tokens: 5\nsample_layer: true\nconnection: none\n",
            ["--max-new-tokens", "7"],
            {"model": "m", "prompt": "hi", "max_new_tokens": 7, "sample_layer": True, "connection": "none"},
        ),
        (
            "eval",
            "model: m\nbenchmarks: XNLI\nlimit: 3\nscoring: likelihood\nsample_layer: 2\n",
            ["--limit", "4", "--model", "n"],
            {"model": "n", "benchmarks": "XNLI", "limit": 4, "scoring": "likelihood", "sample_layer": 2},
        ),
        (
            "fit-matrix",
            "model: m\ndata: d.jsonl\nridge: 0.5\nper_layer: true\nsamples: 10\n",
            ["--samples", "20"],
            {"model": "m", "data": "d.jsonl", "ridge": 0.5, "per_layer": True, "samples": 20},
        ),
    ],
)
def test_config_file_for_other_commands_and_flags_win(tmp_path, command, yaml_text, argv, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    args = vars(parse("--config", path, *argv, command=command))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize(
    "yaml_text,expected",
    [
        ("model: m\nprompts: x\n", "c.yaml: unknown option 'prompts'"),
        ("model: m\nmax_new_tokens: many\n", "c.yaml: option 'max_new_tokens': expected int, got 'many'"),
        ("model: m\nconnection: sideways\n", "c.yaml: option 'connection': expected one of"),
        ("model: m\nsample_layer: maybe\n", "c.yaml: option 'sample_layer': expected bool"),
        ("model: m\nprompt: [a, b]\n", "c.yaml: option 'prompt': expected one value"),
        ("- model\n", "c.yaml: the config must be a mapping"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, capsys, yaml_text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert expected in one_line_error(capsys, ["generate", "--config", str(path)])


def test_generate_runs_from_a_config_file(base_dir, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(f"model: {base_dir}\nprompt: Habari\nmax_new_tokens: 2\n")
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--config", str(path), "--output", str(out)]) == 0
    assert "wrote 1 generations" in capsys.readouterr().out and out.read_text().count("\n") == 1


def test_required_flags_still_required_without_a_config(capsys):
    with pytest.raises(SystemExit):
        parse("--prompt", "x", command="generate")
    assert "--model" in capsys.readouterr().err


def test_coerce_of_trainer_types():
    from cctuning.config import coerce

    fields = trainer_fields()
    assert coerce("cosine", fields["lr_scheduler_type"].type, "x") == "cosine"
    assert coerce(["a", "b"], fields["report_to"].type, "x") == ["a", "b"]
    assert coerce({"stage": 3}, fields["deepspeed"].type, "x") == {"stage": 3}
    assert coerce("ds.json", fields["deepspeed"].type, "x") == "ds.json"
    assert coerce("3", int | None, "x") == 3
    assert coerce(True, fields["include_num_input_tokens_seen"].type, "x") is True
    with pytest.raises(CCError, match="x: expected int"):
        coerce("3.5", fields["dataloader_num_workers"].type, "x")
