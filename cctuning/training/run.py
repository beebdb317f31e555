"""``train(config)``: records → tokenised pairs → CCModel → CCTrainer → model folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments, integrations, set_seed

from cctuning.data.augment import augment_records, check_augment
from cctuning.data.collator import CCCollator
from cctuning.data.encoding import (
    IGNORE_INDEX,
    PromptEncoder,
    PromptFormat,
    encode_records,
    warn_special_records,
)
from cctuning.data.formats import DataOptions
from cctuning.data.records import LoadReport, load_records, system_prompt_of
from cctuning.errors import CCError, first_line
from cctuning.guard import check_output as check_output_guard
from cctuning.io import (
    INCOMPLETE_MARKER,
    check_output_folder,
    folder_lock,
    is_incomplete,
    write_json,
    writes_into,
)
from cctuning.loading import TOKENIZER_FILES, load_tokenizer, model_inputs, resolve_model_path
from cctuning.model.ccmodel import CONFIG_NAME, DECISION_MAKER_NAME, CCConfig, CCModel
from cctuning.model.health import constant_logits
from cctuning.model.lora import add_lora
from cctuning.model.transform import MATRIX_NAME, MATRIX_REPORT_NAME
from cctuning.training.args import TrainConfig
from cctuning.training.cpu import warn_cpu_bf16
from cctuning.training.options import resolve_trainer_options
from cctuning.training.resume import (
    SETTINGS_NAME,
    check_same_run,
    checkpoint_step,
    finished_step,
    last_checkpoint,
    resume_checkpoint,
    run_settings,
    saved_final,
)
from cctuning.training.trainer import LAYER_CHOICE_NAME, CCTrainer
from cctuning.versions import versions

TRAIN_RESULTS_NAME = "train_results.json"

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class FeatureDataset(Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def check_context(records, features: list[dict], context: int | None) -> None:
    """Stop on the first sequence longer than the model's context (only possible when --max-length
    is larger than the context: shorter limits truncate instead, counted)."""
    if not context:
        return
    for rec, feat in zip(records, features):
        prompt = next(
            (i for i, label in enumerate(feat["labels"]) if label != IGNORE_INDEX), len(feat["labels"])
        )
        checks = [
            ("instruction", prompt, "prompt"),
            ("output", len(feat["input_ids"]), "prompt and response"),
        ]
        if "en_input_ids" in feat:
            checks.append(("instruction_en", len(feat["en_input_ids"]), "English prompt"))
        for name, length, what in checks:
            if length > context:
                raise rec.error(
                    name,
                    f"the {what} needs {length} tokens, more than the model's context of {context} "
                    f"(max_position_embeddings); set --max-length {context} or less to truncate",
                )


def _model_context(model: CCModel) -> int | None:
    config = model.base.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def warmup_steps_value(ratio: float) -> float:
    """``--warmup-ratio`` as the Trainer's ``warmup_steps``: a float below 1 is a fraction of the
    training steps (``ceil(steps × fraction)`` warmup steps), 1 or more a step count. So a ratio below
    1 passes as it is and a ratio of 1 (warm up over the whole run) as the largest float below 1, which
    gives ``ceil(steps × (1 - 2⁻⁵³)) = steps`` for any run shorter than 2⁵² steps."""
    return ratio if ratio < 1 else math.nextafter(1.0, 0.0)


# integrations of --report-to that need a package we can name: how to install it
_REPORT_PACKAGES = {
    "tensorboard": ("is_tensorboard_available", "pip install 'cctuning[tensorboard]'"),
    "wandb": ("is_wandb_available", "pip install wandb (WANDB_MODE=offline to log without an account)"),
}


def check_report_to(report_to: list[str]) -> None:
    """Each --report-to integration is one the Trainer knows and, for those in _REPORT_PACKAGES,
    installed: a one-line error instead of the Trainer's traceback."""
    known = getattr(integrations.integration_utils, "INTEGRATION_TO_CALLBACK", None)
    for name in report_to:
        if known is not None and name not in known:
            raise CCError(f"--report-to {name}: not an integration of the Trainer ({', '.join(known)})")
        check, install = _REPORT_PACKAGES.get(name, (None, None))
        if check and not getattr(integrations, check)():
            raise CCError(f"--report-to {name}: its package is not installed; {install}")


