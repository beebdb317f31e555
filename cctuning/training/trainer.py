"""A ``transformers.Trainer`` that trains a :class:`CCModel`.

Everything engine-side (accumulation, schedules, mixed precision, checkpoints, resume, logging,
accelerate/DeepSpeed/FSDP) is the Trainer's. The loss is the model's own (plain response-only
cross-entropy), so ``compute_loss`` is only extended to count the Decision Maker's layer choices,
which the forward returns with its output (``layer_choice``); saving and checkpoint loading are
overridden because the model folder holds our own files beside the Hugging Face ones (or beside
PEFT's adapter files with LoRA).

With several processes (DDP, DeepSpeed, FSDP) the Decision Maker is an ordinary submodule of the
wrapped model, so the engine synchronises its gradients like any other weight; the layer-choice
counts are summed over processes at every step so that every rank holds (and saves) the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import load_sharded_checkpoint

from cctuning.errors import CCError, first_line
from cctuning.io import atomic_path, write_json
from cctuning.model.ccmodel import DECISION_MAKER_NAME, CCModel
from cctuning.model.health import check_finite_weights
from cctuning.model.lora import ADAPTER_WEIGHTS_NAME, load_adapter_weights
from cctuning.training.resume import SETTINGS_NAME, previous_advice
from cctuning.training.sharding import after_accelerator, before_accelerator

logger = logging.getLogger(__name__)

LAYER_CHOICE_NAME = "layer_choice.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FSDP_WEIGHTS_NAME = "pytorch_model_fsdp.bin"  # accelerate's full state dict in an FSDP checkpoint


class _TemperatureSchedule(TrainerCallback):
    """Anneals the Gumbel temperature exponentially from ``tau`` to ``tau_end`` over the run:
    ``tau_t = tau · (tau_end / tau)^(t / T)`` at optimizer step t of T (Jang et al., 2017 anneal it
    likewise). Set at every step from the step count, so a resumed run continues on the same curve."""

    def __init__(self, model: CCModel):
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        cfg = self.model.cc_config
        progress = min(1.0, state.global_step / max(1, state.max_steps))
        self.model.tau = cfg.tau * (cfg.tau_end / cfg.tau) ** progress


class _FiniteGradients(TrainerCallback):
    """Stops the run, before the optimizer applies it, at the first step whose gradient norm is not
    finite (a NaN step would otherwise turn every weight into NaN and the run would still "save").
    The last good checkpoint stays as it was."""

    def __init__(self, model: CCModel):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if not torch.isfinite(norm):
                raise CCError(
                    f"step {state.global_step + 1}: the gradient norm is {float(norm)}; training stopped "
                    "before applying it (lower --lr?); the last saved checkpoint is unchanged"
                )


class _Budget(TrainerCallback):
    """Logs the run's budget when it starts: its examples (the records after ``--augment``) and its
    optimizer steps, so that runs on data of different sizes are compared knowing both."""

    def __init__(self, examples: int):
        self.examples = examples

    def on_train_begin(self, args, state, control, **kwargs):
        logger.info(
            "training: %d examples, %d optimizer steps of %d examples per process (%s)",
            self.examples,
            state.max_steps,
            args.per_device_train_batch_size * args.gradient_accumulation_steps,
            f"--max-steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs",
        )


class CCTrainer(Trainer):
    """``connection_lr_scale`` multiplies the learning rate of the Decision Maker and the fusion gates."""

    def __init__(self, *args, connection_lr_scale: float = 1.0, run_settings: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connection_lr_scale = connection_lr_scale
        self.run_settings = run_settings  # written into every checkpoint (training/resume.py)
        model = self._cc_model()
        self.add_callback(_Budget(len(self.train_dataset) if self.train_dataset is not None else 0))
        if not self.is_deepspeed_enabled:  # DeepSpeed keeps the gradients itself, partitioned
            self.add_callback(_FiniteGradients(model))
        if model.cc_config.tau_end is not None and model.uses_connection:
            self.add_callback(_TemperatureSchedule(model))
        layers = model.arch.num_layers if model.uses_connection else 0
        self.layer_counts = torch.zeros(layers, dtype=torch.long)  # whole run
        self._window_counts = torch.zeros(layers, dtype=torch.long)  # since the last log

    def create_accelerator_and_postprocess(self):
        """The Trainer's, plus: FSDP2 runs on a CPU-only machine too, and a run launched for FSDP or
        DeepSpeed never silently trains without it (:mod:`cctuning.training.sharding`)."""
        before_accelerator(self.args)
        super().create_accelerator_and_postprocess()
        after_accelerator(self)

    def _cc_model(self) -> CCModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, CCModel):
            raise TypeError(f"CCTrainer trains a CCModel, got {type(model).__name__}")
        return model

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with ``connection_lr_scale`` ≠ 1 the Decision Maker's and the
        gates' parameters move to groups of their own with the scaled learning rate (the scheduler
        scales every group's rate alike)."""
        optimizer = super().create_optimizer(model)
        if self.connection_lr_scale == 1.0:
            return optimizer
        cc = self._cc_model()
        own = {id(p) for m in (cc.decision_maker, cc.fusion) if m is not None for p in m.parameters()}
        extra = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in own]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in own]
                extra.append({**group, "params": mine, "lr": group["lr"] * self.connection_lr_scale})
        for group in extra:
            group.pop("initial_lr", None)
            optimizer.add_param_group(group)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise CCError(
                f"step {self.state.global_step + 1}: the loss is {float(loss.detach().float().mean())}; "
                "training stopped (lower --lr?); the last saved checkpoint is unchanged"
            )
        choice = getattr(outputs, "layer_choice", None)  # CCModel.forward returns the chosen layers
        if choice is not None and model.training:
            self._count_layers(choice)
        return (loss, outputs) if return_outputs else loss

    def _count_layers(self, choice: torch.Tensor) -> None:
        """Add one step's chosen layers to the run's and the logging window's counts (summed over
        processes, so that every rank holds the same)."""
        counts = torch.bincount(choice.cpu(), minlength=len(self.layer_counts))
        if self.accelerator.num_processes > 1:  # every rank runs this step: a collective is safe
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum").cpu()
        self.layer_counts += counts
        self._window_counts += counts

    def log(self, logs: dict, start_time: float | None = None) -> None:
        total = int(self._window_counts.sum())
        if total and "loss" in logs:
            p = self._window_counts.double() / total
            logs["layer_top"] = int(self._window_counts.argmax())
            logs["layer_entropy"] = round(float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(2), 4)
            self._window_counts.zero_()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self._cc_model()
        model.save_pretrained(output_dir, state_dict=state_dict, tokenizer=self.processing_class)
        if model.uses_connection:
            write_json(
                Path(output_dir) / LAYER_CHOICE_NAME,
                {"counts": self.layer_counts.tolist(), "steps": self.state.global_step},
            )
        if self.run_settings is not None:
            write_json(Path(output_dir) / SETTINGS_NAME, self.run_settings)
        with atomic_path(os.path.join(output_dir, "training_args.bin")) as tmp:
            torch.save(self.args, tmp)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the base weights and the Decision Maker of a checkpoint written by :meth:`_save`."""
        cc_model = self._cc_model() if model is None else self.accelerator.unwrap_model(model)
        ckpt = Path(resume_from_checkpoint)
        single, index = ckpt / SAFE_WEIGHTS_NAME, ckpt / SAFE_WEIGHTS_INDEX_NAME
        if self.is_fsdp_enabled:
            # the parameters are sharded: accelerate loads its own full state dict of the whole CCModel
            # (pytorch_model_fsdp.bin: base, Decision Maker, gates; torch.load weights_only) into them
            if not (ckpt / FSDP_WEIGHTS_NAME).is_file():
                raise CCError(
                    f"{ckpt}: no {FSDP_WEIGHTS_NAME}: this checkpoint was not written under FSDP "
                    "(FULL_STATE_DICT); resume it with the launcher config it was written with"
                )
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            result = None
        elif cc_model.uses_lora:
            load_adapter_weights(cc_model.base, ckpt / ADAPTER_WEIGHTS_NAME)
            result = None
        elif single.is_file():
            result = cc_model.base.load_state_dict(load_file(str(single)), strict=False)
        elif index.is_file():
            result = load_sharded_checkpoint(cc_model.base, str(ckpt), strict=False)
        else:
            raise CCError(f"{ckpt}: no {SAFE_WEIGHTS_NAME} to resume from")
        if result is not None:
            tied = set(getattr(cc_model.base, "all_tied_weights_keys", {}) or {})
            missing = [k for k in result.missing_keys if k not in tied]
            if missing or result.unexpected_keys:
                raise CCError(
                    f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                    f"{list(result.unexpected_keys)[:3]})"
                )
            if hasattr(cc_model.base, "tie_weights"):
                cc_model.base.tie_weights()
        if not self.is_fsdp_enabled:
            check_finite_weights(cc_model.base, ckpt)
        if cc_model.uses_connection and not self.is_fsdp_enabled:
            cc_model.load_decision_maker(ckpt / DECISION_MAKER_NAME)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's; a resumed run continues the layer-choice counts of its checkpoint (here rather
        than in :meth:`_load_from_checkpoint`, which DeepSpeed bypasses with its own loader)."""
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            choice_file = Path(resume_from_checkpoint) / LAYER_CHOICE_NAME
            if choice_file.is_file() and len(self.layer_counts):
                counts = json.loads(choice_file.read_text())["counts"]
                self.layer_counts = torch.tensor(counts, dtype=torch.long)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        """The Trainer's, unless the run has already reached its last step: resumed from the checkpoint
        that ended a run in the middle of an epoch, the Trainer would otherwise train one step more
        before it checks the step count (and one more on every further resume)."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The Trainer's; an optimizer or scheduler state that does not fit this run (a file of another
        run put in its place) is one line offering the previous checkpoint."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise CCError(
                f"{checkpoint}: its optimizer or scheduler state (optimizer.pt, scheduler.pt) does not fit "
                f"this run ({first_line(err)}); {previous_advice(Path(checkpoint))}"
            ) from None
