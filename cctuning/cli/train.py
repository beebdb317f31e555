"""``cctuning train``: its options in sections (the common ones first, with their defaults), then
every transformers.TrainingArguments field, generated (read from a cache: no transformers import)."""

from __future__ import annotations

import argparse
import json
import os

from cctuning.cli.common import CONFIG_HELP, given_flags
from cctuning.config import add_argument_specs, argument_specs
from cctuning.training.args import OPTION_GROUPS, TrainConfig
from cctuning.training.options import FLAG_PREFIX, add_trainer_arguments, build_train_config

USAGE = "cctuning train [--config FILE.yaml] --model MODEL --data DATA --output DIR [options]"
DESCRIPTION = (
    "Fine-tune with CC-Tuning (--method cc) or plain multilingual SFT (--method sft). Every option "
    "can also be given in a YAML file (--config; flags override it): `max_steps: 100` for --max-steps."
)


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, usage=USAGE, description=DESCRIPTION)
    specs = {s["name"]: s for s in argument_specs(TrainConfig, show_default=True)}
    groups = {title: p.add_argument_group(title) for title in OPTION_GROUPS}
    common = groups["common options"]
    common.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    for title, names in OPTION_GROUPS.items():
        add_argument_specs(groups[title], [specs[n] for n in names])
    # the Trainer's save_strategy beside our save options, then its shortcut --no-checkpoints
    add_trainer_arguments(p, promoted={"save_strategy": common})
    common.add_argument(
        "--no-checkpoints",
        dest=FLAG_PREFIX + "save_strategy",
        action="store_const",
        const="no",
        default=argparse.SUPPRESS,
        help="save no checkpoint-N folders, only the final model (--save-strategy no; in YAML "
        "save_strategy: no); such a run cannot be resumed",
    )
    p.set_defaults(func=run)
    return p


def close_process_group() -> None:
    """End a multi-process run's process group cleanly (every rank has saved): left to interpreter
    teardown, gloo's and DeepSpeed's threads could abort a rank after its work was done."""
    import torch.distributed as dist  # deferred: --help must not import torch

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    from cctuning.training import train  # deferred: --help must not import torch and the Trainer

    cfg = build_train_config(args.config, given_flags(args))
    out = train(cfg, config_file=args.config)
    close_process_group()
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one line per run, not per process
        results = out / "train_results.json"
        skipped = (
            json.loads(results.read_text(encoding="utf-8")).get("skipped_records", 0)
            if results.is_file()
            else 0
        )
        note = f" ({skipped} invalid records skipped)" if skipped else ""
        print(f"saved {cfg.method} model to {out}{note}")
    return 0
