"""The options that several commands share, and what they mean at run time.

The choices of ``--connection`` and ``--format`` are written out here, not imported, so that a
command's ``--help`` does not import torch (``cctuning.model.connection``) or the data pipeline;
tests/test_cli.py checks them against the library's own lists.
"""

from __future__ import annotations

import argparse
import contextlib

MODEL_HELP = "a model folder (CC-Tuning, SFT or plain Hugging Face)"
CONFIG_HELP = "YAML file with any of the options below (flags override it)"
# cctuning.model.connection.CONNECTIONS and cctuning.data.formats.FORMATS
CONNECTIONS = ("transform", "none", "english")
FORMATS = ("auto", "official", "messages", "prompt-completion")


def given_flags(args: argparse.Namespace) -> dict:
    """The options of a config-file command (train, demo) as parsed, without the parser's own entries."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose", "func")}


def add_data_options(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    """``--format``, ``--columns`` and ``--split``: how the records of ``data_flag`` are read (as
    train's options of the same names; docs/data.md)."""
    p.add_argument(
        "--format",
        dest="data_format",
        choices=FORMATS,
        default="auto",
        help=f"format of the {data_flag} records (default: auto, detected from the fields)",
    )
    p.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help=f"read fields of the {data_flag} records from columns of other names, e.g. instruction=question",
    )
    p.add_argument("--split", help=f"the split of a DatasetDict folder given as {data_flag}")


def data_options(args: argparse.Namespace):
    """The :class:`~cctuning.data.formats.DataOptions` of ``--format``, ``--columns``, ``--split``."""
    from cctuning.data.formats import DataOptions  # deferred: the data package imports torch

    return DataOptions.of(args.data_format, args.columns, args.split)


def add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connection",
        choices=CONNECTIONS,
        help="default: transform when the model has a matrix, else none",
    )


def add_withhold_english(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--withhold-english",
        action="store_true",
        help="a model trained with --augment bilingual-prompt: prompt with the non-English instruction "
        "alone, even where its English is at hand (default: English, then non-English)",
    )


def augment_note(report: dict) -> str | None:
    """The line a command prints about a ``bilingual-prompt`` model's prompts that went without their
    English (``report``: an output's record of :func:`~cctuning.data.augment.prompt_report`)."""
    missing = report.get("prompts_without_english")
    if not missing:
        return None
    why = "--withhold-english" if report.get("english_withheld") else "no English at hand"
    return (
        f"note: {missing} prompts got the non-English instruction alone ({why}); the model was trained "
        "with --augment bilingual-prompt (English, then non-English)"
    )


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)


def add_special_tokens_option(p: argparse.ArgumentParser, what: str = "records") -> None:
    p.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help=f"let special-token strings inside the {what} (e.g. <|im_start|>, </s>) become control "
        "tokens (default: encoded as plain text)",
    )


def add_yaml_config(p: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml`` for a command built with plain add_argument calls: the file's options
    become the command's defaults (:func:`cctuning.cli.apply_config_file`), so flags override them."""
    p.add_argument("--config", help=CONFIG_HELP)
    p.yaml_defaults = True


def add_loading_options(p: argparse.ArgumentParser) -> None:
    """How the inference commands load and run a model: ``--trust-remote-code``, ``--device``,
    ``--dtype`` and ``--bf16``."""
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default: $CCTUNING_DEVICE, else CUDA when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="load the weights in this dtype (default: as saved; cctuning's own runs save float32); "
        "the Decision Maker and the Transform Matrix compute in float32 whatever it is",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="run the forward passes under bf16 autocast (the weights stay as loaded)",
    )
    p.set_defaults(inference_precision=True)


def inference_autocast(args: argparse.Namespace):
    """bf16 autocast on the inference device for ``--bf16`` of an inference command (``train``'s
    ``--bf16`` is the Trainer's own)."""
    if not (getattr(args, "inference_precision", False) and args.bf16):
        return contextlib.nullcontext()
    import torch  # deferred: only --bf16 of an inference command needs it here

    from cctuning.loading import resolve_device  # deferred: imports torch

    return torch.autocast(resolve_device(args.device).type, dtype=torch.bfloat16)
