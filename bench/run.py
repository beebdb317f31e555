"""``python -m bench.run``: every benchmark in one run on this machine; writes JSON and a Markdown table.

Sections: ``train`` (optimizer step, CC-Tuning / SFT), ``generate`` (connection / plain),
``matrix`` (Transform Matrix fit vs N), ``eval`` (items/s, batched / batch 1), ``memory`` (peak RSS
of a step, CC-Tuning / SFT), ``precision`` (bf16 / fp32 train step, held-out NLL of bf16 weights),
``flops`` (achieved FLOP/s of the evaluation and generation paths against the matmul peak, fp32 and
bf16, batch 1 and batched), ``startup`` (``cctuning --help``, ``--version`` and ``train --help``
against ``import torch``, fresh processes; no model), ``nll`` (``eval --nll`` with the transform connection
against none on the same records), ``train-flops`` (achieved FLOP/s and MFU of the SFT and CC-Tuning training
steps, float32 and bf16 autocast, and CC / SFT against its floor), ``serve`` (1, 4, 16 concurrent clients
against ``cctuning serve``, tokens/s and latency, over offline generation at the same batch size). Models: ``tiny`` and ``medium`` (random Llama models, always there)
and ``smollm2-135m`` (a real model, when its preset is installed; skipped with the reason if not).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    MODELS,
    SMOLLM2,
    Contention,
    Loaded,
    bf16_slow,
    clean_rounds,
    load_average,
    load_base,
    log,
    machine_info,
    pairwise_ratios,
    run_worker,
    set_threads,
    summary,
    unavailable,
)
from bench.compare import compare
from bench.evaluation import EvalSetup, bench_eval
from bench.flops import DTYPES, PEAK_SHAPES, FlopsSetup, bench_flops, matmul_peak
from bench.generation import GenerateSetup, bench_generate
from bench.matrix_fit import summarise_fits
from bench.nll import NllSetup, bench_nll
from bench.precision import PrecisionSetup, bench_precision
from bench.report import update_readme, write_markdown
from bench.serving import ServeSetup, bench_serve
from bench.startup import StartupSetup, bench_startup
from bench.train import VARIANTS, TrainSetup, bench_train_time
from bench.train_flops import bench_train_flops
from cctuning.config import split_list

SECTIONS = (
    "train",
    "generate",
    "matrix",
    "eval",
    "memory",
    "precision",
    "flops",
    "startup",
    "nll",
    "train-flops",
    "serve",
)
# sections that run on a loaded model, in the order they run
MODEL_SECTIONS = ("train", "train-flops", "generate", "nll", "eval", "precision", "flops", "serve")
BENCH_DIR = Path(__file__).resolve().parent
MEMORY_BATCH = {"tiny": (8, 256), "medium": (8, 256), SMOLLM2: (4, 256)}  # (batch, max_length)


def profile(quick: bool) -> dict[str, Any]:
    """Sizes and repeats of every section; ``quick`` trades repeats and sizes for a short run."""
    return quick_profile() if quick else full_profile()


def quick_profile() -> dict[str, Any]:
    """The sizes of ``--quick``: a few minutes."""
    return {
        "train": {
            "tiny": TrainSetup(8, 256, steps=4, repeats=3, warmup=1),
            "medium": TrainSetup(8, 256, steps=1, repeats=3, warmup=1),
            SMOLLM2: TrainSetup(4, 256, steps=1, repeats=3, warmup=1),
        },
        "generate": {
            "tiny": GenerateSetup(8, 1, 3),
            "medium": GenerateSetup(8, 1, 3),
            SMOLLM2: GenerateSetup(8, 1, 3),
        },
        "matrix": [("tiny", 100, 2), ("tiny", 1000, 2)],  # (model, N pairs, repeats)
        "eval": {"tiny": EvalSetup(16, repeats=2), SMOLLM2: EvalSetup(8, repeats=2)},
        "memory": {"tiny": 1, "medium": 1, SMOLLM2: 1},  # repeats (fresh processes per variant)
        "precision": {
            "tiny": PrecisionSetup(8, 256, steps=2, repeats=2, nll_records=8),
            SMOLLM2: PrecisionSetup(8, 256, steps=1, repeats=2, nll_records=8),
        },
        "flops": {"tiny": FlopsSetup(8, repeats=1), SMOLLM2: FlopsSetup(8, repeats=1)},
        "startup": StartupSetup(repeats=5),
        "train-flops": {
            "tiny": TrainSetup(8, 256, steps=2, repeats=2, warmup=1),
            "medium": TrainSetup(8, 256, steps=1, repeats=2, warmup=1),
            SMOLLM2: TrainSetup(4, 256, steps=1, repeats=2, warmup=1),
        },
        "nll": {
            "tiny": NllSetup(8, repeats=2),
            "medium": NllSetup(8, repeats=2),
            SMOLLM2: NllSetup(8, repeats=2),
        },
        "serve": {
            "tiny": ServeSetup(clients=(1, 4), requests=1, new_tokens=8, repeats=1),
            SMOLLM2: ServeSetup(clients=(1, 4), requests=1, new_tokens=8, repeats=1),
        },
    }


def full_profile() -> dict[str, Any]:
    """The sizes of the recorded run (``make bench``)."""
    return {
        "train": {
            "tiny": TrainSetup(8, 256, steps=8, repeats=7, warmup=2),
            "medium": TrainSetup(8, 256, steps=2, repeats=5, warmup=1),
            SMOLLM2: TrainSetup(4, 256, steps=1, repeats=5, warmup=1),
        },
        "generate": {
            "tiny": GenerateSetup(8, 2, 9),
            "medium": GenerateSetup(8, 3, 7),
            SMOLLM2: GenerateSetup(8, 2, 7),
        },
        "matrix": [("tiny", 100, 3), ("tiny", 1000, 3), ("tiny", 10000, 3), (SMOLLM2, 100, 2)],
        "eval": {"tiny": EvalSetup(32, repeats=3), SMOLLM2: EvalSetup(16, repeats=3)},
        "memory": {"tiny": 3, "medium": 3, SMOLLM2: 2},
        "precision": {
            "tiny": PrecisionSetup(8, 256, steps=4, repeats=5, nll_records=32),
            SMOLLM2: PrecisionSetup(8, 256, steps=1, repeats=3, nll_records=32),
        },
        "flops": {
            "tiny": FlopsSetup(16, repeats=3),
            SMOLLM2: FlopsSetup(8, repeats=3),
        },
        "startup": StartupSetup(repeats=15),
        # the train section's batches, so that its CC / SFT ratios and these FLOP/s describe the same steps
        "train-flops": {
            "tiny": TrainSetup(8, 256, steps=4, repeats=5, warmup=1),
            "medium": TrainSetup(8, 256, steps=1, repeats=5, warmup=1),
            SMOLLM2: TrainSetup(4, 256, steps=1, repeats=5, warmup=1),
        },
        "nll": {
            "tiny": NllSetup(32, repeats=5),
            "medium": NllSetup(32, repeats=5),
            SMOLLM2: NllSetup(16, repeats=5),
        },
        "serve": {"tiny": ServeSetup(), SMOLLM2: ServeSetup()},
    }


class Bench:
    """One benchmark run: the plan, the contention policy and the results being filled in."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.plan = profile(args.quick)
        self.contention = Contention(args.contention_threshold, args.max_wait)
        self.results = empty_results(args)

    def guarded(self, key: str, name: str, fn: Callable[..., Any], *fn_args: Any) -> Any:
        """Run ``fn(*fn_args)``; a failure is recorded (and printed) instead of ending the whole run."""
        try:
            return fn(*fn_args)
        except Exception as err:  # a benchmark failure must not lose the other figures
            traceback.print_exc()
            self.results.setdefault("errors", []).append(f"{key}/{name}: {type(err).__name__}: {err}")
            return {"error": f"{type(err).__name__}: {err}"}

    # -- sections ------------------------------------------------------------------------------
    def train(self, loaded: Loaded) -> None:
        res = bench_train_time(loaded, self.plan["train"][loaded.name], self.contention)
        r, name = self.results, loaded.name
        r["train_step_ratio"][name], r["train_step_floor"][name] = res["ratio"], res["floor"]
        r["train_step_ratio_english_grad"][name] = res["ratio_english_grad"]
        r["train_step_floor_english_grad"][name] = res["floor_english_grad"]
        r["train_step"][name] = res

    def generate(self, loaded: Loaded) -> None:
        res = bench_generate(loaded, self.plan["generate"][loaded.name], self.contention)
        for b in ("b1", "b8"):
            self.results[f"generate_ratio_{b}"][loaded.name] = res[b]["ratio"]
            self.results[f"naive_generate_ratio_{b}"][loaded.name] = res[b]["naive_ratio"]
        self.results["generate"][loaded.name] = res

    def eval(self, loaded: Loaded) -> None:
        res = bench_eval(loaded, self.plan["eval"][loaded.name], self.contention)
        self.results["eval_items_per_s"][loaded.name] = res

    def serve(self, loaded: Loaded) -> None:
        res = bench_serve(loaded, self.plan["serve"][loaded.name], self.contention)
        self.results["serve"][loaded.name] = res

    def precision(self, loaded: Loaded) -> None:
        if self.without_bf16(loaded):
            self.results["precision"][loaded.name] = {"skipped": self.results["bf16_skipped"]}
            return
        res = bench_precision(loaded, self.plan["precision"][loaded.name], self.contention)
        self.results["precision"][loaded.name] = res

    def without_bf16(self, loaded: Loaded) -> bool:
        """Leave bf16 out for this model: this CPU has no bf16 units (``--bf16 auto``) and the model is
        large enough for that to cost minutes to hours (over 1 M parameters), or ``--bf16 off``."""
        if self.args.bf16 == "on":
            return False
        if self.args.bf16 == "off":
            self.results["bf16_skipped"] = "--bf16 off"
            return True
        reason = bf16_slow(self.peaks())
        if reason:
            self.results["bf16_skipped"] = reason
        return bool(reason) and sum(p.numel() for p in loaded.base.parameters()) > 1e6

    def peaks(self) -> dict:
        """This machine's matmul peak (GFLOP/s) in fp32 and bf16, measured once per run."""
        if not self.results["matmul_peak_gflops"]:
            self.contention.settle()
            self.results["matmul_peak_gflops"] = {name: matmul_peak(name) for name in DTYPES}
            log(f"  matmul peak: {self.results['matmul_peak_gflops']}")
        return self.results["matmul_peak_gflops"]

    def train_flops(self, loaded: Loaded) -> None:
        precisions = ("fp32",) if self.without_bf16(loaded) else ("fp32", "autocast")
        setup = self.plan["train-flops"][loaded.name]
        res = bench_train_flops(loaded, setup, self.contention, self.peaks(), precisions=precisions)
        if len(precisions) == 1:
            res["bf16_skipped"] = self.results["bf16_skipped"]
        self.results["train_flops"][loaded.name] = res

    def nll(self, loaded: Loaded) -> None:
        self.results["nll"][loaded.name] = bench_nll(loaded, self.plan["nll"][loaded.name], self.contention)

    def flops(self, loaded: Loaded) -> None:
        setup = self.plan["flops"][loaded.name]
        if self.without_bf16(loaded):
            setup = dataclasses.replace(setup, dtypes=("fp32",))
        elif self.args.bf16 == "auto" and bf16_slow(self.peaks()):
            # a small model on a CPU without bf16 units: its rounds' bf16 peak on one small product (the
            # usual shapes take about 25 s a round there)
            setup = dataclasses.replace(setup, round_peak_shapes=PEAK_SHAPES[1:2])
        res = bench_flops(loaded, setup, self.contention, peaks=self.peaks())
        self.results["flops"][loaded.name] = res

    def memory(self, name: str) -> None:
        """Peak RSS of each variant's step, each in a fresh process (memory does not suffer from contention)."""
        batch, length = MEMORY_BATCH[name]
        repeats = self.plan["memory"][name]
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for repeat in range(repeats):
            for variant in VARIANTS:
                args = {
                    "model": name,
                    "variant": variant,
                    "batch_size": batch,
                    "max_length": length,
                    "threads": self.args.threads,
                }
                runs[variant].append(run_worker("train_memory", args, fixed_mmap_threshold=True))
            log(
                f"  memory {name} {repeat + 1}/{repeats}: "
                + ", ".join(
                    f"{v} peak {runs[v][-1]['peak_mb']:.0f} MB (step {runs[v][-1]['step_mb']:.0f})"
                    for v in VARIANTS
                )
            )
        keys = ("peak_mb", "step_mb", "before_mb")
        mb = {v: {k: summary([r[k] for r in rs], 1) for k in keys} for v, rs in runs.items()}

        def ratio(variant: str, key: str) -> dict:
            return summary(pairwise_ratios([r[key] for r in runs[variant]], [r[key] for r in runs["sft"]]))

        self.results["peak_memory_ratio"][name] = {
            "peak": ratio("cc", "peak_mb"),
            "step": ratio("cc", "step_mb"),
        }
        self.results["peak_memory_ratio_english_grad"][name] = {
            "peak": ratio("cc_english_grad", "peak_mb"),
            "step": ratio("cc_english_grad", "step_mb"),
        }
        self.results["peak_memory_mb"][name] = {"batch_size": batch, "max_length": length, **mb}

    def matrix(self) -> None:
        """Transform Matrix fits, each in a fresh process; models that are not available are skipped."""
        for model, n, repeats in self.plan["matrix"]:
            if model not in self.args.models or unavailable(model):
                continue
            args = {"model": model, "n": n, "batch_size": 16, "threads": self.args.threads}
            runs, info = clean_rounds(
                repeats,
                lambda _index, _attempt, a=args: run_worker("matrix_fit", a),
                self.contention,
                f"matrix {model} N={n}",
                lambda r: f"{r['seconds']:.2f} s, peak RSS {r['peak_mb']:.0f} MB (+{r['delta_mb']:.0f})",
            )
            self.results["matrix_fit"].append({**summarise_fits(model, n, runs), "contention": info})

    def startup(self) -> dict:
        """``cctuning --help``, ``--version`` and ``train --help`` against ``import torch``, fresh processes."""
        return bench_startup(self.plan["startup"], self.contention)

    # -- the whole run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        set_threads(self.args.threads)
        started = time.perf_counter()
        sections = self.args.sections
        for name in self.args.models:
            reason = unavailable(name)
            if reason:
                log(f"{name}: skipped ({reason})")
                self.results["skipped"][name] = f"skipped: {reason}"
                continue
            wanted = [s for s in MODEL_SECTIONS if s in sections and name in self.plan[s]]
            if wanted:
                loaded = load_base(name)
                self.results["models"][name] = loaded.description
                for section in wanted:
                    log(f"{section}: {name}")
                    self.guarded(section, name, getattr(self, section.replace("-", "_")), loaded)
                del loaded
            if "memory" in sections:
                log(f"memory: {name}")
                self.guarded("memory", name, self.memory, name)
        if "matrix" in sections:
            log("matrix")
            self.guarded("matrix", "all", self.matrix)
        if "startup" in sections:
            log("startup")
            self.results["startup"] = self.guarded("startup", "all", self.startup)
        self.results["load_average"]["end"] = load_average()
        self.results["seconds"] = round(time.perf_counter() - started, 1)
        return self.results


