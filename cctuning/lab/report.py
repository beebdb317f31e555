"""``cctuning report RUN_DIR...``: several evaluation runs side by side, as a table and a plot,
plus the connection's diagnostics (:mod:`cctuning.lab.diagnostics`), drawn by :mod:`cctuning.lab.plots`.

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
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval.nll import NLL_NAME, load_items, paired_difference
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import write_json, write_text
from cctuning.lab import diagnostics
from cctuning.lab.plots import (
    plot,
    plot_connection_gain,
    plot_layers,
    plot_nll,
    plot_norms,
    plot_training_choices,
)
from cctuning.loading import load_for_inference

logger = logging.getLogger(__name__)


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
    runs = _labelled_runs([p for p in run_dirs if p not in training_dirs])
    bench_runs = [(label, run) for label, run in runs if run["kind"] == "benchmarks"]
    nll_runs = [(label, run) for label, run in runs if run["kind"] == "nll"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    if bench_runs:
        sections.append(_bench_section(bench_runs, out))
    if nll_runs:
        sections.append(_nll_section(nll_runs, out, draw=not bench_runs))
    hists = layer_histograms(runs)
    if hists:
        plot_layers(hists, out / "layers.png")
    if training_dirs:
        sections.append(_training_section(training_dirs, out))
    if norms is not None:
        sections.append(_norms_section(norms, data, samples, norms_connection, trust_remote_code, out))
    table = "\n\n".join(part for parts, _ in sections for part in parts)
    plots = [file for _, files in sections for file in files]
    write_text(out / "report.md", table + "\n")
    for file in plots[1:]:
        logger.info("plot: %s", file)
    return table, plots[0] if plots else out / "report.md"


# a section of the report: its Markdown parts and the plots it drew
_Section = tuple[list[str], list[Path]]


def _labelled_runs(run_dirs: list[str]) -> list[tuple[str, dict]]:
    """The evaluation runs loaded, each with its label (numbered when two labels would be the same)."""
    runs = [(run_label(run, p), run) for p, run in ((p, load_run(p)) for p in run_dirs)]
    if len({label for label, _ in runs}) != len(runs):
        runs = [(f"{i + 1}: {label}", run) for i, (label, run) in enumerate(runs)]
    return runs


def _bench_section(bench_runs: list[tuple[str, dict]], out: Path) -> _Section:
    """The benchmark runs' table (``report.md``, ``report.csv``) and bars (``report.png``)."""
    labels = [label for label, _ in bench_runs]
    rows = comparison_rows(bench_runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["benchmark", "lang", "metric", *labels])
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "report.csv", buf.getvalue())
    plot(rows, labels, out / "report.png")
    return [markdown(rows, labels)], [out / "report.png"]


def _nll_section(nll_runs: list[tuple[str, dict]], out: Path, draw: bool) -> _Section:
    """The NLL runs' table (bars in ``report.png`` when ``draw``: no benchmark run drew it) and the
    connection's gain wherever a run has a partner without the connection."""
    parts, plots = [nll_markdown(nll_runs)], []
    if draw:
        plot_nll(nll_runs, out / "report.png")
        plots.append(out / "report.png")
    gain = gain_report(nll_runs)
    if gain["pairs"]:
        write_json(out / diagnostics.CONNECTION_GAIN_NAME, gain)
        plot_connection_gain(gain, out / "connection_gain.png")
        parts.append(gain_markdown(gain))
        plots.append(out / "connection_gain.png")
    return parts, plots


def _training_section(training_dirs: list[str], out: Path) -> _Section:
    """The Decision Maker's choices over each training run (``training_choices.json`` / ``.png``)."""
    names = [Path(p).name or str(p) for p in training_dirs]
    if len(set(names)) != len(names):
        names = [f"{i + 1}: {n}" for i, n in enumerate(names)]
    choices = {n: diagnostics.training_choices(p) for n, p in zip(names, training_dirs)}
    write_json(out / diagnostics.TRAINING_CHOICES_NAME, {"runs": choices})
    plot_training_choices(choices, out / "training_choices.png")
    return [training_markdown(choices)], [out / "training_choices.png"]


def _norms_section(
    norms, data, samples: int, connection: str | None, trust_remote_code: bool, out: Path
) -> _Section:
    """The connection norms of the model folder ``norms`` on up to ``samples`` prompts of ``data``
    (``norms.json`` / ``.png``)."""
    model, tokenizer, _ = load_for_inference(str(norms), trust_remote_code)
    measured = diagnostics.connection_norms(model, tokenizer, data, connection=connection, samples=samples)
    measured = {"model": str(norms), "data": str(data), **measured}
    write_json(out / diagnostics.NORMS_NAME, measured)
    plot_norms(measured, out / "norms.png")
    return [norms_markdown(measured)], [out / "norms.png"]


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


# -- the diagnostics' tables -------------------------------------------------------------------------
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
