"""``cctuning report RUN_DIR...``: several evaluation runs side by side, as a table and a plot."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval.nll import NLL_NAME, load_items, paired_difference
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import atomic_path, write_text

logger = logging.getLogger(__name__)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    """Write the figure atomically as PNG and release it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def load_run(path: str | Path) -> dict:
    """A benchmark run (``results.json``) or an NLL run (``nll.json``; ``kind`` tells which)."""
    path = Path(path)
    for name, kind in ((RESULTS_NAME, "benchmarks"), (NLL_NAME, "nll")):
        file = path / name if path.is_dir() else path
        if file.is_file() and file.name == name:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise CCError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
            data["kind"], data["path"] = kind, str(path)
            return data
    raise CCError(f"{path}: no {RESULTS_NAME} or {NLL_NAME} (run `cctuning eval --output {path}` first)")


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
    plt = _pyplot()

    avg = [r for r in rows if r["lang"] == "avg"]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(avg)), 4))
    top = 0.0
    for i, label in enumerate(labels):
        present = [
            (j, r[label]) for j, r in enumerate(avg) if r[label] is not None
        ]  # no bar when a run lacks it
        xs = [j + (i - (len(labels) - 1) / 2) * width for j, _ in present]
        ys = [100 * v for _, v in present]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        top = max([top, *ys])
    ax.set_ylim(0, max(1.0, top * 1.15))
    ax.set_xticks(range(len(avg)), [f"{r['benchmark']}\n({r['metric']})" for r in avg])
    ax.set_ylabel("score ×100 (average over languages)")
    ax.legend(fontsize=8)
    _save(plt, fig, path, dpi=120)


def nll_markdown(runs: list[tuple[str, dict]]) -> str:
    """NLL per language for every run, then each run's paired difference to the first one."""
    langs: list[str] = []
    for _, run in runs:
        langs += [lang for lang in run["nll"] if lang not in langs]
    lines = ["| lang | " + " | ".join(label for label, _ in runs) + " |", "|" + "---|" * (1 + len(runs))]
    for lang in langs:
        cells = []
        for _, run in runs:
            m = run["nll"].get(lang)
            cells.append("–" if m is None else f"{m['nll']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    base_label, base = runs[0]
    for label, run in runs[1:]:
        diff = paired_difference(load_items(run["path"]), load_items(base["path"]))
        lines += [
            "",
            f"paired difference NLL({label}) − NLL({base_label}) (negative: {label} fits better)",
            "",
            "| lang | items | difference | 95% CI |",
            "|---|---|---|---|",
        ]
        for lang, d in diff.items():
            lines.append(
                f"| {lang} | {d['items']} | {d['diff']:+.4f} | [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |"
            )
    return "\n".join(lines)


def layer_histograms(runs: list[tuple[str, dict]]) -> dict[str, dict]:
    """Decision Maker layer choices per run and language, from benchmark or NLL runs:
    ``{label: {"num_layers": L or None, "counts": {lang: {layer: count}}}}``."""
    out: dict[str, dict] = {}
    for label, run in runs:
        if run["kind"] == "benchmarks":
            counts = run.get("layer_choice") or {}
        else:
            counts = {}
            for item in load_items(run["path"]):
                if item.get("layer") is not None:
                    per = counts.setdefault(item["lang"] or "?", {})
                    per[str(item["layer"])] = per.get(str(item["layer"]), 0) + 1
        if counts:
            out[label] = {
                "num_layers": run.get("num_layers") or _model_depth(run.get("model")),
                "counts": counts,
            }
    return out


def _model_depth(model: str | None) -> int | None:
    """The evaluated CC-Tuning folder's layer count, for runs written before ``num_layers`` was recorded."""
    try:
        config = json.loads((Path(model) / "cctuning_config.json").read_text(encoding="utf-8"))
        return int(config["num_layers"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def layer_grid(hist: dict) -> tuple[list[str], list[list[float]]]:
    """Rows: languages (sorted); columns: every layer of the model (up to the highest chosen when the
    run does not record the model's depth); cells: the share of that language's choices."""
    per_lang = hist["counts"]
    highest = max(int(k) for counts in per_lang.values() for k in counts)
    width = max(hist.get("num_layers") or 0, highest + 1)
    langs = sorted(per_lang)
    grid = [
        [per_lang[lang].get(str(k), 0) / sum(per_lang[lang].values()) for k in range(width)] for lang in langs
    ]
    return langs, grid


def plot_layers(hists: dict[str, dict], path: Path) -> None:
    """One heatmap per run: share of each layer (columns) chosen per language (rows)."""
    plt = _pyplot()

    heights = [0.9 + 0.28 * len(hist["counts"]) for hist in hists.values()]
    fig, axes = plt.subplots(
        len(hists), 1, figsize=(9, sum(heights) + 0.6), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (label, hist) in zip(axes[:, 0], hists.items()):
        langs, grid = layer_grid(hist)
        width = len(grid[0])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(langs)), langs, fontsize=7)
        ax.set_xticks(range(width), [str(k) for k in range(width)], fontsize=6)
        ax.set_title(f"layer chosen by the Decision Maker (share per language): {label}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("layer")
    _save(plt, fig, path, dpi=110)


def build_report(run_dirs: list[str], output: str | Path) -> tuple[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` (plus ``layers.png`` when runs carry
    layer choices) into ``output``; returns (Markdown text, path of the main plot)."""
    if not run_dirs:
        raise CCError("give at least one evaluation run folder")
    loaded = [(p, load_run(p)) for p in run_dirs]
    runs = [(run_label(run, p), run) for p, run in loaded]
    if len({label for label, _ in runs}) != len(runs):
        runs = [(f"{i + 1}: {label}", run) for i, (label, run) in enumerate(runs)]
    bench_runs = [(label, run) for label, run in runs if run["kind"] == "benchmarks"]
    nll_runs = [(label, run) for label, run in runs if run["kind"] == "nll"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    parts, png = [], out / "report.png"
    if bench_runs:
        labels = [label for label, _ in bench_runs]
        rows = comparison_rows(bench_runs)
        parts.append(markdown(rows, labels))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["benchmark", "lang", "metric", *labels])
        writer.writeheader()
        writer.writerows(rows)
        write_text(out / "report.csv", buf.getvalue())
        plot(rows, labels, png)
    if nll_runs:
        parts.append(nll_markdown(nll_runs))
        if not bench_runs:
            plot_nll(nll_runs, png)
    hists = layer_histograms(runs)
    if hists:
        plot_layers(hists, out / "layers.png")
    table = "\n\n".join(parts)
    write_text(out / "report.md", table + "\n")
    return table, png


def plot_nll(runs: list[tuple[str, dict]], path: Path) -> None:
    """Grouped bars of NLL per language with the bootstrap intervals as error bars."""
    plt = _pyplot()

    langs: list[str] = []
    for _, run in runs:
        langs += [lang for lang in run["nll"] if lang not in langs]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(langs) * len(runs)), 4))
    for i, (label, run) in enumerate(runs):
        present = [(j, run["nll"][lang]) for j, lang in enumerate(langs) if lang in run["nll"]]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, _ in present]
        ys = [m["nll"] for _, m in present]
        err = [[m["nll"] - m["ci_low"] for _, m in present], [m["ci_high"] - m["nll"] for _, m in present]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylabel("held-out NLL per token (95% CI)")
    ax.legend(fontsize=8)
    _save(plt, fig, path, dpi=120)
