"""Shared pieces of the benchmarks: threads, statistics, machine description, models, data, memory."""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m"
# name -> (decoder layers, hidden size) of the random Llama models built from cctuning.testing
RANDOM_MODELS = {"tiny": (3, 32), "medium": (8, 256)}
MODELS = ("tiny", "medium", SMOLLM2)


def log(message: str) -> None:
    """Progress line on stderr (stdout of a worker carries its JSON result)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def set_threads(threads: int) -> None:
    """The same intra-op thread count everywhere (main process and every worker)."""
    import torch

    torch.set_num_threads(threads)


# -- statistics ---------------------------------------------------------------------------------
def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """``{median, min, max, repeats}`` of a figure measured several times."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarise")
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "repeats": len(vals),
    }


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratio per repeat (numerator and denominator were measured in the same repeat)."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def rotated(items: Sequence[Any], repeat: int) -> list[Any]:
    """``items`` rotated by ``repeat``, so that no variant always runs first (or last) in a repeat."""
    k = repeat % len(items)
    return list(items[k:]) + list(items[:k])


# -- machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else "unknown"


#: CPU flags that give bf16 matrix products hardware support (without them torch's bf16 matmul is
#: far slower than its fp32 one: 0.5–1.2 GFLOP/s against 35–94 on the AVX2-only EPYC of 2026-12-07)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def cpu_flags(wanted: tuple[str, ...] = BF16_FLAGS) -> list[str]:
    """Which of ``wanted`` this CPU reports in /proc/cpuinfo."""
    try:
        found = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return []
    flags = set(found.group(1).split()) if found else set()
    return [f for f in wanted if f in flags]


BF16_SLOW_FACTOR = 4  # bf16 counts as slow where its matmul peak is under the fp32 peak / this


def bf16_slow(peaks: dict) -> str | None:
    """Why bf16 work is left out on this machine (its ``torch.mm`` peak is under a quarter of fp32's),
    or None."""
    fp32, bf16 = peaks["fp32"]["peak"], peaks["bf16"]["peak"]
    if bf16 * BF16_SLOW_FACTOR >= fp32:
        return None
    return (f"bf16 matmul peak {bf16:.3g} GFLOP/s against fp32 {fp32:.3g}: this CPU has no bf16 units "
            f"(flags: {', '.join(cpu_flags()) or 'none of ' + ', '.join(BF16_FLAGS)})")  # fmt: skip


def memory_total_gb() -> float | None:
    try:
        found = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return round(int(found.group(1)) / 2**20, 1) if found else None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": memory_total_gb(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "cuda": torch.cuda.is_available(),
        "cpu_flags": cpu_flags(),
    }


# -- models -------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A base model, its tokenizer and a short description."""

    name: str
    base: Any
    tokenizer: Any
    description: str


def unavailable(name: str) -> str | None:
    """Why model ``name`` cannot be benchmarked here (None when it can)."""
    if name in RANDOM_MODELS:
        return None
    try:
        from cctuning.presets import resolve_model
    except ImportError as err:
        return f"cctuning.presets is not importable ({err})"
    from cctuning.errors import CCError

    try:
        resolve_model(name)
    except CCError as err:
        return str(err)
    return None


