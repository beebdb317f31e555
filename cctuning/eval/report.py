"""``cctuning report RUN_DIR...``: several evaluation runs side by side, as a table and a plot,
plus the connection's diagnostics (:mod:`cctuning.eval.diagnostics`).

Files written into the output folder:

* ``report.md``, ``report.csv``, ``report.png``: the runs' scores (benchmarks) or NLL per language;
* ``layers.png``: the Decision Maker's layer choice per language (evaluation runs);
* ``connection_gain.png`` / ``.json``: for every NLL run with a connection that has a partner run with
  connection ``none`` (same model, same data file): per language ``NLL(with) − NLL(none)`` with its
  paired bootstrap 95% interval as bars; **below 0 the connection helps**;
* ``training_choices.png`` / ``.json``: for training run folders given among the runs: the
  Decision Maker's entropy (bits) and top layer per logged step (from the newest
  ``trainer_state.json``, the run's or its newest checkpoint's) and the whole-run share of each layer
  (``layer_choice.json``); a per-window distribution is drawn as a heatmap when the log holds one;
* ``norms.png`` / ``norms.json`` (``norms=MODEL_DIR, data=FILE``): per layer l, the norm of the
  vector the connection would add if l were chosen against the norm of the residual ``h_k[p]`` it
  is added to (log scale), mean and 10th–90th percentile band over prompts; below, their ratio.

Every plot function returns the numbers it drew, read back from the figure's artists (lines, bars,
error bars, images), so that tests compare what is plotted with a computation of their own.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval import diagnostics
from cctuning.eval.nll import NLL_NAME, load_items, paired_difference
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import atomic_path, write_json, write_text

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
    raise CCError(
        f"{path}: no {RESULTS_NAME} or {NLL_NAME} (run `cctuning eval --output {path}` first), "
        "and not a training run folder"
    )


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


def build_report(
    run_dirs: list[str],
    output: str | Path,
    norms: str | Path | None = None,
    data: str | Path | None = None,
    samples: int = 200,
    norms_connection: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[str, Path]:
    """Write ``report.md`` and the plots of the module docstring into ``output``; returns (Markdown
    text, path of the main plot). ``run_dirs``: evaluation run folders (benchmarks or NLL) and
    training run folders (told apart by their files). ``norms``: a CC-Tuning model folder whose
    connection norms are measured on up to ``samples`` prompts of ``data``."""
    if not run_dirs and norms is None:
        raise CCError("give at least one evaluation or training run folder, or --norms MODEL --data FILE")
    if norms is not None and data is None:
        raise CCError("--norms needs --data FILE (records whose prompts are measured)")
    training_dirs = [p for p in run_dirs if not _has_eval_files(p) and diagnostics.is_training_run(p)]
    loaded = [(p, load_run(p)) for p in run_dirs if p not in training_dirs]
    runs = [(run_label(run, p), run) for p, run in loaded]
    if len({label for label, _ in runs}) != len(runs):
        runs = [(f"{i + 1}: {label}", run) for i, (label, run) in enumerate(runs)]
    bench_runs = [(label, run) for label, run in runs if run["kind"] == "benchmarks"]
    nll_runs = [(label, run) for label, run in runs if run["kind"] == "nll"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    parts, plots = [], []
    if bench_runs:
        labels = [label for label, _ in bench_runs]
        rows = comparison_rows(bench_runs)
        parts.append(markdown(rows, labels))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["benchmark", "lang", "metric", *labels])
        writer.writeheader()
        writer.writerows(rows)
        write_text(out / "report.csv", buf.getvalue())
        plot(rows, labels, out / "report.png")
        plots.append(out / "report.png")
    if nll_runs:
        parts.append(nll_markdown(nll_runs))
        if not bench_runs:
            plot_nll(nll_runs, out / "report.png")
            plots.append(out / "report.png")
        gain = gain_report(nll_runs)
        if gain["pairs"]:
            write_json(out / diagnostics.CONNECTION_GAIN_NAME, gain)
            plot_connection_gain(gain, out / "connection_gain.png")
            parts.append(gain_markdown(gain))
            plots.append(out / "connection_gain.png")
    hists = layer_histograms(runs)
    if hists:
        plot_layers(hists, out / "layers.png")
    if training_dirs:
        names = [Path(p).name or str(p) for p in training_dirs]
        if len(set(names)) != len(names):
            names = [f"{i + 1}: {n}" for i, n in enumerate(names)]
        choices = {n: diagnostics.training_choices(p) for n, p in zip(names, training_dirs)}
        write_json(out / diagnostics.TRAINING_CHOICES_NAME, {"runs": choices})
        plot_training_choices(choices, out / "training_choices.png")
        parts.append(training_markdown(choices))
        plots.append(out / "training_choices.png")
    if norms is not None:
        from cctuning.loading import load_for_inference

        model, tokenizer, _ = load_for_inference(str(norms), trust_remote_code)
        measured = diagnostics.connection_norms(
            model, tokenizer, data, connection=norms_connection, samples=samples
        )
        measured = {"model": str(norms), "data": str(data), **measured}
        write_json(out / diagnostics.NORMS_NAME, measured)
        plot_norms(measured, out / "norms.png")
        parts.append(norms_markdown(measured))
        plots.append(out / "norms.png")
    table = "\n\n".join(parts)
    write_text(out / "report.md", table + "\n")
    for file in plots[1:]:
        logger.info("plot: %s", file)
    return table, plots[0] if plots else out / "report.md"


def _has_eval_files(path: str | Path) -> bool:
    path = Path(path)
    return any((path / name).is_file() or path.name == name for name in (RESULTS_NAME, NLL_NAME))


def add_arguments(parser) -> None:
    """The options of ``cctuning report`` (the CLI's ``report`` sub-command)."""
    parser.add_argument(
        "runs",
        nargs="*",
        help="evaluation run folders (results.json or nll.json) and training run folders "
        "(trainer_state.json / layer_choice.json, also in checkpoint-*)",
    )
    parser.add_argument("--output", default="report", help="folder for report.md, report.csv and the plots")
    parser.add_argument(
        "--norms",
        metavar="MODEL_DIR",
        help="CC-Tuning model folder: plot the injected vector's norm against the residual's, per layer",
    )
    parser.add_argument("--data", metavar="FILE", help="records whose prompts --norms measures")
    parser.add_argument("--samples", type=int, default=200, help="prompts --norms measures (seeded sample)")
    parser.add_argument(
        "--norms-connection",
        choices=["english", "transform"],
        help="measure one connection only (default: every one the model and the data allow)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")


def build_report_from_args(args) -> tuple[str, Path]:
    """:func:`build_report` with the options of :func:`add_arguments`."""
    return build_report(
        args.runs,
        args.output,
        norms=args.norms,
        data=args.data,
        samples=args.samples,
        norms_connection=args.norms_connection,
        trust_remote_code=args.trust_remote_code,
    )


# -- reading a figure back -------------------------------------------------------------------------
def drawn(fig) -> dict:
    """The numbers a figure shows, read back from its artists, per axis (keyed by title, else index):
    ``lines`` ``{label: {"x", "y"}}``, ``bars`` ``{label: {"x", "height", "err"}}`` (err: the
    [low, high] ends of each error bar, or None), ``images`` (arrays), ``hlines`` and ``yscale``."""
    out = {}
    for i, ax in enumerate(fig.axes):
        if ax.get_label() == "<colorbar>":
            continue
        lines = {}
        hlines = []
        for line in ax.get_lines():
            x, y = [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]
            label = line.get_label()
            if label.startswith("_"):
                if len(set(y)) == 1 and line.get_linestyle() in ("--", ":"):
                    hlines.append(y[0])
                continue
            lines[label] = {"x": x, "y": y}
        bars = {}
        for container in ax.containers:
            if not hasattr(container, "patches"):
                continue
            err = None
            if getattr(container, "errorbar", None) is not None:
                segments = container.errorbar.lines[2][0].get_segments()
                err = [[float(min(s[:, 1])), float(max(s[:, 1]))] for s in segments]
            bars[container.get_label()] = {
                "x": [float(p.get_x() + p.get_width() / 2) for p in container.patches],
                "height": [float(p.get_height()) for p in container.patches],
                "err": err,
            }
        images = [im.get_array().tolist() for im in ax.get_images()]
        out[ax.get_title() or str(i)] = {
            "lines": lines,
            "bars": bars,
            "images": images,
            "hlines": hlines,
            "yscale": ax.get_yscale(),
        }
    return out


# -- connection gain ---------------------------------------------------------------------------------
def gain_report(nll_runs: list[tuple[str, dict]]) -> dict:
    """``{"sign", "pairs": [{"label", "with", "without", "connection", "model", "data", "per_language"}]}``
    for every NLL run with a connection and its ``none`` partner (:func:`diagnostics.gain_pairs`)."""
    pairs = []
    for (label, run), (base_label, base) in diagnostics.gain_pairs(nll_runs):
        pairs.append(
            {
                "label": f"{label} − {base_label}",
                "with": run["path"],
                "without": base["path"],
                "connection": run["connection"],
                "model": run.get("model"),
                "data": run.get("data"),
                "per_language": diagnostics.connection_gain(run["path"], base["path"]),
            }
        )
    return {"sign": diagnostics.GAIN_SIGN, "pairs": pairs}


def gain_markdown(gain: dict) -> str:
    lines = []
    for pair in gain["pairs"]:
        lines += [
            f"connection gain {pair['label']}: NLL with connection '{pair['connection']}' minus NLL "
            "without (negative: the connection helps)",
            "",
            "| lang | items | difference | 95% CI |",
            "|---|---|---|---|",
        ]
        for lang, d in pair["per_language"].items():
            lines.append(
                f"| {lang} | {d['items']} | {d['diff']:+.4f} | [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_connection_gain(gain: dict, path: Path) -> dict:
    """Grouped bars per language: ``NLL(with) − NLL(none)`` per pair, 95% interval as error bars, a
    line at 0. Returns :func:`drawn`."""
    plt = _pyplot()

    pairs = gain["pairs"]
    langs: list[str] = []
    for pair in pairs:
        langs += [lang for lang in pair["per_language"] if lang not in langs]
    width = 0.8 / len(pairs)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(langs) * len(pairs)), 4))
    for i, pair in enumerate(pairs):
        present = [
            (j, pair["per_language"][lang]) for j, lang in enumerate(langs) if lang in pair["per_language"]
        ]
        xs = [j + (i - (len(pairs) - 1) / 2) * width for j, _ in present]
        ys = [d["diff"] for _, d in present]
        err = [[d["diff"] - d["ci_low"] for _, d in present], [d["ci_high"] - d["diff"] for _, d in present]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=pair["label"])
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylabel("NLL(with) − NLL(none) per token\n(95% CI; below 0: the connection helps)")
    ax.set_title("connection gain per language")
    ax.legend(fontsize=8)
    shown = drawn(fig)
    _save(plt, fig, path, dpi=120)
    return shown