def build_training_arguments(cfg: TrainConfig):
    """The Trainer's arguments: ours from ``cfg``, then the TrainingArguments fields the user gave
    (``cfg.trainer``, checked by :func:`resolve_trainer_options`), which override our defaults."""
    cfg = resolve_trainer_options(cfg)
    kwargs = dict(
        output_dir=cfg.output,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=warmup_steps_value(cfg.warmup_ratio),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "epoch",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=cfg.report_to,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        save_only_model=False,
        # every weight (Decision Maker included) gets a gradient each step; the search for unused ones
        # costs a graph traversal per step. A model where that is not true fails loudly in DDP.
        ddp_find_unused_parameters=False,
        # a machine without an accelerator trains on CPU; this also lets `accelerate launch` /
        # `torchrun` start several CPU processes (gloo) and lets --bf16 run on CPU
        use_cpu=not _has_accelerator(),
    )
    kwargs.update(cfg.trainer)
    try:
        args = TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise CCError(f"invalid training arguments: {first_line(err)}") from None
    check_report_to(args.report_to)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size != launched:
        raise CCError(
            f"started as {launched} processes but the Trainer sees {args.world_size}: the processes would "
            "train separately; check the launcher (accelerate launch / torchrun) and its config"
        )
    return args


def prepare(cfg: TrainConfig):
    """Load and tokenise the data and build the model; everything ``train`` needs before the Trainer."""
    check_required(cfg)
    model_path = resolve_model_path(cfg.model)
    report = LoadReport()
    records = load_records(
        cfg.data,
        require_english=cfg.method == "cc",
        skip_invalid=cfg.skip_invalid,
        report=report,
        options=data_options(cfg),
    )
    records = augment_records(records, cfg.augment)  # the examples the trainer sees (docs/data.md)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    # a conversation's system turn (one per file) is the run's system prompt, saved with the model
    fmt = PromptFormat(cfg.template, system_prompt_of(records, cfg.system_prompt), cfg.position_offset)
    encoder = PromptEncoder(tokenizer, fmt, cfg.max_length, cfg.allow_special_tokens)
    warn_special_records(encoder, records, cfg.data)
    features = encode_records(records, encoder, with_english=cfg.method == "cc")
    summary = encoder.stats.summary()
    logger.info("data: %d %s records (%d skipped); %s", report.loaded, report.format, report.skipped, summary)
    set_seed(cfg.seed)
    cc_config = CCConfig(
        method=cfg.method,
        inject_layer=cfg.inject_layer,
        tau=cfg.tau,
        english_grad=cfg.english_grad,
        layer_choice=cfg.layer_choice,
        fusion=cfg.fusion,
        dm_input=cfg.dm_input,
        tau_end=cfg.tau_end,
        augment=cfg.augment,
        layers_path=cfg.layers_path,
        ffn_module=cfg.ffn_module,
        prompt_format=PromptFormat(encoder.mode, fmt.system_prompt, fmt.position_offset),
        # a LoRA folder loads its base from here: a folder as an absolute path, a preset by name
        base_model=str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
    )
    warn_cpu_bf16(cfg.bf16, not _has_accelerator())  # emulated bf16 is many times slower than float32
    base = CCModel._load_base(model_path, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    check_weight_dtype(str(base.dtype).removeprefix("torch."), cfg.lora_r)  # --dtype auto: the folder's
    if cfg.lora_r:
        base = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target)
    model = CCModel(base, cc_config)
    check_context(records, features, _model_context(model))
    return model, tokenizer, FeatureDataset(features), report, encoder.stats


def data_options(cfg) -> DataOptions:
    """How to read ``cfg.data``: ``--format``, ``--columns``, ``--split`` (checked, one-line errors)."""
    return DataOptions.of(cfg.data_format, cfg.columns, cfg.split)


def check_required(cfg: TrainConfig) -> None:
    """Options that cannot make a run: one line each, before anything is loaded."""
    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise CCError(f"--{name} is required")
    if cfg.bf16 and cfg.fp16:
        raise CCError("--bf16 and --fp16 exclude each other")
    check_weight_dtype(cfg.dtype, cfg.lora_r, warn=False)
    check_augment(cfg.augment)
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(cfg, name) <= 0:
            raise CCError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("lr", "dm_lr_scale", "tau"):
        if not getattr(cfg, name) > 0:  # also refuses nan
            raise CCError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and not cfg.epochs > 0:
        raise CCError(
            f"nothing to train: --max-steps {cfg.max_steps} and --epochs {cfg.epochs} make a run of zero steps"
        )
    if not 0 <= cfg.warmup_ratio <= 1:
        raise CCError(f"--warmup-ratio must be between 0 and 1, got {cfg.warmup_ratio}")
    if cfg.save_steps < 0 or cfg.save_total_limit < 0:
        raise CCError("--save-steps and --save-total-limit must be ≥ 0")
    data_options(cfg)  # a bad --format or --columns fails before anything is loaded


