"""Markdown tables from a results dictionary, and the table inside ``bench/README.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.generation import TARGET as GENERATE_TARGET
from bench.startup import BASELINE
from bench.train_flops import FLOOR_TARGET

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


def _row(number: int | str, figure: str, model: str, value: str, reference: str = "", holds: str = "") -> str:
    return f"| {number} | {figure} | {model} | {value} | {reference} | {holds} |"


def holds(stat: Any, target: float | None) -> str:
    """``yes``/``**no**``: whether a ratio's median is at or under ``target`` (blank without both)."""
    if target is None or not isinstance(stat, dict) or "median" not in stat:
        return ""
    return "yes" if stat["median"] <= target else "**no**"


def _train_rows(results: dict) -> list[str]:
    rows = []
    for model in _models(results):
        info = results.get("train_step", {}).get(model, {}).get("contention")
        for key, label in (("", "CC / SFT"), ("_english_grad", "CC `--english-grad` / SFT")):
            floor = results[f"train_step_floor{key}"].get(model)
            stat = _value(results, f"train_step_ratio{key}", model)
            value = fmt(stat) + mark(info)
            if not floor:
                rows.append(_row(1, f"train step time, {label}", model, value))
                continue
            within = stat["median"] / floor if isinstance(stat, dict) and "median" in stat else None
            reference = f"floor {floor:.3f}; target ≤ {FLOOR_TARGET}× floor = {FLOOR_TARGET * floor:.3f}"
            verdict = holds(stat, FLOOR_TARGET * floor) + (f" ({within:.2f}× floor)" if within else "")
            rows.append(_row(1, f"train step time, {label}", model, value, reference, verdict))
    return rows


def headline(results: dict) -> list[str]:
    rows = [
        "| # | figure (ratio, CC-Tuning over baseline) | model | median (min–max) | reference | target holds (median) |",
        "|---|---|---|---|---|---|",
        *_train_rows(results),
    ]
    for b in ("b1", "b8"):
        for model in _models(results):
            info = results.get("generate", {}).get(model, {}).get(b, {}).get("contention")
            stat = _value(results, f"generate_ratio_{b}", model)
            rows.append(_row(2, f"generate latency, transform / none, batch {b[1:]}", model, fmt(stat) + mark(info),
                             f"target ≤ {GENERATE_TARGET:.2f}", holds(stat, GENERATE_TARGET)))  # fmt: skip
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
    return rows + _nll_ratio_rows(results) + _train_flops_ratio_rows(results)


def _nll_ratio_rows(results: dict) -> list[str]:
    rows = []
    for model, res in results.get("nll", {}).items():
        if "error" in res:
            rows.append(_row(9, "eval --nll time, transform / none", model, res["error"]))
            continue
        for dataset, r in res["datasets"].items():
            rows.append(_row(9, f"eval --nll time, transform / none, {dataset} ({r.get('items', res['records'])} records, batch "
                             f"{res['batch_size']})", model, fmt(r["ratio"]) + mark(r.get("contention")),
                             f"target ≤ {r['target']:.2f}", holds(r["ratio"], r["target"])))  # fmt: skip
    return rows


def _train_flops_ratio_rows(results: dict) -> list[str]:
    rows = []
    for model, res in results.get("train_flops", {}).items():
        if "error" in res:
            rows.append(_row(10, "train step time, CC / SFT (train-flops)", model, res["error"]))
            continue
        target = res["floor_target"] * res["floor"]
        for precision, label in (("fp32", "float32"), ("autocast", "bf16 autocast")):
            if precision not in res["ratio"]:
                rows.append(
                    _row(10, f"train step time, CC / SFT, {label}", model, res.get("bf16_skipped", "–"))
                )
                continue
            stat = res["ratio"][precision]
            rows.append(_row(10, f"train step time, CC / SFT, {label}", model,
                             fmt(stat) + mark(res.get("contention")),
                             f"floor {res['floor']:.3f}; target ≤ {target:.3f}",
                             f"{holds(stat, target)} ({res['ratio_over_floor'][precision]['median']:.2f}× floor)"))  # fmt: skip
    return rows