# -- the Decision Maker over training --------------------------------------------------------------
def training_markdown(choices: dict[str, dict]) -> str:
    lines = [
        "Decision Maker over training (entropy in bits of the choices per log window; max = uniform)",
        "",
        "| run | logs | first entropy | last entropy | max | last top layer | whole-run top layer (share) |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(x):
        return "–" if x is None else f"{x:.2f}"

    for name, c in choices.items():
        ent = c["layer_entropy"]
        top = "–"
        if c["share"]:
            k = max(range(len(c["share"])), key=c["share"].__getitem__)
            top = f"{k} ({100 * c['share'][k]:.0f}%)"
        first, last = (ent[0], ent[-1]) if ent else (None, None)
        last_top = c["layer_top"][-1] if c["layer_top"] else "–"
        lines.append(
            f"| {name} | {len(ent)} | {num(first)} | {num(last)} | {num(c['max_entropy_bits'])} | "
            f"{last_top} | {top} |"
        )
    return "\n".join(lines)


def plot_training_choices(choices: dict[str, dict], path: Path) -> dict:
    """Per training run (one row): entropy over steps (bits; dashed: uniform ``log2 L`` and 0), the
    top layer per log window over steps (over the per-window shares as a heatmap when logged), and
    the whole-run share of each layer. Returns :func:`drawn`."""
    plt = _pyplot()

    fig, axes = plt.subplots(len(choices), 3, figsize=(13, 3.2 * len(choices)), squeeze=False)
    for row, (name, c) in zip(axes, choices.items()):
        ax_e, ax_t, ax_s = row
        if c["steps"]:
            ax_e.plot(c["steps"], c["layer_entropy"], marker=".", label="entropy")
        else:
            ax_e.text(0.5, 0.5, "no layer_entropy logged", ha="center", va="center", transform=ax_e.transAxes)
        if c["max_entropy_bits"] is not None:
            ax_e.axhline(c["max_entropy_bits"], color="grey", linestyle="--", linewidth=0.8)
        ax_e.axhline(0, color="grey", linestyle=":", linewidth=0.8)
        ax_e.set_title(f"{name}: choice entropy", fontsize=9)
        ax_e.set_xlabel("step")
        ax_e.set_ylabel("bits (dashed: uniform)")
        if c["windows"]:
            grid = [[w["share"][k] for w in c["windows"]] for k in range(len(c["windows"][0]["share"]))]
            steps = [w["step"] for w in c["windows"]]
            ax_t.imshow(
                grid,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=0,
                vmax=1,
                interpolation="nearest",
                extent=(-0.5, len(steps) - 0.5, -0.5, len(grid) - 0.5),
            )
            ax_t.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=6)
            index = {s: i for i, s in enumerate(steps)}
            pts = [(index[s], t) for s, t in zip(c["steps"], c["layer_top"]) if s in index]
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "w.", label="top layer")
        elif c["steps"]:
            ax_t.plot(c["steps"], c["layer_top"], marker="o", linestyle="-", linewidth=0.6, label="top layer")
        if c["num_layers"]:
            ax_t.set_ylim(-0.5, c["num_layers"] - 0.5)
        ax_t.set_title(f"{name}: most chosen layer per log window", fontsize=9)
        ax_t.set_xlabel("step" if not c["windows"] else "log window (step)")
        ax_t.set_ylabel("layer")
        if c["share"]:
            ax_s.bar(range(len(c["share"])), c["share"], label="whole run")
            ax_s.set_xticks(range(len(c["share"])), [str(k) for k in range(len(c["share"]))], fontsize=6)
        else:
            ax_s.text(0.5, 0.5, "no layer_choice.json", ha="center", va="center", transform=ax_s.transAxes)
        ax_s.set_title(f"{name}: share of each layer, whole run", fontsize=9)
        ax_s.set_xlabel("layer")
        ax_s.set_ylabel("share of choices")
    shown = drawn(fig)
    _save(plt, fig, path, dpi=110)
    return shown