def check_weight_dtype(dtype: str, lora_r: int, warn: bool = True) -> None:
    """Full fine-tuning of half-precision weights: float16 is refused, bfloat16 warned about.

    AdamW's second moment (the squared gradient) underflows in float16, and the step ``m / (√v + ε)``
    then grows by orders of magnitude (measured: embeddings moved by 230 in 3 steps at lr 1e-3 on the
    tiny model). In bfloat16 an update smaller than half the spacing of a weight's value (2⁻⁹ of it)
    is lost. With LoRA the trained adapters stay float32 (PEFT), so the base may be either."""
    if lora_r:
        return
    if dtype == "float16":
        raise CCError(
            "--dtype float16 cannot train the weights themselves (AdamW's squared gradients underflow "
            "in float16); use --fp16 (float32 master weights), --dtype bfloat16, or LoRA (--lora-r)"
        )
    if dtype == "bfloat16" and warn:
        logger.warning(
            "--dtype bfloat16 trains the bfloat16 weights themselves: an update smaller than 2^-9 of a "
            "weight is lost (at lr 1e-5 most weights never change); --bf16 keeps float32 master weights"
        )


# what a training run writes into --output: what --overwrite clears (nothing else is touched)
RUN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    "adapter_model.safetensors",
    "adapter_config.json",
    "training_args.bin",
    CONFIG_NAME,
    DECISION_MAKER_NAME,
    MATRIX_NAME,
    MATRIX_REPORT_NAME,
    LAYER_CHOICE_NAME,
    TRAIN_RESULTS_NAME,
    SETTINGS_NAME,
    "trainer_state.json",  # the log of a run whose checkpoints the experiment removed once it finished
    INCOMPLETE_MARKER,
)
RUN_PATTERNS = ("checkpoint-*", "model-*-of-*.safetensors", ".stage-*", "eval", "runs")


