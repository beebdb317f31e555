"""``cctuning report RUN_DIR...``: several evaluation runs side by side, as a table and a plot."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import atomic_path, write_text

logger = logging.getLogger(__name__)


def load_run(path: str | Path) -> dict:
    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise CCError(f"{path}: no {RESULTS_NAME} (run `cctuning eval --output {path}` first)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CCError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None


def run_label(run: dict, path: str | Path) -> str:
    return f"{Path(path).name} ({run.get('method', '?')}, {run['connection']})"


def comparison_rows(runs: list[tuple[str, dict]]) -> list[dict]:
    """One row per benchmark × language (and average) with the primary metric of every run."""
    benches: list[str] = []
    for _, run in runs:
        benches += [b for b in run["benchmarks"] if b not in benches]
    rows = []
    for bench in benches:
        metric = next(run["primary_metric"][bench] for _, run in runs if bench in run["benchmarks"])
        langs: list[str] = []
        for _, run in runs:
            langs += [
                lang for lang in run["benchmarks"].get(bench, {}).get("per_language", {}) if lang not in langs
            ]
        for lang in langs + ["avg", "avg w/o en"]:
            row = {"benchmark": bench, "lang": lang, "metric": metric}
            for label, run in runs:
                data = run["benchmarks"].get(bench)
                value = None
                if data is not None:
                    if lang == "avg":
                        value = (data.get("average") or {}).get(metric)
                    elif lang == "avg w/o en":
                        value = (data.get("average_without_en") or {}).get(metric)
                    elif lang in data["per_language"]:
                        value = data["per_language"][lang][metric]
                row[label] = value
            rows.append(row)
    return rows


def markdown(rows: list[dict], labels: list[str]) -> str:
    head = "| benchmark | lang | metric | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (3 + len(labels))]
    for row in rows:
        vals = ["–" if row[label] is None else f"{100 * row[label]:.1f}" for label in labels]
        lines.append(f"| {row['benchmark']} | {row['lang']} | {row['metric']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    """Grouped bars: one group per benchmark (its language average), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = [r for r in rows if r["lang"] == "avg"]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(avg)), 4))
    top = 0.0
    for i, label in enumerate(labels):
        present = [(j, r[label]) for j, r in enumerate(avg) if r[label] is not None]  # no bar when a run lacks it
        xs = [j + (i - (len(labels) - 1) / 2) * width for j, _ in present]
        ys = [100 * v for _, v in present]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        top = max([top, *ys])
    ax.set_ylim(0, max(1.0, top * 1.15))
    ax.set_xticks(range(len(avg)), [f"{r['benchmark']}\n({r['metric']})" for r in avg])
    ax.set_ylabel("score ×100 (average over languages)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def build_report(run_dirs: list[str], output: str | Path) -> tuple[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``output``; returns (table, png)."""
    if not run_dirs:
        raise CCError("give at least one evaluation run folder")
    runs = [(run_label(load_run(p), p), load_run(p)) for p in run_dirs]
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        runs = [(f"{i + 1}: {label}", run) for i, (label, run) in enumerate(runs)]
        labels = [label for label, _ in runs]
    rows = comparison_rows(runs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, labels)
    write_text(out / "report.md", table + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["benchmark", "lang", "metric", *labels])
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "report.csv", buf.getvalue())
    png = out / "report.png"
    plot(rows, labels, png)
    return table, png
