"""The ``cctuning`` command line. Only this module prints; the library logs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cctuning.config import add_dataclass_arguments, build_config
from cctuning.errors import CCError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from cctuning.training import TrainConfig, train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose", "func")}
    cfg = build_config(TrainConfig, args.config, flags)
    out = train(cfg)
    print(f"saved {cfg.method} model to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cctuning.training import TrainConfig

    parser = argparse.ArgumentParser(
        prog="cctuning",
        description="CC-Tuning: cross-lingual connection for multilingual supervised fine-tuning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune with CC-Tuning (or plain SFT with --method sft)")
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except CCError as err:
        print(f"cctuning: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cctuning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
