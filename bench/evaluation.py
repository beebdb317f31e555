"""Evaluation throughput: items per second of ``cctuning eval`` with batching against batch 1.

Batch 1 is the official evaluation script's way (one prompt at a time). What is timed is
:func:`cctuning.eval.runner.evaluate` on a CC-Tuning model with the transform connection: the
whole run (prompt rendering, generation or likelihood scoring, the JSONL cache written with
fsync, scoring and the results files), into a fresh output folder each time so that nothing is
reused from a cache. Generation keeps the real stop tokens (an eval batch runs until its longest
answer ends), 40 new tokens at most.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.common import Contention, Loaded, clean_rounds, pairwise_ratios, rotated, summary, wrap

BENCHMARK, LANG = "XNLI", "sw"
SCORINGS = ("generate", "likelihood")


@dataclass
class EvalSetup:
    items: int
    repeats: int
    batch_size: int = 8


def run_eval(model, tokenizer, scoring: str, batch_size: int, items: int) -> float:
    from cctuning.eval.runner import EvalConfig, evaluate

    with tempfile.TemporaryDirectory(prefix="cctuning-bench-eval-") as out:
        cfg = EvalConfig(
            model="bench",
            benchmarks=[BENCHMARK],
            langs=[LANG],
            limit=items,
            scoring=scoring,
            batch_size=batch_size,
            output=out,
            connection="transform",
            max_new_tokens=40,
        )
        gc.collect()
        start = time.perf_counter()
        evaluate(cfg, model=model, tokenizer=tokenizer, progress=False)
        return time.perf_counter() - start


def bench_eval(loaded: Loaded, setup: EvalSetup, contention: Contention) -> dict[str, Any]:
    import logging

    logging.getLogger("cctuning").setLevel(logging.WARNING)
    model = wrap(loaded, "cc", with_transform=True).eval()
    out: dict[str, Any] = {
        "benchmark": f"{BENCHMARK}/{LANG}",
        "items": setup.items,
        "batch_size": setup.batch_size,
    }
    for scoring in SCORINGS:
        sizes = (1, setup.batch_size)
        contention.settle()
        for size in sizes:  # warm-up
            run_eval(model, loaded.tokenizer, scoring, size, min(setup.items, setup.batch_size))

        def one_round(
            _index: int, attempt: int, scoring: str = scoring, sizes: tuple[int, int] = sizes
        ) -> dict[str, float]:
            return {
                f"b{size}": setup.items / run_eval(model, loaded.tokenizer, scoring, size, setup.items)
                for size in rotated(sizes, attempt)
            }

        rounds, info = clean_rounds(setup.repeats, one_round, contention, f"eval {loaded.name} {scoring}")
        rates = {size: [r[f"b{size}"] for r in rounds] for size in sizes}
        out[scoring] = {
            "b1": summary(rates[1]),
            f"b{setup.batch_size}": summary(rates[setup.batch_size]),
            "speedup": summary(pairwise_ratios(rates[setup.batch_size], rates[1])),
            "contention": info,
        }
    return out
