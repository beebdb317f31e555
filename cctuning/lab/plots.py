"""The figures of ``cctuning report`` (:mod:`cctuning.lab.report`): the runs' scores or NLL
(``report.png``), the Decision Maker's layer choice per language (``layers.png``), the connection's
gain (``connection_gain.png``), its choices over training (``training_choices.png``) and the
injected vector's norm against the residual's (``norms.png``).

The diagnostics' plots return the numbers they drew, read back from the figure's artists (lines,
bars, error bars, images: :func:`drawn`), so that tests compare what is plotted with a computation
of their own.
"""

from __future__ import annotations

from pathlib import Path

from cctuning.io import atomic_path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed). Deferred: the CLI builds
    ``cctuning report``'s options from :mod:`cctuning.lab.report`, which imports this module, so a
    module-level import would add matplotlib's 0.5 s (measured after the CLI's own imports) to every
    command."""
    import matplotlib  # deferred: only drawing needs it, 0.5 s at every command's start-up (see above)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after matplotlib.use("Agg"), which must come first

    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    """Write the figure atomically as PNG and release it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


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


# -- the diagnostics -------------------------------------------------------------------------------
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
