"""``train(config)``: records → tokenised pairs → CCModel → CCTrainer → model folder."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder, PromptFormat
from cctuning.data.records import LoadReport, load_records
from cctuning.errors import CCError, DataError
from cctuning.io import write_json
from cctuning.loading import load_tokenizer, resolve_model_path
from cctuning.model.ccmodel import CCConfig, CCModel
from cctuning.training.args import TrainConfig
from cctuning.versions import versions

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class FeatureDataset(Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def encode_records(records, encoder: PromptEncoder, with_english: bool) -> list[dict]:
    """Tokenise every record; an encoding problem is reported with the record's file and line."""
    features = []
    for rec in records:
        try:
            ex = encoder.encode_example(rec.instruction, rec.output, rec.instruction_en if with_english else None)
        except CCError as err:
            raise DataError(rec.path, rec.line, "instruction", str(err)) from None
        features.append(ex.features())
    return features


def build_training_arguments(cfg: TrainConfig):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=cfg.output,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
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
    )
    kwargs.update(cfg.trainer)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise CCError(f"invalid training arguments: {err}") from None


def prepare(cfg: TrainConfig):
    """Load and tokenise the data and build the model; everything ``train`` needs before the Trainer."""
    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise CCError(f"--{name} is required")
    model_path = resolve_model_path(cfg.model)
    report = LoadReport()
    records = load_records(cfg.data, require_english=cfg.method == "cc", skip_invalid=cfg.skip_invalid, report=report)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    fmt = PromptFormat(cfg.template, cfg.system_prompt, cfg.position_offset)
    encoder = PromptEncoder(tokenizer, fmt, cfg.max_length)
    features = encode_records(records, encoder, with_english=cfg.method == "cc")
    logger.info("data: %d records (%d skipped); %s", report.loaded, report.skipped, encoder.stats.summary())
    from transformers import set_seed

    set_seed(cfg.seed)
    cc_config = CCConfig(
        method=cfg.method,
        inject_layer=cfg.inject_layer,
        tau=cfg.tau,
        english_grad=cfg.english_grad,
        layers_path=cfg.layers_path,
        ffn_module=cfg.ffn_module,
        prompt_format={**fmt.to_dict(), "mode": encoder.mode},
        base_model=cfg.model,
    )
    model = CCModel.from_base(
        model_path, cc_config, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    return model, tokenizer, FeatureDataset(features), report, encoder.stats


def train(cfg: TrainConfig) -> Path:
    """Train and save; returns the output folder."""
    from cctuning.training.trainer import CCTrainer

    model, tokenizer, dataset, report, stats = prepare(cfg)
    args = build_training_arguments(cfg)
    collator = CCCollator(tokenizer.pad_token_id, cfg.padding_side)
    trainer = CCTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )
    resume = None
    if cfg.resume:
        resume = last_checkpoint(cfg.output) if cfg.resume == "last" else cfg.resume
        if resume is None:
            raise CCError(f"--resume last: no finished checkpoint in '{cfg.output}'")
        logger.info("resuming from %s", resume)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    out = Path(cfg.output)
    trainer.save_model(str(out))
    write_json(
        out / "train_results.json",
        {
            "config": asdict(cfg),
            "records": report.loaded,
            "skipped_records": report.skipped,
            "truncation": asdict(stats),
            "global_step": result.global_step,
            "train_loss": result.training_loss,
            "seconds": round(time.time() - start, 2),
            "layer_choice_counts": trainer.layer_counts.tolist(),
            "versions": versions(),
        },
    )
    return out


def last_checkpoint(output: str | Path) -> str | None:
    """The newest ``checkpoint-N`` that was written completely (its trainer_state.json comes last)."""
    folder = Path(output)
    if not folder.is_dir():
        return None
    done = [
        p for p in folder.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
