"""Throughput on a GPU (issue 29): ``scripts/gpu_perf.sh``, one call on an offline CUDA machine.

1. ``perf``: on SmolLM2-135M in bf16 (training under bf16 autocast with float32 master weights, as
   ``--bf16`` trains; inference with the weights in bfloat16):

   * the device's ``torch.mm`` peak in fp32 and bf16 (4096³ and 8192³);
   * the training batch that fills the device: batch sizes doubled from 16 at 256 tokens while a
     step fits and tokens/s still grows by 5 % or more; then SFT and CC-Tuning optimizer steps
     (:mod:`bench.train_flops`) at that batch: tokens/s, achieved FLOP/s, MFU from the analytic FLOP
     count (and from the counted one) against the bf16 peak, CC / SFT against its floor
     ``1 + E / (3 T)`` (target: within 1.15×);
   * generation with the transform connection against plain, batch 1 and batch 32 (:mod:`bench.generation`);
   * ``eval --nll`` with the transform connection against none, items/s (:mod:`bench.nll`).

2. ``check``: ``scripts/gpu_check.py`` in full (the CUDA tests, the bf16 training steps of the tiny
   Llama and SmolLM2, the precision and flops benchmarks on the device), in a subprocess limited to
   the budget that is left; its ``gpu_check.json`` and ``.md`` are written after every step.

SmolLM2-135M: the converted preset when it resolves on the machine; otherwise a folder with its
config and tokenizer (``.gpu/smollm2-135m-shape``, made by ``scripts/gpu_perf.sh --prepare``: the
weights, 93 MB as GGUF, do not fit one call's 64 MiB) and random weights made there. Throughput, FLOPs
and memory depend on the shapes only, so every figure above is the real model's; ``smollm2.weights``
in the results says which was used. Everything lands in ``--out`` (``$OUT`` on the device):
``cuda.json``, ``cuda.md``, ``gpu_check.json``, ``gpu_check.md``, ``cuda_tests.xml``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's cctuning and bench, without `pip install -e .`

SHAPE = ROOT / ".gpu" / "smollm2-135m-shape"  # config and tokenizer files, from --prepare
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")  # fmt: skip
PARTS = ("perf", "check")
MARGIN_S = 20  # left at the end of the budget for writing the results


def log(message: str) -> None:
    print(f"[gpu-perf {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_perf.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_perf"),
                        help="folder for the results (default $OUT, else runs/gpu_perf)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the plumbing on the tiny model, in seconds (not a GPU result)")  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or tiny")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from perf, check")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (0: the search)")
    parser.add_argument("--max-length", type=int, default=256, help="training tokens per row at most")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        parser.error(f"unknown part {', '.join(bad)} (known: {', '.join(PARTS)})")
    if args.model not in ("smollm2-135m", "tiny"):
        parser.error(f"unknown model {args.model} (known: smollm2-135m, tiny)")
    if args.budget <= MARGIN_S:
        parser.error(f"--budget must be over {MARGIN_S} s")
    return args


class Clock:
    """The budget: seconds left before the results must be written."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget - MARGIN_S

    def left(self) -> float:
        return self.end - time.monotonic()


def sizes(device: str) -> dict:
    """Repeats and sizes: the GPU's, or the smallest that run every path (the CPU plumbing check)."""
    if device == "cpu":
        return {"batches": (2,), "steps": 1, "repeats": 1, "prompts": 2, "b1_prompts": 1, "batched": 2, "rounds": 1,
                "nll_records": 4, "nll_batch": 2, "peak_shapes": ((128, 128, 128),), "precision": "fp32",
                "dtype": "fp32"}  # fmt: skip
    return {"batches": (16, 32, 64, 128, 256), "steps": 3, "repeats": 5, "prompts": 32, "b1_prompts": 8, "rounds": 3,
            "batched": 32, "nll_records": 256, "nll_batch": 32, "peak_shapes": ((4096,) * 3, (8192,) * 3),
            "precision": "autocast", "dtype": "bf16"}  # fmt: skip


