"""What this CPU computes fast: bf16 autocast pays only on a CPU with bf16 matrix units.

Under ``--bf16`` (``torch.autocast(bfloat16)`` with float32 master weights) the matrix products run
in bfloat16. A CPU with AVX512-BF16 or AMX runs them natively (a CC-Tuning step of SmolLM2-135M took
0.54× the float32 time on such a CPU, 2026-11-25); one without them (AVX2 only) emulates them, far
slower than float32: on this project's AVX2 machine (2026-12-07) ``torch.mm`` reached about 1 GFLOP/s
in bfloat16 against 35 to 54 in float32, and a SmolLM2-135M training step under autocast took 20 to
30 minutes. ``--bf16`` stays off by default (docs/training.md: the same config must give the same
numbers on every machine), and training warns when it is asked for on such a CPU.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

#: the /proc/cpuinfo flags of bf16 matrix units (AVX512-BF16 dot products, AMX tiles)
BF16_UNITS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first CPU's flags in ``cpuinfo``; None where it cannot be read (not Linux, no flags line)."""
    try:
        found = re.search(r"^flags\s*:\s*(.+)$", Path(cpuinfo).read_text(errors="replace"), re.M)
    except OSError:
        return None
    return set(found.group(1).split()) if found else None


def cpu_has_bf16_units(flags: set[str] | None = None) -> bool | None:
    """Whether the CPU has bf16 matrix units (:data:`BF16_UNITS`); None when its flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(f in flags for f in BF16_UNITS)


def warn_cpu_bf16(bf16: bool, on_cpu: bool, flags: set[str] | None = None) -> bool:
    """Warn when bf16 autocast is asked for on a CPU without bf16 units; returns whether it warned."""
    if not (bf16 and on_cpu and cpu_has_bf16_units(flags) is False):
        return False
    logger.warning(
        "--bf16 on a CPU without bf16 matrix units (no %s in /proc/cpuinfo): autocast emulates the bf16 "
        "matrix products, which makes training many times slower than float32 (a SmolLM2-135M step took "
        "20-30 minutes against seconds); train without --bf16 on this machine",
        " or ".join(BF16_UNITS),
    )
    return True
