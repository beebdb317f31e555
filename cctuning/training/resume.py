"""Resuming a run: which checkpoint, whether its files can be read safely, and whether the command is
the run that wrote it.

Each checkpoint (and the final folder) holds :data:`SETTINGS_NAME`, our own JSON record of the run's
settings (the Trainer's ``training_args.bin`` is a pickle, never read). ``--resume`` refuses a command
whose settings differ from the record, except those in :data:`CHANGEABLE` and
:data:`CHANGEABLE_TRAINER`: how a run reports, saves and runs, never what it trains. ``data`` is
compared by content (a sha256 of its files), so the same records under another path resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.trainer_pt_utils import safe_globals

from cctuning.errors import CCError, first_line
from cctuning.io import is_incomplete, sha256_file
from cctuning.model.settings import CONFIG_NAME
from cctuning.training.args import TrainConfig

logger = logging.getLogger(__name__)

SETTINGS_NAME = "train_settings.json"
TRAINER_STATE_NAME = "trainer_state.json"

# settings a resumed run may change (the rest must be the checkpoint's): where the run writes and how it
# was started, how often it logs and saves, where it reports, and what only changes speed or memory
CHANGEABLE = frozenset(
    {
        "output", "resume", "overwrite", "logging_steps", "save_steps", "save_total_limit", "report_to",
        "trust_remote_code", "gradient_checkpointing",
        "data",  # the path; its contents are compared (data_sha256)
    }
)  # fmt: skip
# the same for transformers.TrainingArguments fields given through `trainer` (their flags)
CHANGEABLE_TRAINER = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "logging_strategy", "logging_first_step", "logging_dir",
        "log_on_each_node", "log_level", "log_level_replica", "disable_tqdm", "include_num_input_tokens_seen",
        "skip_memory_metrics", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
        "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
        "hub_strategy", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
        "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "ddp_timeout", "ddp_bucket_cap_mb", "torch_empty_cache_steps",
        "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
    }
)  # fmt: skip
# never written into a record
SECRET_TRAINER = ("hub_token",)


# -- which checkpoint -------------------------------------------------------------------------------------
def _step_of(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder (None for another name)."""
    tail = folder.name.split("-")[-1]
    return int(tail) if folder.name.startswith("checkpoint-") and tail.isdigit() else None