def run_entries(folder: str | Path) -> list[Path]:
    """The files and folders of a training run (ours and the Trainer's) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {folder / name for name in RUN_FILES if (folder / name).exists()}
    for pattern in RUN_PATTERNS:
        found.update(folder.glob(pattern))
    return sorted(found)


def check_output_target(cfg: TrainConfig, config_file: str | None = None) -> Path:
    """``--output`` is never an input or inside one (the model, the base it records when it is a run,
    the data, the config file ``config_file``) and never holds one, never a file, and writable;
    checked before anything is created there. A ``--model`` folder left incomplete by an interrupted
    save is refused too, as every loader refuses it."""
    if Path(cfg.model).is_dir() and is_incomplete(cfg.model):
        raise CCError(
            f"--model {cfg.model}: an interrupted save left this folder incomplete ({INCOMPLETE_MARKER} is "
            "present); save it again or resume it from a checkpoint"
        )
    inputs = {**model_inputs(cfg.model), "--data": cfg.data, "--config": config_file}
    check_output_guard(cfg.output, inputs, folder=True)
    return check_output_folder(cfg.output)


def check_output(cfg: TrainConfig) -> None:
    """Never silently over another run: a folder holding one is refused unless ``--overwrite`` (which
    clears that run's files first) or ``--resume`` (which continues it)."""
    entries = run_entries(cfg.output)
    if not entries or cfg.resume:
        return
    names = ", ".join(p.name for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not cfg.overwrite:
        raise CCError(
            f"--output {cfg.output} holds another run ({names}); use --overwrite to replace it or "
            "--resume last to continue it"
        )
    logger.info("--overwrite: removing the previous run from %s (%s)", cfg.output, names)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def train(cfg: TrainConfig, config_file: str | None = None) -> Path:
    """Train and save; returns the output folder. The output folder is locked for the run (a second
    process, or a reader of the folder such as ``eval``, gets a one-line error naming the holder) and
    checked first (:func:`check_output_target`, :func:`check_output`); a ``--model`` folder is read
    under a shared lock (``config_file``: the YAML the options came from, never written over)."""
    cfg = resolve_trainer_options(cfg)
    check_required(cfg)
    if _is_main_process():
        target = check_output_target(cfg, config_file)
        with folder_lock(cfg.model, "cctuning train", shared=True), folder_lock(target, "cctuning train"):
            check_output(cfg)
            with writes_into(target), _torch_write_errors(target):  # the Trainer's own writes name no file
                return _train(cfg)
    return _train(cfg)


@contextlib.contextmanager
def _torch_write_errors(target: Path):
    """torch.save on a full disk fails with a RuntimeError of its archive writer, not an OSError: one
    line naming the folder instead of a traceback (the checkpoint it cut holds no trainer_state.json,
    so it is never resumed)."""
    try:
        yield
    except RuntimeError as err:
        if not any(mark in str(err) for mark in ("PytorchStreamWriter", "inline_container")):
            raise
        raise CCError(
            f"{target}: a checkpoint could not be written ({first_line(err)}); is the disk full?"
        ) from None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _train(cfg: TrainConfig) -> Path:
    resume = resume_checkpoint(cfg)  # before anything slow: a wrong --resume fails at once
    settings = run_settings(cfg)
    if resume and _nothing_left(cfg, settings, resume):
        return Path(cfg.output)
    # the TrainingArguments first: under DeepSpeed ZeRO-3 they make from_pretrained load the model
    # already partitioned (HfDeepSpeedConfig), instead of whole on every rank
    args = build_training_arguments(cfg)
    model, tokenizer, dataset, report, stats = prepare(cfg)
    collator = CCCollator(tokenizer.pad_token_id, cfg.padding_side)
    trainer = CCTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        connection_lr_scale=cfg.dm_lr_scale,
        run_settings=settings,
    )
    if resume:
        logger.info("resuming from %s", resume)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    out = Path(cfg.output)
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return out
    trained = result.global_step - checkpoint_step(resume)  # steps of this command
    write_json(
        out / TRAIN_RESULTS_NAME,
        {
            "config": asdict(cfg),
            "records": report.loaded,
            "examples": len(dataset),  # the records after --augment
            "skipped_records": report.skipped,
            "truncation": asdict(stats),
            "global_step": result.global_step,
            "train_loss": result.training_loss if trained else None,
            "seconds": round(time.time() - start, 2),
            "layer_choice_counts": trainer.layer_counts.tolist(),
            "warnings": model_warnings(trainer, tokenizer),
            "versions": versions(),
        },
    )
    return out


def _nothing_left(cfg: TrainConfig, settings: dict, checkpoint: str) -> bool:
    """Check that ``checkpoint`` is this run's (its settings); True when it ended the run and
    ``--output`` already holds the run's final model: a rerun trains nothing and writes nothing."""
    check_same_run(settings, checkpoint, f"--resume {cfg.resume}")
    step = finished_step(checkpoint)
    ours = Path(checkpoint).resolve().parent == Path(cfg.output).resolve()
    if step is None or not ours or not saved_final(cfg.output, step, TRAIN_RESULTS_NAME):
        return False
    logger.info("%s: the run ended at step %d and its model is saved; nothing to train", cfg.output, step)
    return True


def model_warnings(trainer: CCTrainer, tokenizer) -> list[str]:
    """Warnings about the trained model, logged and recorded in train_results.json: a model whose
    logits are the same for every token (:func:`~cctuning.model.health.constant_logits`) predicts
    nothing. Skipped where the weights are sharded over processes (FSDP, DeepSpeed)."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return []
    found = []
    if constant_logits(trainer._cc_model(), tokenizer):
        found.append(
            "the trained model gives every token the same logit on a probe prompt: it predicts nothing "
            "(the run diverged: lower --lr)"
        )
    for text in found:
        logger.warning("%s", text)
    return found


def train_or_reuse(cfg: TrainConfig) -> bool:
    """Train into ``cfg.output`` unless it already holds a finished run with the same settings, which
    is reused; an interrupted run resumes from its last complete checkpoint. A finished run with
    other settings is refused. Returns whether it trained."""
    cfg = resolve_trainer_options(cfg)
    done = Path(cfg.output) / TRAIN_RESULTS_NAME
    if done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))["config"]
        defaults = asdict(TrainConfig())
        # options added in later versions count as unchanged while they keep their defaults;
        # `resume` and `overwrite` say how a run was started, not what it trains
        started = ("resume", "overwrite")
        if all(previous.get(k, defaults[k]) == v for k, v in asdict(cfg).items() if k not in started):
            logger.info("%s: already trained with these settings, reusing it", cfg.output)
            return False
        raise CCError(f"{cfg.output} holds a run with other settings; delete it or choose another --output")
    if last_checkpoint(cfg.output):
        cfg.resume = "last"
    else:  # the folder holds at most the remains of a run killed before its first checkpoint
        cfg.overwrite = True
    train(cfg)
    return True
