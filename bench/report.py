"""Markdown tables from a results dictionary, and the table inside ``bench/README.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def fmt(stat: Any, digits: int = 2, suffix: str = "") -> str:
    """``median (min–max)`` of a summary, or the reason it is missing."""
    if not isinstance(stat, dict):
        return "–" if stat is None else str(stat)
    if "median" not in stat:
        return stat.get("skipped") or stat.get("error") or "–"
    return f"{stat['median']:.{digits}f}{suffix} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def _models(results: dict) -> list[str]:
    return list(results.get("models", {})) + [
        m for m in results.get("skipped", {}) if m not in results["models"]
    ]


def _cell(results: dict, key: str, model: str, digits: int = 2, sub: str | None = None) -> str:
    if model in results.get("skipped", {}):
        return results["skipped"][model]
    value = results.get(key, {}).get(model)
    if sub is not None and isinstance(value, dict) and sub in value:
        value = value[sub]
    return fmt(value, digits)


def headline(results: dict) -> list[str]:
    rows = [
        "| # | figure (ratio, CC-Tuning over baseline) | model | median (min–max) | reference |",
        "|---|---|---|---|---|",
    ]
    for model in _models(results):
        for key, label in (("", "CC / SFT"), ("_english_grad", "CC `--english-grad` / SFT")):
            floor = results[f"train_step_floor{key}"].get(model)
            ref = f"floor {floor:.3f}" if floor else ""
            rows.append(
                f"| 1 | train step time, {label} | {model} | "
                f"{_cell(results, f'train_step_ratio{key}', model)} | {ref} |"
            )
    for b in ("b1", "b8"):
        for model in _models(results):
            rows.append(
                f"| 2 | generate latency, transform / none, {b} | {model} | "
                f"{_cell(results, f'generate_ratio_{b}', model)} | target ≤ 1.10 |"
            )
            rows.append(
                f"| 2 | generate latency, naive two-prefill / none, {b} | {model} | "
                f"{_cell(results, f'naive_generate_ratio_{b}', model)} | official code's path |"
            )
    for model in _models(results):
        rows.append(
            f"| 5 | peak RSS during a step, CC / SFT | {model} | "
            f"{_cell(results, 'peak_memory_ratio', model, 3, 'peak')} | |"
        )
        rows.append(
            f"| 5 | step working memory (peak − RSS before the step), CC / SFT | {model} | "
            f"{_cell(results, 'peak_memory_ratio', model, 3, 'step')} | |"
        )
        rows.append(
            f"| 5 | step working memory, CC `--english-grad` / SFT | {model} | "
            f"{_cell(results, 'peak_memory_ratio_english_grad', model, 3, 'step')} | |"
        )
    return rows


def eval_rows(results: dict) -> list[str]:
    rows = ["| model | scoring | items/s, batch 1 | items/s, batched | speedup |", "|---|---|---|---|---|"]
    for model, res in results.get("eval_items_per_s", {}).items():
        if "error" in res:
            rows.append(f"| {model} | | {res['error']} | | |")
            continue
        batched = f"b{res['batch_size']}"
        for scoring in ("generate", "likelihood"):
            r = res[scoring]
            rows.append(
                f"| {model} | {scoring} | {fmt(r['b1'])} | {fmt(r[batched])} ({batched}) | "
                f"{fmt(r['speedup'])}× |"
            )
    return rows


def matrix_rows(results: dict) -> list[str]:
    rows = [
        "| model | N pairs | seconds | s per 1000 | forward passes | accumulate | solve | peak RSS MB | "
        "Δ RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results.get("matrix_fit", []):
        rows.append(
            f"| {e['model']} | {e['n']} | {fmt(e['seconds'])} | {e['seconds_per_1000_pairs']:.2f} | "
            f"{fmt(e['collect_seconds'])} | {fmt(e['accumulate_seconds'], 3)} | "
            f"{fmt(e['solve_seconds'], 3)} | {fmt(e['peak_mb'], 0)} | {fmt(e['delta_mb'], 0)} |"
        )
    return rows


def absolute_rows(results: dict) -> list[str]:
    rows = [
        "| model | setting | SFT | CC | CC `--english-grad` | train / English tokens per step |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in results.get("train_step", {}).items():
        s, t, st = res["seconds_per_step"], res["tokens"], res["setup"]
        rows.append(
            f"| {model} | batch {st['batch_size']}, max length {st['max_length']}, s/step | "
            f"{fmt(s['sft'], 3)} | {fmt(s['cc'], 3)} | {fmt(s['cc_english_grad'], 3)} | "
            f"{t['train_tokens_per_step']:.0f} / {t['english_tokens_per_step']:.0f} |"
        )
    gen = [
        "| model | batch | prompts a round (mean tokens), rounds | none, s | transform, s | naive, s |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in results.get("generate", {}).items():
        for b in ("b1", "b8"):
            r = res[b]
            gen.append(
                f"| {model} | {b[1:]} | {r['prompts_per_round']} ({r['mean_prompt_tokens']:.0f}), {r['rounds']} | "
                f"{fmt(r['seconds']['none'], 3)} | {fmt(r['seconds']['transform'], 3)} | "
                f"{fmt(r['seconds']['naive'], 3)} |"
            )
    mem = [
        "| model | batch, max length | SFT peak / step MB | CC peak / step MB | CC `--english-grad` peak / step MB |",
        "|---|---|---|---|---|",
    ]
    for model, res in results.get("peak_memory_mb", {}).items():
        cells = [
            f"{res[v]['peak_mb']['median']:.0f} / {res[v]['step_mb']['median']:.0f}"
            for v in ("sft", "cc", "cc_english_grad")
        ]
        mem.append(f"| {model} | {res['batch_size']}, {res['max_length']} | " + " | ".join(cells) + " |")
    return rows + [""] + gen + [""] + mem


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPU cores ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, "
        f"`torch.set_num_threads({m['torch_threads']})`; load average at start {results['load_average'].get('start')}, "
        f"at end {results['load_average'].get('end')}; {results.get('seconds', 0):.0f} s in all"
        + (" (quick run)" if results.get("quick") else "")
        + ".",
        "",
        "Models: "
        + "; ".join(f"`{k}`: {v}" for k, v in results.get("models", {}).items())
        + "".join(f"; `{k}`: {v}" for k, v in results.get("skipped", {}).items())
        + ".",
        "",
        *headline(results),
        "",
        "**Evaluation throughput** (4) — " + _eval_note(results),
        "",
        *eval_rows(results),
        "",
        "**Transform Matrix fit** (3): time and peak memory against N (pairs of prompts; each pair is two "
        "prompt passes), each N in a fresh process.",
        "",
        *matrix_rows(results),
        "",
        "**Absolute figures** (machine-dependent; for context only).",
        "",
        *absolute_rows(results),
    ]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(results["errors"])]
    return "\n".join(lines) + "\n"


def _eval_note(results: dict) -> str:
    any_res = next((r for r in results.get("eval_items_per_s", {}).values() if "benchmark" in r), None)
    if any_res is None:
        return "not measured."
    return (
        f"`cctuning eval` on {any_res['benchmark']} ({any_res['items']} items, transform connection), "
        "batched against batch 1 (the official script's way)."
    )


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