# -- the model ------------------------------------------------------------------------------------
def smollm2(work: Path) -> tuple[str | None, str]:
    """SmolLM2-135M's folder and what its weights are: the preset, else its shape with random weights."""
    from cctuning.errors import (
        CCError,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from cctuning.presets import (
        resolve_model,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    try:
        return resolve_model("smollm2-135m"), "the converted preset (real weights)"
    except CCError as err:
        why = str(err)
    if not (SHAPE / "config.json").is_file():
        return None, f"{why}; and no {SHAPE} (scripts/gpu_perf.sh --prepare makes it)"
    return shape_folder(SHAPE, work / "smollm2-135m-shape"), (
        "random weights in SmolLM2-135M's shape (its config and tokenizer; the preset's weights did not "
        "travel): the same FLOPs, time and memory as the real model"
    )


def shape_folder(src: Path, dst: Path) -> str:
    """A model folder of ``src``'s config with random weights (seeded) and ``src``'s tokenizer."""

    import torch  # deferred: torch, and what imports it, loads after the arguments parse
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    if not (dst / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(src)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dst)
        for name in SHAPE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
    return str(dst)


# -- perf -----------------------------------------------------------------------------------------
def find_batch(loaded, args, device: str, clock: Clock, precision: str) -> tuple[int, list[dict]]:
    """The largest batch (of ``sizes()['batches']``) that fits and still gains 5 % tokens/s."""
    import torch  # deferred: torch, and what imports it, loads after the arguments parse

    from bench.train import (
        encode_batches,
        sft_batch,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from bench.train_flops import (
        PrecisionRunner,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    if args.batch_size:
        return args.batch_size, []
    runner = PrecisionRunner(loaded, 1e-5, device)
    tried, best = [], None
    for size in sizes(device)["batches"]:
        if clock.left() < 0.75 * args.budget:
            break
        batch = {
            k: v.to(device)
            for k, v in encode_batches(loaded.tokenizer, 1, size, args.max_length, 0)[0].items()
        }
        try:
            for _ in range(2):
                runner.step(f"cc {precision}", batch)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runner.step(f"sft {precision}", batch)
            if device == "cuda":
                torch.cuda.synchronize()
            rate = sft_batch(batch)["input_ids"].numel() / (time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch_size": size, "tokens_per_s": None, "note": "out of memory"})
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        tried.append({"batch_size": size, "tokens_per_s": round(rate, 1)})
        if best is not None and rate < 1.05 * best[1]:
            break
        best = (size, rate) if best is None or rate > best[1] else best
    del runner
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return (best[0] if best else sizes(device)["batches"][0]), tried


def perf(loaded, args, device: str, clock: Clock, results: dict) -> None:
    """The peaks, the training steps, generation and eval --nll, each into ``results`` while the
    budget lasts (a part that no longer fits is recorded as skipped)."""
    from bench.common import (
        Contention,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from bench.flops import (
        DTYPES,
        matmul_peak,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from bench.generation import (
        GenerateSetup,
        bench_generate,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from bench.nll import (
        NllSetup,
        bench_nll,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    size = sizes(device)
    never_wait = Contention(threshold=float("inf"), max_wait_s=0.0)  # nothing else shares the device
    brief = {"min_seconds": 0.05, "repeats": 2} if device == "cpu" else {}
    peaks = {d: matmul_peak(d, device, shapes=size["peak_shapes"], **brief) for d in DTYPES}
    results["matmul_peak_gflops"] = peaks
    log(f"peaks {peaks}")
    results["train"] = train(loaded, args, device, clock, peaks, never_wait)
    log(f"train: {summary_line(results)}")
    gen = GenerateSetup(
        size["prompts"], 1, size["rounds"], batch_size=size["batched"], b1_prompts=size["b1_prompts"]
    )
    nll = NllSetup(size["nll_records"], repeats=size["rounds"], batch_size=size["nll_batch"])
    for key, fn, setup, need in (("generate", bench_generate, gen, 60), ("nll", bench_nll, nll, 45)):
        if device == "cuda" and clock.left() < need:
            results[key] = {"skipped": f"budget: {clock.left():.0f} s left"}
            continue
        results[key] = fn(loaded, setup, never_wait, device, dtype=size["dtype"])
        log(f"{key}: done, {clock.left():.0f} s left")


def train(loaded, args, device: str, clock: Clock, peaks: dict, never_wait) -> dict:
    """SFT and CC-Tuning steps at the batch that fills the device, with their analytic MFU."""
    from bench.train import (
        TrainSetup,
    )  # deferred: torch, and what imports it, loads after the arguments parse
    from bench.train_flops import (
        PEAK_DTYPE,
        bench_train_flops,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    size = sizes(device)
    precision = size["precision"]
    batch, tried = find_batch(loaded, args, device, clock, precision)
    setup = TrainSetup(batch, args.max_length, steps=size["steps"], repeats=size["repeats"], warmup=1)
    res = bench_train_flops(loaded, setup, never_wait, peaks, device, precisions=(precision,))
    peak = peaks[PEAK_DTYPE[precision]]["peak"] * 1e9
    res["batch_search"] = tried
    res["precision"] = precision
    res["mfu_analytic"] = {
        v: round(res["flops_per_step"][v.split()[0]]["analytic"] / s["median"] / peak, 4)
        for v, s in res["seconds_per_step"].items()
    }
    return res


def summary_line(results: dict) -> str:
    t = results.get("train", {})
    if "ratio" not in t:
        return "no training figures"
    p = t["precision"]
    return (
        f"batch {t['setup']['batch_size']} × {t['setup']['max_length']}, {p}: tokens/s SFT "
        f"{t['tokens_per_s'][f'sft {p}']['median']:.0f}, CC {t['tokens_per_s'][f'cc {p}']['median']:.0f}; MFU "
        f"(analytic) SFT {100 * t['mfu_analytic'][f'sft {p}']:.1f}%, CC {100 * t['mfu_analytic'][f'cc {p}']:.1f}%; "
        f"CC / SFT {t['ratio'][p]['median']:.3f} = {t['ratio_over_floor'][p]['median']:.3f}× floor {t['floor']:.3f} "
        f"({'holds' if t['holds'][p] else 'does not hold'}: ≤ {t['floor_target']}× floor)"
    )


# -- check ----------------------------------------------------------------------------------------
def check(args, folder: str | None, clock: Clock, results: dict) -> None:
    """``scripts/gpu_check.py`` in full, in a subprocess that must end within the budget left."""
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(args.out),
           "--timeout", str(max(60, int(clock.left())))]  # fmt: skip
    if folder:
        cmd += ["--smollm2", folder]
    if args.device == "cpu":
        cmd += ["--cpu", "--quick", "--models", "tiny"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    # its own process group, so that a stop at the budget also ends the pytest and train it started
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, clock.left()))
    except subprocess.TimeoutExpired:
        log("gpu_check: stopped at the end of the budget (its finished steps are kept)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = 124
    report = args.out / "gpu_check.json"
    saved = json.loads(report.read_text()) if report.is_file() else {}
    results["gpu_check"] = {
        "exit": code,
        "seconds": round(time.perf_counter() - start, 1),
        "stopped_at_budget": code == 124,
        "steps": [{k: s.get(k) for k in ("name", "status", "seconds", "detail")} for s in saved.get("steps", [])],
        "file": "gpu_check.json",
    }  # fmt: skip


# -- the run --------------------------------------------------------------------------------------
def machine(device: str) -> dict:

    import torch  # deferred: torch, and what imports it, loads after the arguments parse

    info = {"device": device, "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    for name in ("torch", "transformers", "accelerate", "peft", "tokenizers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())  # fmt: skip
    return info


def table(results: dict) -> str:
    """A short Markdown summary of ``cuda.json``."""
    m, lines = results["machine"], []
    where = (
        f"{m.get('device_name')} ({m.get('memory_gb')} GB, CUDA {m.get('cuda')})"
        if m["device"] == "cuda"
        else "CPU (plumbing check, not a GPU result)"
    )
    lines.append(f"gpu_perf {results['date']} on {where}; torch {m.get('torch')}, transformers {m.get('transformers')}; "
                 f"model {results['model']}: {results.get('weights')}; {results.get('seconds')} s")  # fmt: skip
    peaks = results.get("matmul_peak_gflops")
    if peaks:
        lines.append(
            "Matmul peak, TFLOP/s: " + "; ".join(f"{k} {v['peak'] / 1000:.3g}" for k, v in peaks.items())
        )
    t = results.get("train", {})
    if "ratio" in t:
        lines += ["", "Training: " + summary_line(results), "", "| step | s/step | tokens/s | TFLOP/s | MFU, analytic (counted) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for v, sec in t["seconds_per_step"].items():
            lines.append(f"| {v} | {sec['median']:.4f} | {t['tokens_per_s'][v]['median']:.0f} | "
                         f"{t['gflops'][v]['median'] / 1000:.3g} | {100 * t['mfu_analytic'][v]:.1f}% "
                         f"({100 * t['mfu'][v]['median']:.1f}%) |")  # fmt: skip
    for b, r in results.get("generate", {}).items():
        if not isinstance(r, dict):
            lines.append(f"Generation: {r}")
            continue
        lines.append(f"Generation {b}, transform / none: {r['ratio']['median']:.3f} "
                     f"({'holds' if r['holds'] else 'does not hold'} ≤ {r['target']}); naive / none {r['naive_ratio']['median']:.3f}")  # fmt: skip
    for name, r in (results.get("nll") or {}).get("datasets", {}).items():
        ips = r["items_per_s"]
        lines.append(f"eval --nll {name}: transform {ips['transform']['median']:.1f} items/s, none "
                     f"{ips['none']['median']:.1f}; ratio {r['ratio']['median']:.3f} ({'holds' if r['holds'] else 'does not hold'} ≤ {r['target']})")  # fmt: skip
    for s in results.get("gpu_check", {}).get("steps", []):
        lines.append(f"gpu_check: {s['name']}: {s['status']} ({s['seconds']} s) {s.get('detail') or ''}")
    lines += [f"error: {e}" for e in results.get("errors", [])]
    return "\n".join(lines) + "\n"


def write(args, results: dict) -> None:
    (args.out / "cuda.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (args.out / "cuda.md").write_text(table(results), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock, started = Clock(args.budget), time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch  # deferred: torch, and what imports it, loads after the arguments parse

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_perf: no CUDA device here; run it on a GPU machine, or with --device cpu --model tiny to "
              "check the plumbing", file=sys.stderr)  # fmt: skip
        return 2
    from bench.common import (
        load_base,
        set_threads,
    )  # deferred: torch, and what imports it, loads after the arguments parse

    if args.device == "cpu":
        set_threads(1)  # the plumbing only: one thread is not slowed by other processes' load
    results: dict = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine(args.device), "budget_s": args.budget, "model": args.model,
                     "args": {"parts": args.parts, "batch_size": args.batch_size, "max_length": args.max_length},
                     "errors": []}  # fmt: skip
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "cctuning-gpu-perf"
    folder, results["weights"] = (
        (None, "random Llama (bench's tiny model)") if args.model == "tiny" else smollm2(work)
    )
    results["smollm2"] = {"folder": folder, "weights": results["weights"]}
    for part in args.parts:
        log(f"{part} ({clock.left():.0f} s left)")
        try:
            if part == "perf" and (folder or args.model == "tiny"):
                perf(load_base(args.model, folder=folder), args, args.device, clock, results)
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the GPU's memory back for gpu_check's processes
            elif part == "perf":
                results["errors"].append(f"perf: no SmolLM2-135M: {results['weights']}")
            else:
                check(args, folder, clock, results)
        except Exception as err:  # a failed part must not lose the others
            traceback.print_exc()
            results["errors"].append(f"{part}: {type(err).__name__}: {err}")
        results["seconds"] = round(time.perf_counter() - started, 1)
        write(args, results)
    print(table(results))
    log(f"wrote {args.out / 'cuda.json'}")
    return 1 if results["errors"] or results.get("gpu_check", {}).get("exit") not in (None, 0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