# -- injected vector vs residual ---------------------------------------------------------------------
def norms_markdown(m: dict) -> str:
    names = list(m["connections"])
    res = m["residual"]
    lines = [
        f"connection norms: ‖vector added if layer l is chosen‖ vs ‖h_{m['inject_layer']}[p]‖ "
        f"(residual mean {res['mean']:.3g}, median {res['median']:.3g}; {m['samples']} prompts, "
        f"fusion {m['fusion']})",
        "",
        "| layer | " + " | ".join(f"‖c‖ {c} (mean) | ratio {c} (median)" for c in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for layer in range(m["num_layers"]):
        cells = []
        for c in names:
            entry = m["connections"][c]
            cells += [f"{entry['vector'][layer]['mean']:.3g}", f"{entry['ratio'][layer]['median']:.3g}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_norms(m: dict, path: Path) -> dict:
    """Top: per layer, the mean norm of the vector each connection would add (10th–90th percentile
    band) and the residual's mean norm (flat, with its band), log scale; with a fusion other than
    ``add`` also what the fusion really adds (dashed). Bottom: the median ratio ‖c‖ / ‖h‖ (band:
    10th–90th percentile), a line at 1. Returns :func:`drawn`."""
    plt = _pyplot()

    layers = list(range(m["num_layers"]))
    res = m["residual"]
    fig, (ax, ax_r) = plt.subplots(2, 1, figsize=(max(7, 0.3 * len(layers)), 7), sharex=True)
    ax.plot(layers, [res["mean"]] * len(layers), color="black", label=f"‖h_{m['inject_layer']}[p]‖ residual")
    ax.fill_between(layers, res["p10"], res["p90"], color="black", alpha=0.1)
    for c, entry in m["connections"].items():
        vec = entry["vector"]
        (line,) = ax.plot(layers, [s["mean"] for s in vec], marker=".", label=f"‖c‖ {c}")
        ax.fill_between(
            layers, [s["p10"] for s in vec], [s["p90"] for s in vec], color=line.get_color(), alpha=0.15
        )
        if "added" in entry:
            ax.plot(
                layers,
                [s["mean"] for s in entry["added"]],
                linestyle="--",
                color=line.get_color(),
                label=f"added by fusion {m['fusion']} ({c})",
            )
        ratio = entry["ratio"]
        ax_r.plot(layers, [s["median"] for s in ratio], marker=".", color=line.get_color(), label=f"{c}")
        ax_r.fill_between(
            layers, [s["p10"] for s in ratio], [s["p90"] for s in ratio], color=line.get_color(), alpha=0.15
        )
    ax.set_yscale("log")
    ax.set_ylabel("L2 norm (mean; band 10–90%)")
    ax.set_title(
        f"vector added after layer {m['inject_layer']} if layer l is chosen, vs the residual "
        f"({m['samples']} prompts)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax_r.axhline(1, color="grey", linestyle="--", linewidth=0.8)
    ax_r.set_yscale("log")
    ax_r.set_ylabel("‖c‖ / ‖h‖ (median; band 10–90%)")
    ax_r.set_xlabel("layer l (the Decision Maker's choice)")
    ax_r.set_title("ratio to the residual", fontsize=9)
    ax_r.set_xticks(layers, [str(k) for k in layers], fontsize=6)
    ax_r.legend(fontsize=8)
    shown = drawn(fig)
    _save(plt, fig, path, dpi=110)
    return shown


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
