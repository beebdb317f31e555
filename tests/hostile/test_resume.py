"""Resume that respects the run, damaged or hostile checkpoints, non-finite weights and dead models
(issue 26: nothing a command writes may destroy what it reads).

Each case here trained past the run's end, rewrote a run's record with other settings, ended in a
traceback, or passed a model that cannot work for a result, before these rules existed."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.loading import load_for_inference
from cctuning.model import CCConfig, CCModel
from cctuning.model.lora import add_lora
from cctuning.testing import tiny_model
from tests.conftest import flags, make_records, write_jsonl

# a run of 3 steps of 2 examples (12 records: 6 steps an epoch, so it ends mid-epoch), a checkpoint a step
RUN = dict(max_steps=3, batch_size=2, lr="1e-3", save_steps=1, save_total_limit=5, warmup_ratio=0)
# the final model's files (everything but the checkpoints)
FINAL = ("model.safetensors", "decision_maker.safetensors", "train_results.json", "cctuning_config.json")


def one_error(capsys) -> str:
    """The CLI's one error line, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cctuning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def command(model, data, output, **options) -> list[str]:
    return ["train", *flags(model=model, data=data, output=output, **{**RUN, **options})]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base_dir):
    """A finished run (``out``: checkpoints 1, 2, 3 and the final model) and its data."""
    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "train.jsonl", make_records())
    assert main(command(base_dir, data, root / "out")) == 0
    return root / "out", data


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to change."""
    return Path(shutil.copytree(finished[0], tmp_path / "out"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FINAL}


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*"))


def keep_checkpoints(folder: Path, *names: str) -> None:
    """What a run killed after its checkpoint ``names[-1]`` leaves: those checkpoints, nothing else."""
    for item in folder.iterdir():
        if item.name not in names:
            shutil.rmtree(item) if item.is_dir() else item.unlink()


# -- a finished run stays finished ------------------------------------------------------------------------
def test_resuming_a_finished_run_trains_nothing_and_writes_nothing(finished, run, base_dir, capsys):
    before, saved = snapshot(run), checkpoints(run)
    # logging, saving and data loading settings may change on a resume
    again = [*command(base_dir, finished[1], run, logging_steps=2, save_total_limit=4), "--resume", "last"]
    for _ in range(2):
        assert main([*again, *flags(dataloader_num_workers=0)]) == 0
        assert snapshot(run) == before and checkpoints(run) == saved


def test_a_run_killed_after_its_last_checkpoint_ends_with_that_checkpoints_weights(
    finished, run, base_dir, capsys
):
    keep_checkpoints(run, "checkpoint-1", "checkpoint-2", "checkpoint-3")
    assert main([*command(base_dir, finished[1], run), "--resume", "last"]) == 0
    results = json.loads((run / "train_results.json").read_text())
    assert (
        results["global_step"]
        == json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"]
    )
    assert checkpoints(run) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in ("model.safetensors", "decision_maker.safetensors"):
        final, last = load_file(str(run / name)), load_file(str(run / "checkpoint-3" / name))
        assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


# -- a resumed run keeps its settings ---------------------------------------------------------------------
def _other_base(tmp_path, tokenizer) -> Path:
    folder = tmp_path / "other-base"
    tiny_model("llama", tokenizer=tokenizer, seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _other_data(tmp_path, tokenizer) -> Path:
    return write_jsonl(
        tmp_path / "train.jsonl", list(reversed(make_records()))
    )  # the same records, reordered


# option, its new value (a callable builds it), its value in the run (None: not checked)
CHANGES = [
    ("seed", 7, 42),
    ("max_steps", 5, RUN["max_steps"]),
    ("lr", 0.5, 0.001),
    ("method", "sft", "cc"),
    ("batch_size", 4, RUN["batch_size"]),
    ("tau", 2.0, 1.0),
    ("adam_beta2", 0.9, None),  # a Trainer field
    ("model", _other_base, None),
    ("data", _other_data, None),
]


@pytest.mark.parametrize("option, new, old", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_other_settings_is_refused_naming_the_setting(
    finished, run, base_dir, tokenizer, tmp_path, capsys, option, new, old
):
    value = new(tmp_path, tokenizer) if callable(new) else new
    options = {"model": base_dir, "data": finished[1], **{option: value}}
    model, data = options.pop("model"), options.pop("data")
    before = snapshot(run)
    assert main([*command(model, data, run, **options), "--resume", "last"]) == 2
    line = one_error(capsys)
    flag = "--" + option.replace("_", "-")
    assert flag in line and "other settings" in line, line
    if old is not None:
        assert f"{flag} {old} → {value}" in line, line
    assert snapshot(run) == before and checkpoints(run) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_checkpoint_without_a_settings_record_still_refuses_another_method_or_base(
    finished, run, base_dir, tokenizer, tmp_path, capsys
):
    """A checkpoint of an earlier version (no train_settings.json) shows its method and base model in
    its cctuning_config.json."""
    for checkpoint in run.glob("checkpoint-*"):
        (checkpoint / "train_settings.json").unlink(missing_ok=True)
    before = snapshot(run)
    other = _other_base(tmp_path, tokenizer)
    for option, value in (("method", "sft"), ("model", other)):
        options = {"model": base_dir, option: value}
        assert main([*command(options.pop("model"), finished[1], run, **options), "--resume", "last"]) == 2
        line = one_error(capsys)
        assert f"--{option} " in line and f"→ {value}" in line, line
    assert snapshot(run) == before


# -- a damaged or hostile checkpoint ----------------------------------------------------------------------
class Hostile:
    """A pickle that would create ``marker`` if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def truncate(file: Path, marker: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def hostile_torch_file(file: Path, marker: Path) -> None:
    torch.save({"state": Hostile(marker)}, file)


def hostile_plain_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps({"state": Hostile(marker)}))


