"""Achieved FLOP/s of the evaluation and generation paths, against this machine's measured matmul peak.

The peak: the best of ``torch.mm`` on a few shapes (square 1024, and the shapes of a SmolLM2-135M
MLP projection with 256 and 2048 rows), in float32 and in bfloat16, with the benchmark's threads.

The paths, each at batch 1 and batch ``batch_size``, in float32 and with the weights in bfloat16, on
a CC-Tuning model (random Decision Maker, identity-plus-noise Transform Matrix):

* ``nll-none``, ``nll-transform``: ``evaluate_nll`` (``cctuning eval --nll``) on XQuAD/de records
  (the benchmark's context and question as the instruction, its answer as the response: long prompts,
  short responses, as in the issue's ~350-token measurement);
* ``likelihood``: ``evaluate`` (``cctuning eval --scoring likelihood``) on XNLI/sw, transform connection;
* ``generate``: ``CCGenerator.generate``, transform connection, 40 new tokens (stop tokens off).

FLOPs are counted once per path, batch size and dtype with ``torch.utils.flop_counter.FlopCounterMode``
(matrix products; attention added by :func:`_sdpa_flops`, which PyTorch does not count on CPU:
``4 · Lq · Lk · d`` per head, the causal mask not discounted, as PyTorch counts attention on GPUs), so
padding and the connection's extra work are included: they are what the machine computes. The
achieved rate is those FLOPs over the measured time; the share of the peak says how much faster the
path could be at best. The peak is measured again in every round (1024³ and 2048×576×1536, briefly),
right after the round's paths, and each round's share is taken against its own peak, so that a load
from other processes weighs on both alike. In a round every variant of a path runs back to back, in an order rotated from
round to round, so that the batched speedup and the bf16 / fp32 ratio are measured seconds apart.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Contention,
    Loaded,
    clean_rounds,
    mix_records,
    pairwise_ratios,
    rotated,
    summary,
    wrap,
)

PEAK_SHAPES = ((1024, 1024, 1024), (256, 576, 1536), (2048, 576, 1536))
ROUND_PEAK_SHAPES = ((1024, 1024, 1024), (2048, 576, 1536))  # the fastest here, fp32 and bf16
GPU_PEAK_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192))  # small products do not reach a GPU's peak
PATHS = ("nll-none", "nll-transform", "likelihood", "generate")
DTYPES = ("fp32", "bf16")
NEW_TOKENS = 40
XQUAD_LANG = "de"


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(
    dtype: str, device: str = "cpu", min_seconds: float = 0.3, repeats: int = 5, shapes=PEAK_SHAPES
) -> dict:
    """GFLOP/s of ``torch.mm`` per shape (best of ``repeats`` timings of at least ``min_seconds``
    each) and ``peak``, the best of them."""
    import torch

    out: dict[str, Any] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(torch_dtype(dtype))
        b = torch.randn(k, n, device=device).to(torch_dtype(dtype))
        torch.mm(a, b)
        synchronize(device)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 0.05:
            torch.mm(a, b)
            calls += 1
        synchronize(device)
        per_call = (time.perf_counter() - start) / calls
        inner = max(1, int(min_seconds / per_call))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / inner)
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    out["peak"] = max(v for v in out.values())
    return out


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``softmax(Q Kᵀ) V``: 2·Lq·Lk·d for the scores and 2·Lq·Lk·dᵥ for the weighted sum, per head."""
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    heads = 1
    for x in batch:
        heads *= x
    return 2 * heads * lq * lk * (d + dv)


#: attention kernels counted with :func:`_sdpa_flops`: torch's own formulas assert as many key/value
#: heads as query heads, which grouped-query attention on CUDA (SDPA with enable_gqa) does not have
#: (found on an H200, 2026-11-26); ours counts per query head
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The gradients of ``softmax(Q Kᵀ) V``: dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q, twice the
    forward's products (no recomputation counted, as torch counts attention backward on GPUs)."""
    return 2 * _sdpa_flops(query, key, value)


#: their backward kernels, which PyTorch does not count on the CPU either; each takes
#: ``(grad_out, query, key, value, ...)``
ATTENTION_BACKWARD_KERNELS = tuple(f"{k}_backward" for k in ATTENTION_KERNELS)


