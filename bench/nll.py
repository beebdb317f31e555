"""Held-out NLL with the connection against without it: ``cctuning eval --nll`` with ``--connection
transform`` and ``--connection none`` on the same records.

What is timed is :func:`cctuning.eval.nll.evaluate_nll`, the whole of ``eval --nll`` once the model
is loaded (encoding, batching, scoring, the bootstrap summary), on a CC-Tuning model with a random
Decision Maker and an identity-plus-noise Transform Matrix (the same cost as fitted ones). The
transform connection shares the prompt prefix with its scoring pass: one pass over ``[0, max p]``
fills a KV cache while it collects ``f_l[p]``, the cache is cut back to ``min p`` and only the fused
tail runs again. Two data sets: the bundled held-out mix (short prompts and responses: what
``eval --nll heldout.jsonl`` scores) and XQuAD/de as records (long prompts, answers of a few tokens:
where the connection's extra pass weighs most). In a round both connections run back to back, in an
order rotated from round to round; the ratio transform / none is taken per round. Target: ≤ 1.10.
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
from bench.flops import synchronize, torch_dtype, xquad_records

CONNECTIONS = ("none", "transform")
TARGET = 1.10  # connected NLL within this factor of plain NLL
DATASETS = ("heldout", "xquad-de")


@dataclass
class NllSetup:
    records: int  # records of each data set per call
    repeats: int
    batch_size: int = 8  # eval --nll's default
    datasets: tuple[str, ...] = DATASETS


def write_records(folder: Path, dataset: str, n: int) -> tuple[Path, int]:
    """``n`` records of ``dataset`` (XQuAD/de has 238) as a JSONL file in ``folder``, and their count."""
    rows = mix_records(n, split="heldout", seed=2) if dataset == "heldout" else xquad_records(n)
    path = folder / f"{dataset}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, len(rows)


def _one_dataset(
    model, tokenizer, data: Path, items: int, setup: NllSetup, contention: Contention, label: str, device: str
) -> dict[str, Any]:
    from cctuning.eval.nll import evaluate_nll  # deferred: imports torch

    def call(connection: str) -> float:
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        evaluate_nll(
            model,
            tokenizer,
            data,
            connection,
            batch_size=setup.batch_size,
            max_length=2048,
            progress=False,
            reps=1000,
        )
        return time.perf_counter() - start

    contention.settle()
    for connection in CONNECTIONS:  # warm-up
        call(connection)

    def one_round(_index: int, attempt: int) -> dict[str, float]:
        return {c: call(c) for c in rotated(list(CONNECTIONS), attempt)}

    rounds, info = clean_rounds(setup.repeats, one_round, contention, label)
    seconds = {c: [r[c] for r in rounds] for c in CONNECTIONS}
    ratio = summary(pairwise_ratios(seconds["transform"], seconds["none"]))
    return {
        "ratio": ratio,
        "target": TARGET,
        "holds": ratio["median"] <= TARGET,
        "seconds": {c: summary(s) for c, s in seconds.items()},
        "items": items,
        "items_per_s": {c: summary([items / x for x in s], 2) for c, s in seconds.items()},
        "contention": info,
    }


def bench_nll(
    loaded: Loaded, setup: NllSetup, contention: Contention, device: str = "cpu", dtype: str = "fp32"
) -> dict[str, Any]:
    """Per data set: seconds and items/s of each connection, and the ratio transform / none."""
    import logging  # deferred: only to quiet the short-answer warnings of XQuAD's few-token answers

    logging.getLogger("cctuning").setLevel(logging.ERROR)
    model = wrap(loaded, "cc", with_transform=True).eval().to(device=device, dtype=torch_dtype(dtype))
    out: dict[str, Any] = {
        "records": setup.records,
        "batch_size": setup.batch_size,
        "dtype": dtype,
        "datasets": {},
    }
    with tempfile.TemporaryDirectory(prefix="cctuning-bench-nll-") as tmp:
        for dataset in setup.datasets:
            data, items = write_records(Path(tmp), dataset, setup.records)
            label = f"nll {loaded.name} {dataset}"
            out["datasets"][dataset] = _one_dataset(
                model, loaded.tokenizer, data, items, setup, contention, label, device
            )
    return out
