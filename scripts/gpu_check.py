"""One command for a GPU (issue 17): ``scripts/gpu_check.sh`` or ``make gpu-check``.

On a machine with CUDA (no internet needed) it runs, in order:

1. ``tests``: the CUDA-marked tests (``pytest -m cuda``: the mechanism with bf16 weights and SDPA
   attention, the generation fast path against the naive path, a bf16 training step, eval --nll
   against the CPU);
2. ``train``: ``cctuning train`` for a few steps on a tiny random Llama (``--bf16`` and ``--dtype
   bfloat16``) and with ``--bf16`` on SmolLM2-135M (the ``smollm2-135m`` preset: its converted folder
   from the cache, or converted here from its GGUF package when that is installed, or the folder given
   with ``--smollm2``; skipped with the reason otherwise);
3. ``bench``: on the device, the bf16 / fp32 ratios of a CC-Tuning training step (``bench.precision``)
   and of the evaluation and generation paths, with their achieved FLOP/s against the device's
   measured matmul peak (``bench.flops``).

It prints a short table and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. The exit
status is 0 when nothing failed (a skipped step is not a failure), 1 otherwise.

``--cpu`` forces the CPU everywhere (``CUDA_VISIBLE_DEVICES=`` for the subprocesses,
``CCTUNING_CUDA_TESTS_DEVICE=cpu`` for the tests): a check of the script's plumbing on a machine
without a GPU, not a GPU result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's cctuning and bench, without `pip install -e .`

SMOLLM2 = "smollm2-135m"
MODELS = ("tiny", SMOLLM2)
SMOLLM2_FOLDER: str | None = None  # --smollm2: a model folder that stands for the preset


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "gpu_check", help="folder for the results"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="force the CPU (checks the plumbing on a machine without a GPU)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--steps",
        default="tests,train,bench",
        help="comma-separated, from tests, train, bench (default: all)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each subprocess")
    parser.add_argument(
        "--smollm2",
        default=None,
        help="a model folder to use for smollm2-135m instead of the preset (scripts/gpu_perf.sh passes "
        "SmolLM2-135M's shape with random weights where the preset's weights could not travel)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for value, known, what in (
        (args.models, MODELS, "model"),
        (args.steps, ("tests", "train", "bench"), "step"),
    ):
        bad = [v for v in value if v not in known]
        if bad:
            parser.error(f"unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
    return args


# -- the machine ----------------------------------------------------------------------------------
def machine(force_cpu: bool) -> dict:
    import torch
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "forced_cpu": force_cpu,
        "device": "cpu",
    }
    if torch.cuda.is_available() and not force_cpu:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
            device_count=torch.cuda.device_count(),
        )
    return info


def child_env(force_cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["CCTUNING_CUDA_TESTS_DEVICE"] = "cpu"
    return env


def run(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> tuple[int, str, float]:
    """Exit status, the last lines of the output, seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, text = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    tail = "\n".join(text.strip().splitlines()[-15:])
    return code, tail, round(time.perf_counter() - start, 1)


# -- steps ----------------------------------------------------------------------------------------
def step_tests(args, env: dict) -> dict:
    """``pytest -m cuda``; passed/failed/skipped counts from its JUnit report."""
    import xml.etree.ElementTree as ET

    report = args.out / "cuda_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",  # where the CUDA-marked tests live (other files import the CPU-side extras)
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    code, tail, seconds = run(cmd, env, args.timeout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    detail = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if passed == 0 and counts["skipped"]:
        status = "skipped"  # no device: the tests said why
    else:
        status = "passed" if code == 0 else "failed"
    return {"name": "CUDA-marked tests (pytest -m cuda)", "status": status, "seconds": seconds,
            "detail": detail, "counts": counts, "output": tail}  # fmt: skip


def tiny_folder(work: Path) -> tuple[Path, Path]:
    """A tiny random Llama folder with its tokenizer, and 32 records of the bundled training mix."""
    from bench.common import mix_records
    from cctuning.testing import tiny_model, tiny_tokenizer

    folder, data = work / "tiny-base", work / "train.jsonl"
    if not (folder / "config.json").is_file():
        tok = tiny_tokenizer()
        tiny_model("llama", tokenizer=tok).save_pretrained(folder)
        tok.save_pretrained(folder)
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mix_records(32)), encoding="utf-8"
    )
    return folder, data