def count_flops(fn) -> int:
    """FLOPs of the torch operations ``fn()`` runs (matrix products and attention, forward and
    backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {getattr(aten, k): _sdpa_flops for k in ATTENTION_KERNELS if hasattr(aten, k)}
    mapping.update(
        {getattr(aten, k): _sdpa_backward_flops for k in ATTENTION_BACKWARD_KERNELS if hasattr(aten, k)}
    )
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def xquad_records(n: int, lang: str = XQUAD_LANG) -> list[dict]:
    """The first ``n`` bundled XQuAD items as training-format records (instruction, output, lang)."""
    from cctuning.eval.benchmarks import RESOURCE_DIR

    rows = []
    with open(RESOURCE_DIR / "XQuAD" / f"{lang}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            rows.append(
                {"instruction": item["prompt"], "output": str(item["answer"]), "instruction_en": item["prompt_en"],
                 "lang": lang}
            )  # fmt: skip
            if len(rows) == n:
                break
    return rows


@dataclass
class FlopsSetup:
    items: int  # records / items / prompts per call of a path
    repeats: int
    batch_size: int = 8
    new_tokens: int = NEW_TOKENS  # generated per prompt by the generate path
    # the shapes of the peak measured again after each round (a CPU plumbing check takes a small one:
    # bf16 matmuls run at about 1 GFLOP/s on a CPU without bf16 units)
    round_peak_shapes: tuple = ROUND_PEAK_SHAPES
    dtypes: tuple[str, ...] = (
        DTYPES  # bf16 left out where this CPU has no bf16 units (bench.common.bf16_slow)
    )


class Paths:
    """One callable per (path, dtype, batch size) on the two copies of the model."""

    def __init__(self, loaded: Loaded, setup: FlopsSetup, folder: Path, device: str = "cpu"):
        self.loaded, self.setup, self.device = loaded, setup, device
        self.models = {
            name: wrap(loaded, "cc", with_transform=True).eval().to(device=device, dtype=torch_dtype(name))
            for name in setup.dtypes
        }
        self.nll_data = folder / "xquad.jsonl"
        self.nll_data.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in xquad_records(setup.items)),
            encoding="utf-8",
        )
        self.prompts = [r["instruction"] for r in mix_records(setup.items, seed=1)]

    def call(self, path: str, dtype: str, size: int):
        model, tok = self.models[dtype], self.loaded.tokenizer
        if path.startswith("nll-"):
            from cctuning.eval.nll import evaluate_nll

            connection = path.split("-", 1)[1]
            return lambda: evaluate_nll(
                model, tok, self.nll_data, connection, batch_size=size, max_length=2048, progress=False
            )
        if path == "likelihood":
            from bench.evaluation import run_eval

            return lambda: run_eval(model, tok, "likelihood", size, self.setup.items)
        from cctuning.inference import CCGenerator

        gen = CCGenerator(model, tok, max_new_tokens=self.setup.new_tokens, batch_size=size)
        gen.stop_ids = set()  # exactly new_tokens tokens for every prompt
        return lambda: gen.generate(self.prompts, "transform")


def bench_flops(
    loaded: Loaded, setup: FlopsSetup, contention: Contention, device: str = "cpu", peaks: dict | None = None
) -> dict[str, Any]:
    """Per path: FLOPs per item, seconds per item, GFLOP/s and share of the peak per dtype and batch
    size; the batched speedup per dtype and the bf16 / fp32 time ratio per batch size."""
    import logging

    logging.getLogger("cctuning").setLevel(logging.ERROR)  # e.g. short answers flagged by eval --nll
    peaks = peaks or {name: matmul_peak(name, device) for name in setup.dtypes}
    dtypes = setup.dtypes
    sizes = (1, setup.batch_size)
    out: dict[str, Any] = {
        "peak_gflops": peaks,
        "dtypes": list(dtypes),
        "items": setup.items,
        "batch_size": setup.batch_size,
        "new_tokens": setup.new_tokens,
        "paths": {},
    }
    with tempfile.TemporaryDirectory(prefix="cctuning-bench-flops-") as tmp:
        paths = Paths(loaded, setup, Path(tmp), device)
        for path in PATHS:
            variants = [(dtype, size) for dtype in dtypes for size in sizes]
            calls = {v: paths.call(path, *v) for v in variants}
            contention.settle()
            flops = {v: count_flops(calls[v]) for v in variants}  # also the warm-up

            def one_round(_index: int, attempt: int, calls=calls, variants=variants, dtypes=dtypes) -> dict:
                times = {}
                for v in rotated(variants, attempt):
                    gc.collect()
                    synchronize(device)
                    start = time.perf_counter()
                    calls[v]()
                    synchronize(device)
                    times[f"{v[0]} b{v[1]}"] = time.perf_counter() - start
                # the peak again, under the same load as this round's paths (a shared machine)
                shapes = setup.round_peak_shapes + (GPU_PEAK_SHAPES if device.startswith("cuda") else ())
                for dtype in dtypes:
                    times[f"{dtype} peak"] = matmul_peak(dtype, device, 0.1, 2, shapes)["peak"]
                return times

            rounds, info = clean_rounds(setup.repeats, one_round, contention, f"flops {loaded.name} {path}")
            out["paths"][path] = path_figures(rounds, flops, setup, dtypes, info)
    return out


def path_figures(
    rounds: list[dict], flops: dict, setup: FlopsSetup, dtypes: tuple[str, ...], info: dict
) -> dict:
    """One path's figures from its rounds: per ``"{dtype} b{size}"`` GFLOP per item, seconds per item,
    GFLOP/s and share of the round's peak; the batched speedup per dtype; bf16 / fp32 per size."""
    sizes, b = (1, setup.batch_size), setup.batch_size
    res: dict[str, Any] = {
        "contention": info,
        "round_peak_gflops": {d: summary([r[f"{d} peak"] for r in rounds], 1) for d in dtypes},
    }
    for dtype, size in [(d, n) for d in dtypes for n in sizes]:
        key, count = f"{dtype} b{size}", flops[(dtype, size)]
        res[key] = {
            "gflop_per_item": round(count / setup.items / 1e9, 3),
            "seconds_per_item": summary([r[key] / setup.items for r in rounds]),
            "gflops": summary([count / r[key] / 1e9 for r in rounds], 2),
            "share_of_peak": summary([count / r[key] / 1e9 / r[f"{dtype} peak"] for r in rounds]),
        }
    for dtype in dtypes:
        res[f"{dtype} speedup b{b}/b1"] = summary(
            pairwise_ratios([r[f"{dtype} b1"] for r in rounds], [r[f"{dtype} b{b}"] for r in rounds])
        )
    for size in sizes if set(DTYPES) <= set(dtypes) else ():
        res[f"bf16/fp32 time b{size}"] = summary(
            pairwise_ratios([r[f"bf16 b{size}"] for r in rounds], [r[f"fp32 b{size}"] for r in rounds])
        )
    return res
