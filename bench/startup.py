"""Start-up of the command line: ``cctuning --help``, ``cctuning --version`` and ``cctuning train
--help`` against ``python -c "import torch"`` on the same machine.

Each is a fresh ``python`` process (this checkout's cctuning first on the path), timed from start
to exit with its output thrown away. A round runs every variant once, in an order rotated from round
to round; the figure of a variant is its best (shortest) time over the rounds, as start-up timings
are usually reported (the other processes of a shared machine only ever add time), and its ratio is
that best over the best ``import torch``. The median of the per-round ratios is recorded too.
Targets (issue 30): ``--help`` and ``--version`` at most 0.3× ``import torch`` (no torch,
transformers or lm-eval), ``train --help`` at most 1.5×.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.common import ROOT, Contention, clean_rounds, rotated, summary

BASELINE = "import torch"
# variant → the python arguments of its process
VARIANTS = {
    BASELINE: ["-c", "import torch"],
    "cctuning --help": ["-m", "cctuning.cli", "--help"],
    "cctuning --version": ["-m", "cctuning.cli", "--version"],
    "cctuning train --help": ["-m", "cctuning.cli", "train", "--help"],
}
TARGETS = {"cctuning --help": 0.3, "cctuning --version": 0.3, "cctuning train --help": 1.5}


@dataclass
class StartupSetup:
    repeats: int


def time_process(args: list[str]) -> float:
    """Seconds from starting ``python ARGS`` to its exit (it must succeed)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    return time.perf_counter() - start


def bench_startup(setup: StartupSetup, contention: Contention) -> dict[str, Any]:
    names = list(VARIANTS)
    for name in names:  # warm-up: the file system cache, the .pyc files
        time_process(VARIANTS[name])

    def run_round(_index: int, attempt: int) -> dict[str, float]:
        return {name: time_process(VARIANTS[name]) for name in rotated(names, attempt)}

    rounds, info = clean_rounds(
        setup.repeats,
        run_round,
        contention,
        "startup",
        lambda r: ", ".join(f"{name} {r[name]:.3f} s" for name in names),
    )
    best = {name: min(r[name] for r in rounds) for name in names}
    ratios = {name: round(best[name] / best[BASELINE], 3) for name in TARGETS}
    return {
        "seconds": {name: summary([r[name] for r in rounds], 3) for name in names},
        "best_seconds": {name: round(value, 3) for name, value in best.items()},
        "ratio_of_best": ratios,
        "ratio_per_round": {name: summary([r[name] / r[BASELINE] for r in rounds], 3) for name in TARGETS},
        "targets": TARGETS,
        "holds": {name: ratios[name] <= target for name, target in TARGETS.items()},
        "contention": info,
    }
