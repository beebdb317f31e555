"""Transform Matrix fitting: time and peak memory of ``fit_transform_matrix`` for N prompts.

Each measurement runs in a fresh process: the model is built and the N records loaded first, then
the RSS high-water mark is reset and ``fit_transform_matrix`` (what ``cctuning fit-matrix`` runs)
is timed. Its time is split into the forward passes that collect activations (with tokenisation),
the accumulation of the normal equations and the solve, by timing ``NormalEquations.add`` and
``NormalEquations.solve`` from the outside.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import load_base, peak_rss_mb, reset_peak_rss, rss_mb, set_threads, summary, wrap


@contextmanager
def timed_methods(cls: type, names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """Accumulate the wall time spent in ``cls.<name>`` for each name while the block runs."""
    totals = dict.fromkeys(names, 0.0)
    originals = {name: getattr(cls, name) for name in names}

    def timer(name: str, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return call

    for name, method in originals.items():
        setattr(cls, name, timer(name, method))
    try:
        yield totals
    finally:
        for name, method in originals.items():
            setattr(cls, name, method)


def fit_worker(args: dict) -> dict:
    """Fit on ``n`` prompts in this (fresh) process; returns seconds and RSS figures."""
    from bench.common import mix_records
    from cctuning.data import Record
    from cctuning.inference import NormalEquations, fit_transform_matrix

    set_threads(args["threads"])
    loaded = load_base(args["model"], args.get("seed", 0))
    model = wrap(loaded, "cc", copy_base=False).eval()
    records = [
        Record(instruction=r["instruction"], output=r["output"], instruction_en=r["instruction_en"])
        for r in mix_records(args["n"], split="all", seed=args.get("seed", 0))
    ]
    # warm-up on a few pairs (kernels, tokenizer caches), outside the measurement
    fit_transform_matrix(model, loaded.tokenizer, records[:32], samples=32, batch_size=args["batch_size"])
    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    with timed_methods(NormalEquations, ("add", "solve")) as spent:
        start = time.perf_counter()
        _, report = fit_transform_matrix(
            model, loaded.tokenizer, records, samples=args["n"], batch_size=args["batch_size"], seed=0
        )
        seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "seconds": seconds,
        "collect_seconds": seconds - spent["add"] - spent["solve"],
        "accumulate_seconds": spent["add"],
        "solve_seconds": spent["solve"],
        "peak_mb": peak,
        "delta_mb": peak - before,
        "before_mb": before,
        "fit_pairs": report.fit_pairs,
        "heldout_pairs": report.heldout_pairs,
        "layers": report.num_layers,
        "hidden_size": report.hidden_size,
    }


def summarise_fits(model: str, n: int, runs: list[dict]) -> dict[str, Any]:
    """One ``matrix_fit`` entry: every figure as median/min/max over the runs."""
    keys = ("seconds", "collect_seconds", "accumulate_seconds", "solve_seconds", "peak_mb", "delta_mb")
    entry: dict[str, Any] = {"model": model, "n": n}
    for key in keys:
        entry[key] = summary([r[key] for r in runs], 1 if key.endswith("_mb") else 4)
    entry["seconds_per_1000_pairs"] = round(entry["seconds"]["median"] / n * 1000, 4)
    entry.update({k: runs[0][k] for k in ("fit_pairs", "heldout_pairs", "layers", "hidden_size")})
    return entry