def smollm2_folder() -> tuple[str | None, str]:
    """The converted SmolLM2-135M folder (converting it now if its package is installed), or why not."""
    from cctuning.errors import CCError
    from cctuning.presets import resolve_model

    if SMOLLM2_FOLDER:
        return SMOLLM2_FOLDER, f"the folder given with --smollm2 ({SMOLLM2_FOLDER})"
    try:
        return resolve_model(SMOLLM2), "converted folder found or converted from the GGUF package"
    except CCError as err:
        return None, str(err)


def train_once(args, env: dict, name: str, model: str, data: Path, flags: list[str], steps: int) -> dict:
    out = args.out / "train" / name
    cmd = [sys.executable, "-m", "cctuning.cli", "train", "--model", model, "--data", str(data), "--output",
           str(out), "--overwrite", "--max-steps", str(steps), "--batch-size", "4", "--max-length", "256",
           "--logging-steps", "1", "--lr", "1e-5", "--save-total-limit", "1", *flags]  # fmt: skip
    code, tail, seconds = run(cmd, env, args.timeout)
    entry = {"name": f"train {name} ({' '.join(flags)}, {steps} steps)", "seconds": seconds, "output": tail}
    results = out / "train_results.json"
    if code == 0 and results.is_file():
        saved = json.loads(results.read_text())
        entry.update(
            status="passed",
            detail=f"{saved.get('global_step')} steps, train loss {saved.get('train_loss', float('nan')):.4f}, "
            f"{saved.get('seconds')} s in the Trainer",
            train_loss=saved.get("train_loss"),
        )
    else:
        entry.update(status="failed", detail=tail.splitlines()[-1] if tail else f"exit {code}")
    return entry


def step_train(args, env: dict) -> list[dict]:
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    tiny, data = tiny_folder(work)
    steps = 2 if args.quick else 4
    entries = []
    if "tiny" in args.models:
        entries.append(train_once(args, env, "tiny-bf16-autocast", str(tiny), data, ["--bf16"], steps))
        entries.append(
            train_once(args, env, "tiny-bf16-weights", str(tiny), data, ["--dtype", "bfloat16"], steps)
        )
    if SMOLLM2 in args.models:
        folder, why = smollm2_folder()
        if folder is None:
            entries.append(
                {"name": f"train {SMOLLM2} (--bf16)", "status": "skipped", "seconds": 0, "detail": why}
            )
        else:
            entries.append(train_once(args, env, f"{SMOLLM2}-bf16-autocast", folder, data, ["--bf16"], steps))
    return entries


def step_bench(args, device: str) -> tuple[dict, list[dict]]:
    from bench.common import Contention, load_base, set_threads
    from bench.flops import DTYPES, GPU_PEAK_SHAPES, PEAK_SHAPES, FlopsSetup, bench_flops, matmul_peak
    from bench.precision import PrecisionSetup, bench_precision

    # the CPU check tests the plumbing: one small shape (bf16 matmuls crawl on a CPU without bf16 units)
    shapes = PEAK_SHAPES + GPU_PEAK_SHAPES if device == "cuda" else PEAK_SHAPES[1:2]
    peaks: dict = {}
    never_wait = Contention(threshold=float("inf"), max_wait_s=0.0)  # nothing else shares a GPU check
    if device == "cpu":  # the plumbing only: the smallest sizes that run every path
        precision = PrecisionSetup(2, 64, steps=1, repeats=1, nll_records=4)
        flops = FlopsSetup(2, repeats=1, batch_size=2, new_tokens=4, round_peak_shapes=PEAK_SHAPES[1:2])
    elif args.quick:
        precision = PrecisionSetup(8, 256, steps=1, repeats=2, nll_records=8)
        flops = FlopsSetup(8, repeats=1)
    else:
        precision = PrecisionSetup(8, 256, steps=4, repeats=5, nll_records=32)
        flops = FlopsSetup(16, repeats=3)
    out: dict = {"matmul_peak_gflops": peaks, "models": {}}  # the peaks are measured before the first model
    entries = []
    for name in args.models:
        start = time.perf_counter()
        try:
            if name == SMOLLM2 and smollm2_folder()[0] is None:
                entries.append(
                    {
                        "name": f"bench {name}",
                        "status": "skipped",
                        "seconds": 0,
                        "detail": smollm2_folder()[1],
                    }
                )
                continue
            if not peaks:
                if device == "cpu":
                    set_threads(
                        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                    )
                brief = {"min_seconds": 0.05, "repeats": 2} if device == "cpu" else {}
                peaks.update({dtype: matmul_peak(dtype, device, shapes=shapes, **brief) for dtype in DTYPES})
            loaded = load_base(name, folder=smollm2_folder()[0] if name == SMOLLM2 else None)
            res = {
                "precision": bench_precision(loaded, precision, never_wait, device),
                "flops": bench_flops(loaded, flops, never_wait, device, peaks=peaks),
            }
            out["models"][name] = res
            entries.append({"name": f"bench {name}", "status": "passed", "seconds": round(time.perf_counter() - start, 1),
                            "detail": bench_summary(res)})  # fmt: skip
        except Exception as err:  # a failed benchmark must not lose the other results
            traceback.print_exc()
            entries.append({"name": f"bench {name}", "status": "failed", "seconds": round(time.perf_counter() - start, 1),
                            "detail": f"{type(err).__name__}: {err}"})  # fmt: skip
    return out, entries


