"""Generation: latency of the simulated connection (fast path and the official naive two-prefill
path) next to plain generation of the same model on the same prompts.

What is timed is :meth:`CCGenerator.generate`, the whole work of ``cctuning generate`` after the
model is loaded: tokenisation, the prefill up to the connection point (or, on the naive path, the
official code's separate full pass), Decision Maker, Transform Matrix, then transformers'
``generate`` continuing from that cache for 40 greedy tokens, and detokenisation. Stop tokens are switched off so that every mode produces exactly 40 new
tokens per prompt (with a random or untrained Decision Maker the modes would otherwise stop at
different points and the comparison would measure output length, not the connection).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
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
from bench.flops import torch_dtype

MODES: dict[str, dict] = {
    "none": {"connection": "none"},
    "transform": {"connection": "transform"},
    "naive": {"connection": "transform", "naive": True},
}
NEW_TOKENS = 40


TARGET = 1.10  # the connection's generation latency within this factor of plain generation


@dataclass
class GenerateSetup:
    prompts: int  # distinct prompts (8 → one batch of 8)
    b1_passes: int  # batch 1: each prompt is one round; this many passes over the prompts
    batched_repeats: int  # batched: each round generates every batch of the prompts
    seed: int = 0
    batch_size: int = 8  # the batched size
    b1_prompts: int | None = None  # batch 1 over the first this many prompts only (None: all)


MIN_MODE_SECONDS = 0.25  # a mode is repeated within a round until it takes at least this long


def _time_modes(gen, rounds: list[list[str]], inner: int, contention: Contention, label: str):
    """Seconds per generate call of each mode per round (the modes of a round run back to back on the
    same prompts, ``inner`` times each, in a rotating order); disturbed rounds are run again."""

    def one_round(index: int, attempt: int) -> dict[str, float]:
        prompts = rounds[index]
        times = {}
        for mode in rotated(list(MODES), attempt):
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                results = gen.generate(prompts, **MODES[mode])
            times[mode] = (time.perf_counter() - start) / inner
            if any(len(r.token_ids) != NEW_TOKENS for r in results):
                raise RuntimeError(f"{mode}: expected {NEW_TOKENS} new tokens per prompt")
        return times

    kept, info = clean_rounds(len(rounds), one_round, contention, label)
    return {m: [r[m] for r in kept] for m in MODES}, info


def bench_generate(
    loaded: Loaded, setup: GenerateSetup, contention: Contention, device: str = "cpu", dtype: str = "fp32"
) -> dict[str, Any]:
    from cctuning.inference import CCGenerator

    model = wrap(loaded, "cc", with_transform=True).eval().to(device=device, dtype=torch_dtype(dtype))
    prompts = [r["instruction"] for r in mix_records(setup.prompts, seed=setup.seed + 1)]
    b = setup.batch_size
    plans = {1: [[p] for p in prompts[: setup.b1_prompts]] * setup.b1_passes,
             b: [prompts[i : i + b] for i in range(0, len(prompts), b)] * setup.batched_repeats}  # fmt: skip
    out: dict[str, Any] = {}
    for batch_size, rounds in plans.items():
        gen = CCGenerator(model, loaded.tokenizer, max_new_tokens=NEW_TOKENS, batch_size=batch_size)
        gen.stop_ids = set()  # exactly NEW_TOKENS tokens in every mode
        contention.settle()
        for kwargs in MODES.values():  # warm-up
            gen.generate(rounds[0], **kwargs)
        start = time.perf_counter()
        gen.generate(rounds[0], "none")
        inner = max(1, math.ceil(MIN_MODE_SECONDS / (time.perf_counter() - start)))
        label = f"generate {loaded.name} b{batch_size}"
        seconds, info = _time_modes(gen, rounds, inner, contention, label)
        prompt_tokens = [len(gen.encoder.encode_prompt(p).ids) for p in prompts]
        ratio = summary(pairwise_ratios(seconds["transform"], seconds["none"]))
        out[f"b{batch_size}"] = {
            "ratio": ratio,
            "target": TARGET,
            "holds": ratio["median"] <= TARGET,
            "naive_ratio": summary(pairwise_ratios(seconds["naive"], seconds["none"])),
            "seconds": {m: summary(s) for m, s in seconds.items()},
            "rounds": len(seconds["none"]),
            "calls_per_mode_and_round": inner,
            "prompts_per_round": len(rounds[0]),
            "mean_prompt_tokens": round(statistics.mean(prompt_tokens), 1),
            "new_tokens": NEW_TOKENS,
            "contention": info,
        }
    return out