def finished_checkpoints(output: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output`` that were written completely, oldest first."""
    folder = Path(output)
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None]
    return sorted((p for p in done if _finished_checkpoint(p)), key=_step_of)


def last_checkpoint(output: str | Path) -> str | None:
    """The newest ``checkpoint-N`` that was written completely (its trainer_state.json comes last,
    and no interrupted save of ours left its marker)."""
    done = finished_checkpoints(output)
    return str(done[-1]) if done else None


def _finished_checkpoint(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last (not atomically: a kill can cut it), our save
    leaves a marker until its last file has landed."""
    return not is_incomplete(folder) and _trainer_state(folder) is not None


def _trainer_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` asks for, checked to be complete and its files readable (a damaged
    one is refused naming the file and offering the previous checkpoint)."""
    if not cfg.resume:
        return None
    if cfg.resume == "last":
        found = last_checkpoint(cfg.output)
        if found is None:
            raise CCError(f"--resume last: no finished checkpoint in '{cfg.output}'")
    else:
        found = cfg.resume
        if not _finished_checkpoint(Path(found)):
            raise CCError(
                f"--resume {cfg.resume}: not a finished checkpoint folder (trainer_state.json missing or cut, "
                "or an interrupted save)"
            )
    broken = broken_file(Path(found))
    if broken:
        file, reason = broken
        raise CCError(f"--resume {cfg.resume}: {file} {reason}; {previous_advice(Path(found))}")
    return str(found)


def previous_advice(checkpoint: Path) -> str:
    """Where to resume from instead of a damaged ``checkpoint``: the newest older one that is readable."""
    step = _step_of(checkpoint)
    older = [p for p in finished_checkpoints(checkpoint.parent) if step is None or _step_of(p) < step]
    for previous in reversed(older):
        if broken_file(previous) is None:
            return f"resume from the previous checkpoint with --resume {previous}"
    return "there is no earlier readable checkpoint: train anew with --overwrite"


# -- can its files be read safely ---------------------------------------------------------------------------
def broken_file(folder: Path) -> tuple[Path, str] | None:
    """The first weights or state file of checkpoint ``folder`` that cannot be read safely, and why.

    Safetensors files are opened (their header must cover the file); the Trainer's torch files
    (optimizer, scheduler, scaler, random states) are opened as the Trainer does, ``weights_only``, but
    memory-mapped: their pickle is read, their tensors are not. ``training_args.bin`` (a pickle of the
    Trainer's arguments) is never read, on resume either."""
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == "training_args.bin":
            continue
        if path.suffix == ".safetensors":
            reason = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            reason = _torch_file_problem(path)
        else:
            continue
        if reason:
            return path, reason
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
        return f"is truncated or damaged ({first_line(err).split('. ')[0]})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        with safe_globals():  # the numpy types of the random states, as the Trainer allows them
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "holds objects other than tensors and was refused unread (torch.load weights_only)"
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, OSError, ...
        if "mmap can only be used" in str(err):
            return "is not a file written by torch.save (no zip archive); it was refused unread"
        return f"is truncated or damaged ({first_line(err).split('. ')[0]})"
    return None


# -- is it the same run -------------------------------------------------------------------------------------
def data_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of the data's bytes: a file's, or a folder's files (each one's path in it and contents)."""
    path = Path(path) if path else None
    if path is None or not path.exists():
        return None
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _model_ref(model: str | None) -> str | None:
    """A base model as the record keeps it: a folder as its resolved path, a preset name as it is."""
    return str(Path(model).resolve()) if model and Path(model).is_dir() else model


def _plain(value):
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def run_settings(cfg: TrainConfig) -> dict:
    """The record of a run's settings that each of its checkpoints holds (:data:`SETTINGS_NAME`)."""
    config = _plain(asdict(cfg))
    config["model"] = _model_ref(cfg.model)
    for name in SECRET_TRAINER:
        config["trainer"].pop(name, None)
    return {"config": config, "data_sha256": data_fingerprint(cfg.data)}


def check_same_run(settings: dict, checkpoint: str | Path, option: str) -> None:
    """Refuse to resume ``checkpoint`` with settings other than its run's, in one line naming each
    setting that differs (old → new)."""
    checkpoint = Path(checkpoint)
    file = checkpoint / SETTINGS_NAME
    if file.is_file():
        try:
            recorded = json.loads(file.read_text(encoding="utf-8"))
            changes = _differences(recorded, settings)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
            raise CCError(f"{option}: {file} is not a readable record of the run's settings") from None
    else:
        changes = _differences_without_record(settings["config"], checkpoint)
    if changes:
        more = f"; and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise CCError(
            f"{option}: {checkpoint} is a run with other settings: {'; '.join(changes[:4])}{more}. A resumed "
            "run keeps its settings: give them as they were, or train anew (--overwrite or another --output)"
        )


def _show(value) -> str:
    return "(not set)" if value is None else value if isinstance(value, str) else json.dumps(value)


def _change(name: str, before, after) -> str:
    return f"--{name.replace('_', '-')} {_show(before)} → {_show(after)}"


def _differences(recorded: dict, settings: dict) -> list[str]:
    defaults = _plain(asdict(TrainConfig()))
    old, new = recorded["config"], settings["config"]
    changes = [
        _change(name, old.get(name, defaults[name]), value)
        for name, value in new.items()
        if name not in CHANGEABLE and name != "trainer" and old.get(name, defaults.get(name)) != value
    ]
    old_trainer, new_trainer = old.get("trainer") or {}, new["trainer"]
    for name in sorted(set(old_trainer) | set(new_trainer)):
        if name not in CHANGEABLE_TRAINER and old_trainer.get(name) != new_trainer.get(name):
            changes.append(_change(name, old_trainer.get(name), new_trainer.get(name)))
    before, after = recorded.get("data_sha256"), settings["data_sha256"]
    if before and after and before != after:
        changes.append(
            f"--data: the records of {new['data']} are not those the run trained on ({old.get('data')})"
        )
    return changes


# the settings an older checkpoint (without SETTINGS_NAME) shows in its cctuning_config.json
_CC_FIELDS = (
    "method",
    "inject_layer",
    "tau",
    "english_grad",
    "layer_choice",
    "fusion",
    "dm_input",
    "tau_end",
)


def _differences_without_record(config: dict, checkpoint: Path) -> list[str]:
    """What a checkpoint of an earlier version shows of its settings: the connection's settings and the
    base model (its cctuning_config.json), the batch size and the step count (trainer_state.json)."""
    logger.warning(
        "%s has no %s (an earlier cctuning wrote it): only --method, the connection's settings, --model, "
        "--batch-size and --max-steps can be checked against it",
        checkpoint,
        SETTINGS_NAME,
    )
    try:
        cc = json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        cc = {}
    cc = cc if isinstance(cc, dict) else {}
    changes = [_change(n, cc[n], config[n]) for n in _CC_FIELDS if n in cc and cc[n] != config[n]]
    if cc.get("base_model") and cc["base_model"] != config["model"]:
        changes.append(_change("model", cc["base_model"], config["model"]))
    state = _trainer_state(checkpoint) or {}
    if state.get("train_batch_size") not in (None, config["batch_size"]):
        changes.append(_change("batch_size", state["train_batch_size"], config["batch_size"]))
    if config["max_steps"] > 0 and state.get("max_steps") not in (None, config["max_steps"]):
        changes.append(_change("max_steps", state["max_steps"], config["max_steps"]))
    return changes


# -- a finished run ----------------------------------------------------------------------------------------
def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The step ``checkpoint`` was saved at (0 for None: a run from the start)."""
    step = (_trainer_state(Path(checkpoint)) or {}).get("global_step") if checkpoint else 0
    return step if isinstance(step, int) else 0


def finished_step(checkpoint: str | Path) -> int | None:
    """The step of ``checkpoint`` when it is the end of its run (its step is the run's last), else None."""
    state = _trainer_state(Path(checkpoint)) or {}
    step, total = state.get("global_step"), state.get("max_steps")
    if isinstance(step, int) and isinstance(total, int) and 0 < total <= step:
        return step
    return None


def saved_final(output: str | Path, step: int, results_name: str) -> bool:
    """Whether ``output`` already holds the final model of a run that ended at ``step`` (its results file
    says so, and no interrupted save left its marker)."""
    output = Path(output)
    try:
        results = json.loads((output / results_name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(results, dict) and results.get("global_step") == step and not is_incomplete(output)
