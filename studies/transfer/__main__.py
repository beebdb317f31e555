"""``python -m studies.transfer --output DIR [options]``: run the study, print summary.md's table.

A bad option is one line on stderr and exit status 2, as is any CCError of the run."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cctuning.errors import CCError
from studies.transfer.config import add_arguments, config_from_args
from studies.transfer.run import run_transfer_task
from studies.transfer.summary import SUMMARY_NAME, summary_markdown

PROG = "python -m studies.transfer"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line (argparse's own prints the usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A synthetic task where CC-Tuning's connection must help by construction "
        "(docs/transfer.md): trains and evaluates tiny models from scratch, one world per seed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = config_from_args(args)
        summary = run_transfer_task(cfg)
    except CCError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(summary_markdown(summary))
    print(f"summary: {cfg.output}/{SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