def _random_llama(tokenizer, layers: int, hidden: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    from cctuning.testing import tiny_config

    config = tiny_config("llama", len(tokenizer), num_layers=layers, hidden_size=hidden)
    config.max_position_embeddings = 4096  # the tiny tokenizer splits non-Latin text into many tokens
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def load_base(name: str, seed: int = 0, folder: str | None = None) -> Loaded:
    """``tiny``/``medium``: random Llama models with the local test tokenizer; else a preset, or the
    model ``folder`` under that name (the GPU check's SmolLM2-135M in its shape, with random weights)."""
    import torch

    if name in RANDOM_MODELS:
        from cctuning.testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        layers, hidden = RANDOM_MODELS[name]
        base = _random_llama(tokenizer, layers, hidden, seed)
        params = sum(p.numel() for p in base.parameters())
        desc = f"random Llama, {layers} layers, hidden {hidden}, vocab {len(tokenizer)}, {params / 1e6:.2f} M params"
        return Loaded(name, base, tokenizer, desc)
    from transformers import AutoModelForCausalLM

    from cctuning.loading import load_tokenizer
    from cctuning.presets import resolve_model

    path = folder or resolve_model(name)
    tokenizer = load_tokenizer(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in base.parameters())
    desc = f"{name} (float32, {base.config.num_hidden_layers} layers, hidden {base.config.hidden_size}, {params / 1e6:.0f} M params)"
    return Loaded(name, base, tokenizer, desc)


def wrap(loaded: Loaded, method: str, copy_base: bool = True, with_transform: bool = False, seed: int = 0):
    """A :class:`CCModel` of ``method`` around (a copy of) the base model, as ``cctuning train`` builds it.

    ``with_transform`` attaches a Transform Matrix (identity plus noise: the same cost as a fitted one).
    """
    import torch

    from cctuning.data import PromptEncoder, PromptFormat
    from cctuning.inference import TransformMatrix
    from cctuning.model import CCConfig, CCModel

    fmt = PromptFormat()
    mode = PromptEncoder(loaded.tokenizer, fmt).mode
    base = copy.deepcopy(loaded.base) if copy_base else loaded.base
    torch.manual_seed(seed)
    model = CCModel.from_base(base, CCConfig(method=method, prompt_format={**fmt.to_dict(), "mode": mode}))
    if with_transform:
        d = model.arch.hidden_size
        model.set_transform(TransformMatrix(torch.eye(d) + 0.01 * torch.randn(d, d)))
    return model


# -- data ---------------------------------------------------------------------------------------
def mix_records(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """``n`` records of the bundled training mix (seeded shuffle; cycled when ``n`` exceeds the split)."""
    from cctuning.data.mix import load_mix

    records = load_mix(split)
    random.Random(seed).shuffle(records)
    return [records[i % len(records)] for i in range(n)]


# -- memory -------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if not found:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1)) / 1024


def rss_mb() -> float:
    """Resident set size now (MiB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """High-water mark of the resident set size (MiB) since the process started or the last reset."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Reset the RSS high-water mark to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


# -- workers ------------------------------------------------------------------------------------
def run_worker(task: str, args: dict, fixed_mmap_threshold: bool = False, timeout: float = 1800) -> dict:
    """Run ``python -m bench.worker TASK ARGS`` in a fresh process and return its JSON result.

    ``fixed_mmap_threshold`` makes glibc serve every allocation of 64 KiB or more with its own
    mapping, returned to the system on free, so that RSS follows the live tensors closely.
    """
    env = dict(os.environ)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.worker", task, json.dumps(args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {task} {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- contention ---------------------------------------------------------------------------------
def _system_busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores; steal time counts as busy)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process (every thread) and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How many cores *other* processes kept busy while a measurement ran (0 on a quiet machine)."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), _system_busy_s(), _own_cpu_s()

    def foreign_cores(self) -> float:
        wall = time.perf_counter() - self.wall
        foreign = (_system_busy_s() - self.busy) - (_own_cpu_s() - self.own)
        return max(0.0, foreign / wall) if wall > 0 else 0.0


def wait_until_quiet(limit_s: float, threshold: float) -> float:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` cores for 3 s in a row."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < limit_s and quiet < 3:
        meter = CpuMeter()
        time.sleep(1.0)
        quiet = quiet + 1 if meter.foreign_cores() < threshold else 0
    return time.perf_counter() - start


def _busy_now(threshold: float) -> bool:
    """Other processes use more than ``threshold`` cores right now (sampled over 0.3 s)."""
    meter = CpuMeter()
    time.sleep(0.3)
    return meter.foreign_cores() > threshold


MIN_CLEAN_ROUNDS = 3


@dataclass
class Contention:
    """Rounds disturbed by other processes are measured again; see :func:`clean_rounds`."""

    threshold: float = 0.25  # cores used by other processes above which a round is discarded
    max_wait_s: float = 600.0  # waiting allowed per measurement series

    def settle(self) -> None:
        """Before a warm-up: wait (up to ``max_wait_s``) for a quiet machine if it is busy now."""
        if _busy_now(self.threshold):
            log(f"  waiting for other processes to go under {self.threshold:.2f} cores")
            wait_until_quiet(self.max_wait_s, self.threshold)


def clean_rounds(
    repeats: int, run_round, contention: Contention, label: str, describe=None
) -> tuple[list[Any], dict]:
    """Call ``run_round(index, attempt)`` (index: the round being measured; attempt: counts every try,
    for rotating the order of variants) until ``repeats`` rounds ran while other processes stayed under
    ``contention.threshold`` cores. A disturbed round is discarded and run again once the machine is
    quiet. When ``max_wait_s`` of waiting is used up, the series stops early if it has
    ``MIN_CLEAN_ROUNDS`` clean rounds; otherwise disturbed rounds are kept (``kept_disturbed``)."""
    kept: list[Any] = []
    info = {
        "discarded": 0,
        "kept_disturbed": 0,
        "stopped_early": False,
        "waited_s": 0.0,
        "max_foreign_cores": 0.0,
    }
    attempt = 0
    describe = describe or _describe
    while len(kept) < repeats:
        budget = contention.max_wait_s - info["waited_s"]
        if budget > 0 and _busy_now(contention.threshold):
            info["waited_s"] += wait_until_quiet(budget, contention.threshold)
        meter = CpuMeter()
        value = run_round(len(kept), attempt)
        foreign = meter.foreign_cores()
        attempt += 1
        if foreign > contention.threshold:
            budget = contention.max_wait_s - info["waited_s"]
            if budget > 0:
                info["discarded"] += 1
                log(f"  {label}: round discarded, other processes used {foreign:.2f} cores; waiting")
                info["waited_s"] += wait_until_quiet(budget, contention.threshold)
                continue
            if len(kept) - info["kept_disturbed"] >= MIN_CLEAN_ROUNDS:
                info["stopped_early"] = True
                log(
                    f"  {label}: machine still busy after {info['waited_s']:.0f} s of waiting; "
                    f"stopping with {len(kept)} rounds"
                )
                break
            info["kept_disturbed"] += 1
        info["max_foreign_cores"] = max(info["max_foreign_cores"], foreign)
        kept.append(value)
        log(f"  {label} {len(kept)}/{repeats}: {describe(value)} (others {foreign:.2f} cores)")
    info["waited_s"] = round(info["waited_s"], 1)
    info["max_foreign_cores"] = round(info["max_foreign_cores"], 2)
    return kept, info


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    return str(value)