def train_flops_rows(results: dict) -> list[str]:
    """Achieved FLOP/s and MFU of the training steps (section ``train-flops``)."""
    rows = [
        "| model | batch, max length | step | s/step | training tokens/s | GFLOP a step, counted (analytic) | "
        "GFLOP/s | MFU (of the peak of that dtype) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.get("train_flops", {}).items():
        if "error" in res:
            rows.append(f"| {model} | {res['error']} | | | | | | |")
            continue
        st = res["setup"]
        for variant, seconds in res["seconds_per_step"].items():
            method, precision = variant.split()
            f = res["flops_per_step"][method]
            peak = "bf16" if precision == "autocast" else "fp32"
            rows.append(
                f"| {model} | {st['batch_size']}, {st['max_length']} | {method.upper()}, "
                f"{'bf16 autocast' if precision == 'autocast' else 'float32'} | {fmt(seconds, 3)} | "
                f"{res['tokens_per_s'][variant]['median']:.0f} | {f['counted'] / 1e9:.1f} ({f['analytic'] / 1e9:.1f}) | "
                f"{fmt(res['gflops'][variant], 1)} | {100 * res['mfu'][variant]['median']:.0f}% of {peak} "
                f"{res['peak_gflops'][precision]:.3g} |"
            )
    return rows


def nll_rows(results: dict) -> list[str]:
    rows = ["| model | data | records, batch | none, items/s | transform, items/s |", "|---|---|---|---|---|"]
    for model, res in results.get("nll", {}).items():
        for dataset, r in res.get("datasets", {}).items():
            ips = r["items_per_s"]
            rows.append(f"| {model} | {dataset} | {r.get('items', res['records'])}, {res['batch_size']} | {fmt(ips['none'])} | "
                        f"{fmt(ips['transform'])} |")  # fmt: skip
    return rows


def comparison_rows(results: dict) -> list[str]:
    """Each ratio of the earlier run (``--compare``) against now; moved: the ranges do not overlap."""
    cmp = results.get("compared_with")
    if not cmp:
        return []
    lines = [
        f"**Ratios since the run of {cmp['date']}** (`{cmp['file']}`): every ratio recorded in both runs, "
        "median (min–max) then → now. *Moved*: the two ranges over the rounds do not overlap.",
        "",
        "| figure | then | now | change | moved |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(cmp["rows"], key=lambda r: not r["moved"]):
        change = "" if r["change"] is None else f"{100 * r['change']:+.0f}%"
        lines.append(f"| {r['figure']} | {fmt(r['old'], 3)} | {fmt(r['new'], 3)} | {change} | "
                     f"{'**moved**' if r['moved'] else ''} |")  # fmt: skip
    lines += ["", f"{len(cmp['new_only'])} ratios are new in this run; not measured now: "
              + (", ".join(cmp["gone"]) or "none") + "."]  # fmt: skip
    return lines


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


def _diff(d: dict | None) -> str:
    """A paired NLL difference with its 95% interval."""
    if not d:
        return "–"
    return f"{d['diff']:+.4f} ({d['ci_low']:+.4f} to {d['ci_high']:+.4f})"


def precision_rows(results: dict) -> list[str]:
    """bf16 against fp32: each mode's step-time ratio beside what it does to the held-out NLL."""
    rows = [
        "| model | batch, max length | fp32, s/step | **bf16 autocast (`--bf16`) / fp32, time** | "
        "**autocast − fp32, held-out NLL (95% CI)** | bf16 weights (`--dtype bfloat16`) / fp32, time | "
        "bf16 − fp32, held-out NLL (95% CI) | held-out NLL, fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.get("precision", {}).items():
        if "error" in res or "skipped" in res:
            rows.append(f"| {model} | {res.get('error') or res['skipped']} | | | | | | |")
            continue
        t, n = res["train"], res["nll"]
        s, st, m = t["seconds_per_step"], t["setup"], mark(t.get("contention"))
        layers = "" if n.get("same_layers", True) else ", layers differ"
        rows.append(
            f"| {model} | {st['batch_size']}, {st['max_length']} | {fmt(s['fp32'], 3)} | "
            f"{fmt(t['ratio_autocast'])}{m} | {_diff(n.get('autocast_minus_fp32'))} | {fmt(t['ratio_bf16'])}{m} | "
            f"{_diff(n.get('bf16_minus_fp32'))}{layers} | {n['fp32']:.4f} ({n['records']} records) |"
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
            + "; ".join(f"{name} **{p['peak']:.3g}**" for name, p in peak.items())
            + "."
            + (
                f" bf16 left out for the models over 1 M parameters: {results['bf16_skipped']}."
                if results.get("bf16_skipped")
                else ""
            )
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
            for dtype in res.get("dtypes", ("fp32", "bf16")):
                one, many = r[f"{dtype} b1"], r[f"{dtype} b{b}"]
                ratio = (
                    f"{fmt(r['bf16/fp32 time b1'])} · {fmt(r[f'bf16/fp32 time b{b}'])}"
                    if "bf16/fp32 time b1" in r and dtype == "bf16"
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


def _startup_intro(results: dict) -> str:
    repeats = results.get("startup", {}).get("seconds", {}).get("import torch", {}).get("repeats", "–")
    return (f"**Start-up of the command line** (startup): each command a fresh process, best of {repeats} rounds, "
            'against `python -c "import torch"` in the same rounds.')  # fmt: skip


#: the blocks after the headline table: (introduction, rows); an introduction may be a function of the results
BLOCKS = (
    ("**Training FLOP/s and MFU** (10, train-flops): the row-1 optimizer step of SFT and CC-Tuning in float32 "
     "and under bf16 autocast (float32 master weights), its counted FLOPs (matrix products and attention, "
     "forward and backward, padding included; the analytic count in brackets) over its time, against this "
     "machine's `torch.mm` peak of the same dtype.", train_flops_rows),
    ("**Held-out NLL, items per second** (9): `eval --nll` on the same records with each connection.", nll_rows),
    ("**Evaluation throughput** (4): `cctuning eval` with the transform connection, batch 8 against batch 1 "
     "(the official script's way).", eval_rows),
    ("**Transform Matrix fit** (3): time and peak memory against N (pairs of prompts; each pair is two "
     "prompt passes), each N in a fresh process.", matrix_rows),
    ("**bf16 against fp32** (precision), for the choice of a training default: the time of a CC-Tuning "
     "optimizer step under bf16 autocast (`--bf16`, float32 master weights) and with the weights in bfloat16 "
     "(`--dtype bfloat16`), over float32, each beside what that precision does to the held-out NLL of the same "
     "weights (transform connection; paired over the records, 95% bootstrap interval).", precision_rows),
    ("**Achieved FLOP/s** (flops): each path's counted FLOPs (matrix products and attention, padding included) "
     "over its time, against the matmul peak measured in the same round; GFLOP per item at batch 1 · batched. "
     "`nll-*`: `eval --nll` on XQuAD/de (long prompts, short answers); `likelihood`: `eval --scoring likelihood` "
     "on XNLI/sw; `generate`: 40 new tokens; all but `nll-none` with the transform connection.", flops_rows),
    (_startup_intro, startup_rows),
    ("**Serving** (serve): N concurrent clients against `cctuning serve` (connection transform, "
     "`--max-batch-size N`, greedy, stop tokens off), against offline `CCGenerator.generate` on the same "
     "prompts in batches of N, in the same rounds.", serve_rows),
    ("**Absolute figures** (they depend on the machine; for context only).", absolute_rows),
)  # fmt: skip


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
    ]
    for intro, rows in BLOCKS:
        lines += ["", intro(results) if callable(intro) else intro, "", *rows(results)]
    if results.get("compared_with"):
        lines += ["", *comparison_rows(results)]
    lines += [
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