def bench_summary(res: dict) -> str:
    train = res["precision"]["train"]
    paths = res["flops"]["paths"]
    b = res["flops"]["batch_size"]
    gen = paths["generate"]
    nll = paths["nll-transform"]
    return (
        f"train step bf16/fp32 {train['ratio_bf16']['median']:.2f}, autocast/fp32 {train['ratio_autocast']['median']:.2f}; "
        f"generate bf16/fp32 b1 {gen['bf16/fp32 time b1']['median']:.2f}, b{b} {gen[f'bf16/fp32 time b{b}']['median']:.2f}; "
        f"eval --nll (transform) b{b}: fp32 {100 * nll[f'fp32 b{b}']['share_of_peak']['median']:.0f}% of peak, "
        f"bf16 {100 * nll[f'bf16 b{b}']['share_of_peak']['median']:.0f}%; "
        f"held-out NLL bf16 - fp32 {res['precision']['nll']['bf16_minus_fp32']['diff']:+.4f}"
    )


# -- report ---------------------------------------------------------------------------------------
def table(results: dict) -> str:
    m = results["machine"]
    where = (
        f"{m.get('device_name')} (compute capability {m.get('capability')}, {m.get('memory_gb')} GB, CUDA {m.get('cuda')})"
        if m["device"] == "cuda"
        else "CPU" + (" (forced with --cpu: a plumbing check, not a GPU result)" if m["forced_cpu"] else "")
    )
    lines = [
        f"gpu_check {results['date']} on {where}; torch {m['torch']}, transformers {m['transformers']}",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in results["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('detail', '')} |")
    peaks = results.get("bench", {}).get("matmul_peak_gflops")
    if peaks:
        lines += ["", "Matmul peak, GFLOP/s: " + "; ".join(f"{k} {v['peak']:.0f}" for k, v in peaks.items())]
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict) -> str:
    """``gpu_check.json`` and ``gpu_check.md`` as they stand (after every step, so that a run stopped
    at its time limit keeps the steps it finished)."""
    text = table(results)
    (out / "gpu_check.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "gpu_check.md").write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    global SMOLLM2_FOLDER
    args = parse_args(argv)
    SMOLLM2_FOLDER = args.smollm2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for devices
    info = machine(args.cpu)
    if info["device"] != "cuda" and not args.cpu:
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
            "or with --cpu to check the plumbing",
            file=sys.stderr,
        )
        return 2
    env = child_env(args.cpu)
    results: dict = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": info,
        "args": {"quick": args.quick, "models": args.models, "steps": args.steps, "smollm2": args.smollm2},
        "steps": [],
    }
    if "tests" in args.steps:
        log("tests: pytest -m cuda")
        results["steps"].append(step_tests(args, env))
        save(args.out, results)
    if "train" in args.steps:
        log("train")
        results["steps"] += step_train(args, env)
        save(args.out, results)
    if "bench" in args.steps:
        log("bench")
        results["bench"], entries = step_bench(args, info["device"])
        results["steps"] += entries
    text = save(args.out, results)
    print(text)
    log(f"wrote {args.out / 'gpu_check.json'}")
    return 1 if any(s["status"] == "failed" for s in results["steps"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
