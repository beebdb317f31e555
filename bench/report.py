"""Markdown tables from a results dictionary, and the table inside ``bench/README.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.startup import BASELINE

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
DISTURBED = "†"


def fmt(stat: Any, digits: int = 2) -> str:
    """``median (min–max)`` of a summary, or the reason it is missing."""
    if not isinstance(stat, dict):
        return "–" if stat is None else str(stat)
    if "median" not in stat:
        return stat.get("skipped") or stat.get("error") or "–"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def mark(info: dict | None) -> str:
    """``†`` when a series kept rounds disturbed by other processes or stopped early."""
    return DISTURBED if info and (info.get("kept_disturbed") or info.get("stopped_early")) else ""


def _models(results: dict) -> list[str]:
    skipped = [m for m in results.get("skipped", {}) if m not in results["models"]]
    return list(results.get("models", {})) + skipped


def _value(results: dict, key: str, model: str, sub: str | None = None) -> Any:
    if model in results.get("skipped", {}):
        return results["skipped"][model]
    value = results.get(key, {}).get(model)
    if sub is not None and isinstance(value, dict) and sub in value:
        value = value[sub]
    return value


def _row(number: int, figure: str, model: str, value: str, reference: str = "") -> str:
    return f"| {number} | {figure} | {model} | {value} | {reference} |"


def headline(results: dict) -> list[str]:
    rows = [
        "| # | figure (ratio, CC-Tuning over baseline) | model | median (min–max) | reference |",
        "|---|---|---|---|---|",
    ]
    for model in _models(results):
        info = results.get("train_step", {}).get(model, {}).get("contention")
        for key, label in (("", "CC / SFT"), ("_english_grad", "CC `--english-grad` / SFT")):
            floor = results[f"train_step_floor{key}"].get(model)
            value = fmt(_value(results, f"train_step_ratio{key}", model)) + mark(info)
            rows.append(
                _row(1, f"train step time, {label}", model, value, f"floor {floor:.3f}" if floor else "")
            )
    for b in ("b1", "b8"):
        for model in _models(results):
            info = results.get("generate", {}).get(model, {}).get(b, {}).get("contention")
            value = fmt(_value(results, f"generate_ratio_{b}", model)) + mark(info)
            rows.append(
                _row(2, f"generate latency, transform / none, batch {b[1:]}", model, value, "target ≤ 1.10")
            )
            value = fmt(_value(results, f"naive_generate_ratio_{b}", model)) + mark(info)
            rows.append(_row(2, f"generate latency, naive two-prefill / none, batch {b[1:]}", model, value,
                             "the official code's path"))  # fmt: skip
    for model in _models(results):
        rows.append(_row(5, "peak RSS during a step, CC / SFT", model,
                         fmt(_value(results, "peak_memory_ratio", model, "peak"), 3)))  # fmt: skip
        rows.append(_row(5, "step working memory (peak − RSS before the step), CC / SFT", model,
                         fmt(_value(results, "peak_memory_ratio", model, "step"), 3)))  # fmt: skip
        rows.append(_row(5, "peak RSS during a step, CC `--english-grad` / SFT", model,
                         fmt(_value(results, "peak_memory_ratio_english_grad", model, "peak"), 3)))  # fmt: skip
        rows.append(_row(5, "step working memory, CC `--english-grad` / SFT", model,
                         fmt(_value(results, "peak_memory_ratio_english_grad", model, "step"), 3)))  # fmt: skip
    return rows


def eval_rows(results: dict) -> list[str]:
    rows = [
        "| model | benchmark, items | scoring | items/s, batch 1 | items/s, batch 8 | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in results.get("eval_items_per_s", {}).items():
        if "error" in res:
            rows.append(f"| {model} | | | {res['error']} | | |")
            continue
        batched = f"b{res['batch_size']}"
        for scoring in ("generate", "likelihood"):
            r = res[scoring]
            rows.append(
                f"| {model} | {res['benchmark']}, {res['items']} | {scoring} | {fmt(r['b1'])} | {fmt(r[batched])} | "
                f"{fmt(r['speedup'])}×{mark(r.get('contention'))} |"
            )
    return rows


def matrix_rows(results: dict) -> list[str]:
    rows = [
        "| model | N pairs | seconds | s per 1000 pairs | forward passes, s | accumulate, s | solve, s | "
        "peak RSS, MB | RSS growth during the fit, MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results.get("matrix_fit", []):
        rows.append(
            f"| {e['model']} | {e['n']} | {fmt(e['seconds'])}{mark(e.get('contention'))} | "
            f"{e['seconds_per_1000_pairs']:.2f} | {fmt(e['collect_seconds'])} | {fmt(e['accumulate_seconds'], 3)} | "
            f"{fmt(e['solve_seconds'], 3)} | {fmt(e['peak_mb'], 0)} | {fmt(e['delta_mb'], 0)} |"
        )
    return rows


def absolute_rows(results: dict) -> list[str]:
    rows = [
        "| model | batch, max length | SFT, s/step | CC, s/step | CC `--english-grad`, s/step | "
        "training / English tokens a step (padded) |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in results.get("train_step", {}).items():
        s, t, st = res["seconds_per_step"], res["tokens"], res["setup"]
        rows.append(
            f"| {model} | {st['batch_size']}, {st['max_length']} | {fmt(s['sft'], 3)} | {fmt(s['cc'], 3)} | "
            f"{fmt(s['cc_english_grad'], 3)} | {t['train_tokens_per_step']:.0f} / {t['english_tokens_per_step']:.0f} |"
        )
    gen = [
        "| model | batch | prompt tokens (mean) | rounds | none, s a call | transform, s a call | naive, s a call |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, res in results.get("generate", {}).items():
        for b in ("b1", "b8"):
            r = res[b]
            gen.append(
                f"| {model} | {b[1:]} | {r['mean_prompt_tokens']:.0f} | {r['rounds']} | "
                f"{fmt(r['seconds']['none'], 3)} | {fmt(r['seconds']['transform'], 3)} | "
                f"{fmt(r['seconds']['naive'], 3)} |"
            )
    mem = [
        "| model | batch, max length | SFT peak / step, MB | CC peak / step, MB | CC `--english-grad` peak / step, MB |",
        "|---|---|---|---|---|",
    ]
    for model, res in results.get("peak_memory_mb", {}).items():
        cells = [
            f"{res[v]['peak_mb']['median']:.0f} / {res[v]['step_mb']['median']:.0f}"
            for v in ("sft", "cc", "cc_english_grad")
        ]
        mem.append(f"| {model} | {res['batch_size']}, {res['max_length']} | " + " | ".join(cells) + " |")
    return rows + [""] + gen + [""] + mem


def precision_rows(results: dict) -> list[str]:
    rows = [
        "| model | batch, max length | fp32, s/step | bf16 weights, s/step | fp32 + bf16 autocast, s/step | "
        "bf16 / fp32 | autocast / fp32 | held-out NLL, fp32 | bf16 − fp32 (95% CI), same weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.get("precision", {}).items():
        if "error" in res:
            rows.append(f"| {model} | {res['error']} | | | | | | | |")
            continue
        t, n = res["train"], res["nll"]
        s, st, d = t["seconds_per_step"], t["setup"], n["bf16_minus_fp32"]
        rows.append(
            f"| {model} | {st['batch_size']}, {st['max_length']} | {fmt(s['fp32'], 3)} | {fmt(s['bf16'], 3)} | "
            f"{fmt(s['autocast'], 3)} | {fmt(t['ratio_bf16'])}{mark(t.get('contention'))} | "
            f"{fmt(t['ratio_autocast'])} | {n['fp32']:.4f} ({n['records']} records) | "
            f"{d['diff']:+.4f} ({d['ci_low']:+.4f} to {d['ci_high']:+.4f}){'' if n['same_layers'] else ', layers differ'} |"
        )
    return rows


def flops_rows(results: dict) -> list[str]:
    peak = results.get("matmul_peak_gflops") or {}
    lines = []
    if peak:
        lines.append(
            "Matmul peak of this machine (best `torch.mm` GFLOP/s over "
            + ", ".join(k for k in peak.get("fp32", {}) if k != "peak")
            + "): "
            + "; ".join(f"{name} **{p['peak']:.0f}**" for name, p in peak.items())
            + "."
        )
        lines.append("")
    lines += [
        "| model | path | dtype | GFLOP per item | s per item, batch 1 | GFLOP/s, batch 1 (share of peak) | "
        "s per item, batched | GFLOP/s, batched (share of peak) | batched / batch 1 speedup | bf16 / fp32 time, "
        "batch 1 · batched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.get("flops", {}).items():
        if "error" in res:
            lines.append(f"| {model} | {res['error']} | | | | | | | | |")
            continue
        b = res["batch_size"]
        for path, r in res["paths"].items():
            for dtype in ("fp32", "bf16"):
                one, many = r[f"{dtype} b1"], r[f"{dtype} b{b}"]
                ratio = (
                    f"{fmt(r['bf16/fp32 time b1'])} · {fmt(r[f'bf16/fp32 time b{b}'])}"
                    if dtype == "bf16"
                    else ""
                )
                lines.append(
                    f"| {model} | {path} | {dtype} | {one['gflop_per_item']:.2f} · {many['gflop_per_item']:.2f} | "
                    f"{fmt(one['seconds_per_item'], 3)} | {one['gflops']['median']:.1f} "
                    f"({100 * one['share_of_peak']['median']:.0f}%) | {fmt(many['seconds_per_item'], 3)} (b{b}) | "
                    f"{many['gflops']['median']:.1f} ({100 * many['share_of_peak']['median']:.0f}%) | "
                    f"{fmt(r[f'{dtype} speedup b{b}/b1'])}×{mark(r.get('contention'))} | {ratio} |"
                )
    return lines


def startup_rows(results: dict) -> list[str]:
    """The Markdown table of the ``startup`` section (empty when it did not run)."""
    res = results.get("startup")
    if not res:
        return []
    if "error" in res:
        return [f"startup: {res['error']}"]
    rows = [
        "| command | best s | ratio to `import torch` (best) | per round, median (min–max) | target | holds |",
        "|---|---|---|---|---|---|",
        f'| `python -c "import torch"` | {res["best_seconds"][BASELINE]:.3f} | 1 | | | |',
    ]
    for name, target in res["targets"].items():
        per_round = res["ratio_per_round"][name]
        rows.append(
            f"| `{name}` | {res['best_seconds'][name]:.3f} | {res['ratio_of_best'][name]:.3f}{mark(res['contention'])} | "
            f"{per_round['median']:.3f} ({per_round['min']:.3f}–{per_round['max']:.3f}) | ≤ {target} | "
            f"{'yes' if res['holds'][name] else '**no**'} |"
        )
    return rows


def serve_rows(results: dict) -> list[str]:
    """The Markdown table of the ``serve`` section (empty when it did not run)."""
    rows = []
    for model, res in results.get("serve", {}).items():
        if "error" in res:
            rows.append(f"serve {model}: {res['error']}")
            continue
        for key, r in res.items():
            if not key.startswith("c"):
                continue
            target = "target ≥ 0.8" if key == "c16" else ""
            rows.append(
                f"| {model} | {key[1:]} | {fmt(r['serve_tokens_per_s'], 1)} | {fmt(r['offline_tokens_per_s'], 1)} | "
                f"{fmt(r['ratio'])}{mark(r.get('contention'))} | {r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} | "
                f"{r['largest_batch']} | {target} |"
            )
    if not rows:
        return []
    head = [
        "| model | clients | served tokens/s | offline tokens/s (same batch size) | served / offline | "
        "latency p50 / p95, s | largest batch | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def markdown(results: dict) -> str:
    m = results["machine"]
    load = results.get("load_average", {})
    lines = [
        f"Measured {results['date']} on `nproc` = {m['nproc']} ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, "
        f"`torch.set_num_threads({m['torch_threads']})`; {results.get('seconds', 0):.0f} s in all"
        + (" (quick run)" if results.get("quick") else "")
        + f"; load average at start {load.get('start')}, at end {load.get('end')}.",
        "",
        "Models: "
        + "; ".join(f"`{k}`: {v}" for k, v in results.get("models", {}).items())
        + "".join(f"; `{k}`: {v}" for k, v in results.get("skipped", {}).items())
        + ".",
        "",
        *headline(results),
        "",
        "**Evaluation throughput** (4): `cctuning eval` with the transform connection, batch 8 against batch 1 "
        "(the official script's way).",
        "",
        *eval_rows(results),
        "",
        "**Transform Matrix fit** (3): time and peak memory against N (pairs of prompts; each pair is two "
        "prompt passes), each N in a fresh process.",
        "",
        *matrix_rows(results),
        "",
        "**bf16 against fp32** (precision): a CC-Tuning optimizer step with the weights in bfloat16 "
        "(`--dtype bfloat16`) and with float32 weights under bf16 autocast (`--bf16`), over float32; the held-out "
        "NLL (transform connection) of the same weights in float32 and in bfloat16.",
        "",
        *precision_rows(results),
        "",
        "**Achieved FLOP/s** (flops): each path's counted FLOPs (matrix products and attention, padding included) "
        "over its time, against the matmul peak measured in the same round; GFLOP per item at batch 1 · batched. `nll-*`: `eval --nll` on "
        "XQuAD/de (long prompts, short answers); `likelihood`: `eval --scoring likelihood` on XNLI/sw; `generate`: "
        "40 new tokens; all but `nll-none` with the transform connection.",
        "",
        *flops_rows(results),
        "",
        "**Start-up of the command line** (startup): each command a fresh process, best of "
        f"{results.get('startup', {}).get('seconds', {}).get('import torch', {}).get('repeats', '–')} rounds, "
        'against `python -c "import torch"` in the same rounds.',
        "",
        *startup_rows(results),
        "",
        "**Serving** (serve): N concurrent clients against `cctuning serve` (connection transform, "
        "`--max-batch-size N`, greedy, stop tokens off), against offline `CCGenerator.generate` on the same "
        "prompts in batches of N, in the same rounds.",
        "",
        *serve_rows(results),
        "",
        "**Absolute figures** (they depend on the machine; for context only).",
        "",
        *absolute_rows(results),
        "",
        f"{DISTURBED}: some rounds of this figure ran while other processes kept the CPU busy, or the series "
        "stopped early for that reason (see `contention` in the JSON).",
    ]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(results["errors"])]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: Path) -> str:
    text = markdown(results)
    path.write_text(text, encoding="utf-8")
    return text


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the result markers of ``readme`` (appended if the markers are missing)."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    readme.write_text(text, encoding="utf-8")