def foreign_state(file: Path, marker: Path) -> None:
    """A readable state of another optimizer (no parameter group) in its place."""
    torch.save({"state": {}, "param_groups": []}, file)


DAMAGE = [
    ("optimizer.pt", truncate),
    ("model.safetensors", truncate),
    ("decision_maker.safetensors", truncate),
    ("rng_state.pth", hostile_torch_file),
    ("optimizer.pt", hostile_plain_pickle),
    ("scheduler.pt", hostile_torch_file),
    ("optimizer.pt", foreign_state),
]


@pytest.mark.parametrize("name, damage", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d in DAMAGE])
def test_a_damaged_newest_checkpoint_names_the_file_and_offers_the_previous_one(
    finished, run, base_dir, tmp_path, capsys, name, damage
):
    keep_checkpoints(run, "checkpoint-1", "checkpoint-2")  # killed after its second checkpoint
    marker = tmp_path / "UNPICKLED"
    damage(run / "checkpoint-2" / name, marker)
    assert main([*command(base_dir, finished[1], run), "--resume", "last"]) == 2
    line = one_error(capsys)
    assert str(run / "checkpoint-2") in line and name in line, line
    assert f"--resume {run / 'checkpoint-1'}" in line, line
    assert not marker.exists() and not (run / "model.safetensors").exists()


def test_a_damaged_only_checkpoint_says_there_is_no_earlier_one(finished, run, base_dir, capsys):
    keep_checkpoints(run, "checkpoint-1")
    truncate(run / "checkpoint-1" / "optimizer.pt", run)
    assert main([*command(base_dir, finished[1], run), "--resume", "last"]) == 2
    line = one_error(capsys)
    assert str(run / "checkpoint-1" / "optimizer.pt") in line and "no earlier" in line, line


# -- weights that cannot work ------------------------------------------------------------------------------
def _poison(file: Path, value: float) -> str:
    """Set one element of the last tensor of a safetensors ``file`` to ``value``; returns its name."""
    tensors = load_file(str(file))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load_naming_the_folder_and_tensor(
    base_dir, tmp_path, capsys, value
):
    folder = Path(shutil.copytree(base_dir, tmp_path / "base"))
    name = _poison(folder / "model.safetensors", value)
    with pytest.raises(CCError) as err:
        CCModel.from_pretrained(folder)
    assert str(folder) in str(err.value) and name in str(err.value)
    assert main(["generate", *flags(model=folder, prompt="hi")]) == 2
    assert name in one_error(capsys)
    data = write_jsonl(tmp_path / "d.jsonl", make_records())
    assert main(command(folder, data, tmp_path / "o")) == 2
    assert name in one_error(capsys) and not (tmp_path / "o" / "model.safetensors").exists()


def test_a_non_finite_lora_adapter_is_refused_on_load(base_dir, tokenizer, tmp_path):
    base = CCModel._load_base(base_dir)
    cc = CCModel(add_lora(base, 4, 8, 0.0, "all-linear"), CCConfig(base_model=str(base_dir)))
    cc.save_pretrained(tmp_path / "lora", tokenizer=tokenizer)
    name = _poison(tmp_path / "lora" / "adapter_model.safetensors", float("nan"))
    with pytest.raises(CCError, match="NaN or infinite") as err:
        load_for_inference(str(tmp_path / "lora"), device="cpu")
    assert str(tmp_path / "lora") in str(err.value)
    assert name.removesuffix(".weight") in str(err.value)  # the adapter's tensor (PEFT adds ".default")


# -- a dead model -----------------------------------------------------------------------------------------
def test_constant_logits_tells_a_dead_model_from_a_live_one(tokenizer):
    from cctuning.model.health import constant_logits

    model = tiny_model("llama", tokenizer=tokenizer)
    assert constant_logits(model, tokenizer) is False
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    assert constant_logits(model, tokenizer) is True
    assert constant_logits(CCModel.from_base(model, CCConfig()), tokenizer) is True


def test_a_run_that_leaves_a_dead_model_says_so(base_dir, data_file, tmp_path, caplog):
    out = tmp_path / "o"
    assert main(command(base_dir, data_file, out, lr="1e6", max_steps=1, save_steps=0)) == 0
    warnings = json.loads((out / "train_results.json").read_text())["warnings"]
    assert len(warnings) == 1 and "same logit" in warnings[0]
    assert any("same logit" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
