"""Sharded engines under the Trainer: the run gets the engine it was launched for, or stops.

``accelerate launch`` with an FSDP or DeepSpeed config tells each process what to use through its
environment (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``, ``FSDP_*``); a ``trainer:``
mapping can ask the same through ``TrainingArguments`` (``fsdp``, ``deepspeed``). Two things are
added here, both applied by :class:`~cctuning.training.trainer.CCTrainer` around the creation of
its ``Accelerator``:

* **FSDP2 on a machine without an accelerator.** accelerate 1.15 applies an FSDP plugin only to
  processes it set up for accelerators (``MULTI_GPU`` and the like). On a CPU-only machine the
  launcher's processes join as ``MULTI_CPU`` (gloo) and the plugin is dropped without a word, so a
  run launched with an FSDP config would train as plain data parallel. PyTorch's FSDP2
  (``fully_shard``) runs on CPU with gloo, so the processes are presented to accelerate as the
  multi-process group they are, which then records them as FSDP exactly as it does on GPUs.
  FSDP1 cannot run there (accelerate's plugin and torch's FSDP both ask for an accelerator device)
  and is refused with one line.
* **No silent fallback.** A run launched for FSDP or DeepSpeed whose Trainer ends up without that
  engine stops with one line instead of training unsharded; so does ZeRO-3 that would not gather
  the full weights for our save (the folder would have no model weights).

DeepSpeed needs nothing here: accelerate sets it up on CPU as well (DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import os

import accelerate.state
from accelerate.utils import DistributedType

from cctuning.errors import CCError

ENGINES = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_engine(args) -> str | None:
    """``"deepspeed"`` or ``"fsdp"`` when the launcher's environment or the TrainingArguments ask for
    a sharded engine, else None."""
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def fsdp_version(args) -> int:
    """The FSDP version asked for: the TrainingArguments' ``fsdp_config`` or the launcher's
    ``FSDP_VERSION`` (accelerate's default when neither says: 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    if "fsdp_version" in plugin_args:
        return int(plugin_args["fsdp_version"])
    return int(os.environ.get("FSDP_VERSION", "1") or 1)


def before_accelerator(args) -> None:
    """Called right before the Trainer creates its ``Accelerator``: lets an FSDP2 run on CPU become
    FSDP (see the module's docstring); refuses FSDP1 there."""
    if requested_engine(args) != "fsdp":
        return
    state = accelerate.state.PartialState()  # looked up at the call: tests replace it
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # an accelerator machine: accelerate sets FSDP up itself
    version = fsdp_version(args)
    if version != 2:
        raise CCError(
            f"FSDP{version} (fsdp_version: {version}) needs an accelerator device; on a machine without "
            "one use FSDP2 (fsdp_version: 2, e.g. examples/accelerate/fsdp_cpu.yaml)"
        )
    # the branch of AcceleratorState that turns a multi-process group into FSDP takes MULTI_GPU and
    # its siblings only; it then records FSDP here itself
    state.distributed_type = DistributedType.MULTI_GPU


def after_accelerator(trainer) -> None:
    """Called right after the Trainer created its ``Accelerator``: the engine asked for is the one set
    up, and under ZeRO-3 it will hand full weights to our save."""
    engine = requested_engine(trainer.args)
    if engine is None:
        return
    enabled = trainer.is_fsdp_enabled if engine == "fsdp" else trainer.is_deepspeed_enabled
    if not enabled:
        got = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
        raise CCError(
            f"launched for {ENGINES[engine]}, but accelerate set up {got} (check use_cpu and "
            "distributed_type in the accelerate config); stopping rather than training without "
            f"{ENGINES[engine]}"
        )
    if engine == "deepspeed":
        check_zero3_saves_full_weights(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)


def check_zero3_saves_full_weights(ds_config: dict) -> None:
    """Under ZeRO-3 the model folder can only be written from weights DeepSpeed gathers at save time.
    Without that the Trainer saves DeepSpeed's own checkpoint instead (zero_to_fp32.py) and hands our
    save nothing: the folder would have no model weights (tried: ``CCModel.from_pretrained`` then fails)
    and, for a Decision Maker above DeepSpeed's persistence threshold (100k elements), an empty
    placeholder for it. Refused before training rather than after it."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise CCError(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save) "
            "gives the model folder no weights; set it in the accelerate or DeepSpeed config"
        )