def empty_results(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("train_step_ratio", "train_step_floor", "train_step_ratio_english_grad",
            "train_step_floor_english_grad", "train_step", "generate_ratio_b1", "generate_ratio_b8",
            "naive_generate_ratio_b1", "naive_generate_ratio_b8", "generate", "eval_items_per_s",
            "peak_memory_ratio", "peak_memory_ratio_english_grad", "peak_memory_mb", "precision", "flops",
            "matmul_peak_gflops", "train_flops", "nll", "serve")  # fmt: skip
    results: dict[str, Any] = {k: {} for k in keys}
    results.update({
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "quick": args.quick,
        "sections": args.sections,
        "contention_policy": {"threshold_cores": args.contention_threshold, "max_wait_s": args.max_wait},
        "models": {},
        "skipped": {},
        "matrix_fit": [],
        "load_average": {"start": load_average()},
    })  # fmt: skip
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and smaller sizes (a few minutes)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads everywhere (default: the usable CPU cores)",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default bench/results/latest.json, or quick.json with --quick)",
    )
    parser.add_argument(
        "--contention-threshold",
        type=float,
        default=None,
        help="redo a round when other processes used more than this many cores during it (default: "
        "0.25, plus the cores that --threads leaves free)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="seconds of waiting for a quiet machine allowed per measurement series; after that a series "
        "stops early (at least 3 clean rounds) or keeps disturbed rounds (counted in the results)",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the table in bench/README.md"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="an earlier results file: list each of its ratios against this run's (default: the --out file "
        "this run replaces, read before it is replaced)",
    )
    parser.add_argument("--no-compare", action="store_true", help="no comparison with an earlier run")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="the bf16 variants (precision, flops, train-flops): auto leaves them out for the models over 1 M "
        "parameters where this CPU's bf16 matmul peak is under a quarter of its fp32 peak (no bf16 units: a "
        "SmolLM2 bf16 step then takes many minutes)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.models = split_list(args.models)
    args.sections = split_list(args.sections)
    for value, known, what in ((args.models, MODELS, "model"), (args.sections, SECTIONS, "section")):
        bad = [v for v in value if v not in known]
        if bad:
            parser.error(f"unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
    if args.contention_threshold is None:
        args.contention_threshold = 0.25 + max(0, len(os.sched_getaffinity(0)) - args.threads)
    if args.out is None:
        args.out = BENCH_DIR / "results" / ("quick.json" if args.quick else "latest.json")
    if args.compare is None and not args.no_compare and args.out.is_file():
        args.compare = args.out
    if args.no_compare:
        args.compare = None
    elif args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare {args.compare}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    log(
        f"threads {args.threads}; models {', '.join(args.models)}; sections {', '.join(args.sections)}"
        + ("; quick" if args.quick else "")
    )
    earlier = json.loads(args.compare.read_text(encoding="utf-8")) if args.compare else None
    results = Bench(args).run()
    if earlier is not None:
        results["compared_with"] = {"file": str(args.compare), **compare(earlier, results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown = write_markdown(results, args.out.with_suffix(".md"))
    if not args.quick and not args.no_readme:
        update_readme(BENCH_DIR / "README.md", markdown)
    print(markdown)
    log(f"wrote {args.out} in {results['seconds']:.0f} s")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
