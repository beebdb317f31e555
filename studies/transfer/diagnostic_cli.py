"""The command line shared by the diagnostics of finished runs' saved models (``reprobe``,
``matrix_check``): run folders, ``--out FILE`` (never written over) and ``--threads``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def parse_diagnostic_args(prog: str, description: str, runs_help: str, argv: list[str] | None):
    """The parsed arguments; exits with one line (status 2) when ``--out`` exists or a run folder is not
    a finished run with its saved models. Sets torch's threads."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("runs", nargs="+", help=runs_help)
    parser.add_argument("--out", required=True, help="the JSON file to write (must not exist)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.exit(2, f"{prog}: error: {args.out} exists; give a new file\n")
    for run in map(Path, args.runs):
        if not (run / "summary.json").is_file() or not any(run.glob("seed-*/cc/config.json")):
            parser.exit(
                2, f"{prog}: error: {run}: not a finished run with its models (summary.json, seed-S/cc)\n"
            )
    torch.set_num_threads(args.threads)
    return args
