"""The ``cctuning`` command line. Only this package prints; the library logs.

One module per group of commands (:mod:`.train`; :mod:`.inference`: fit-matrix, generate, export;
:mod:`.evaluation`: eval; :mod:`.lm_eval`; :mod:`.serve`; :mod:`.lab`: experiment, demo, report), the options they share in
:mod:`.common`, what ``-v`` shows in :mod:`.quiet` and ``--version`` in :mod:`.about`.

Start-up is kept short (``make bench``, section ``startup``): :func:`main` reads the command's name
from the command line first and builds only that command's parser (``cctuning --help`` builds none,
only the list of commands); each command imports what it runs inside its own function. No module
here imports torch, transformers or lm-eval at its top. :func:`build_parser` builds every command's
parser (for tests and the docs).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from cctuning.cli import quiet
from cctuning.cli.about import VersionAction
from cctuning.cli.common import inference_autocast
from cctuning.config import apply_yaml_defaults
from cctuning.errors import CCError

# every command, in the order of ``cctuning --help``: name → (module of cctuning.cli, one-line help)
COMMANDS = {
    "train": ("train", "fine-tune with CC-Tuning (or plain SFT with --method sft)"),
    "fit-matrix": ("inference", "fit the Transform Matrix (non-English → English activations)"),
    "generate": ("inference", "greedy generation with the simulated connection"),
    "eval": ("evaluation", "score a model on the benchmarks, per language"),
    "demo": ("lab", "CC-Tuning vs SFT on a real small model, end to end (make demo)"),
    "experiment": ("lab", "a resumable grid of methods × ablations × seeds with NLL and benchmarks"),
    "report": ("lab", "put runs side by side (tables, plots) with the connection's diagnostics"),
    "export": (
        "inference",
        "write a trained run as a self-contained folder (LoRA merged with --merge-lora)",
    ),
    "serve": ("serve", "an OpenAI-compatible server with the connection, and a chat page"),
    "lm-eval": (
        "lm_eval",
        "lm-evaluation-harness with the model 'cctuning' and our tasks (all lm-eval arguments pass through)",
    ),
}
# what the file system answers a write it refuses: one line naming the path, not a traceback
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# the options of ``cctuning`` itself (before the command), none of which takes a value
GLOBAL_OPTIONS = ("-h", "--help", "-v", "--verbose", "--version")


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser of ``cctuning``: with every command's options (``"*"``, the default), or only
    ``command``'s (the others are listed with their help, without options; None: no command's)."""
    parser = argparse.ArgumentParser(
        prog="cctuning",
        description="CC-Tuning: cross-lingual connection for multilingual supervised fine-tuning.",
        epilog="`cctuning COMMAND --help` shows a command's options.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and the third-party warnings hidden by default",
    )
    parser.add_argument(
        "--version", action=VersionAction, help="cctuning's version and those of the packages it runs on"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help) in COMMANDS.items():
        if command in ("*", name):
            importlib.import_module(f"cctuning.cli.{module}").add_command(sub, name, help)
        else:
            sub.add_parser(name, help=help)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command named on the command line (its first word that is not an option of ``cctuning``
    itself), or None when there is none (``cctuning --help``, ``cctuning --version``)."""
    for token in argv:
        if token in ("-h", "--help", "--version"):
            return None
        if not token.startswith("-"):
            return token
    return None


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--config FILE.yaml`` of a command marked by :func:`cctuning.cli.common.add_yaml_config`, read
    before the command line is parsed: the file's options become the command's defaults, so the flags
    override them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    name = command_of(argv)
    command = sub.choices.get(name) if name is not None else None
    if command is None or not getattr(command, "yaml_defaults", False):
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[argv.index(name) + 1 :])[0].config
    if path:
        apply_yaml_defaults(command, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = command_of(argv)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        apply_config_file(parser, argv)
    except CCError as err:
        print(f"cctuning: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    quiet.setup(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with inference_autocast(args):
            return args.func(args)
    except CCError as err:
        print(f"cctuning: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        # a full disk, a quota, a read-only or forbidden folder: the writers leave no partial file
        where = f"{err.filename}: " if err.filename else ""
        print(f"cctuning: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cctuning: interrupted", file=sys.stderr)
        return 130
