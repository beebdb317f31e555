"""The experiment's report: every cell summarized over its seeds (:func:`summarize_experiment`),
as ``report.json`` and as the Markdown tables of ``report.md`` (:func:`experiment_markdown`)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from cctuning.eval.nll import NLL_NAME, load_items, paired_difference, paired_difference_over_seeds
from cctuning.io import write_json, write_text
from cctuning.lab.experiment.config import ExperimentConfig, answer_benchmarks
from cctuning.stats import mean_interval
from cctuning.versions import versions


def _write_report(
    cfg: ExperimentConfig,
    root: Path,
    cell_runs: dict,
    stages: dict,
    seconds: float,
    model_path,
    parallel_jobs: int = 0,
) -> dict:
    """Summarize every cell over its seeds and write ``report.json`` and ``report.md``
    (``parallel_jobs``: how many job folders of a parallel run the evaluations came from)."""
    baseline = cfg.baseline or cfg.cells[0]["name"]
    report = summarize_experiment(cfg, cell_runs, baseline)
    report["seconds_this_invocation"] = round(seconds, 1)
    report["stage_seconds"] = stages
    if parallel_jobs:
        report["parallel_jobs"] = parallel_jobs
    report["setup"] = {
        "model": cfg.model,
        "model_path": str(model_path),
        "train": cfg.train,
        "train_per_lang": cfg.train_per_lang,
        "heldout_per_lang": cfg.heldout_per_lang,
        "heldout_seed": cfg.heldout_seed,
        "langs": cfg.langs,
        "matrix_samples": cfg.matrix_samples,
        # the pairs each fitted matrix was fitted on and held out, over cells and seeds (distinct values)
        "matrix_pairs": sorted(
            {
                (m["fit"], m["heldout"])
                for runs in cell_runs.values()
                for r in runs.values()
                if (m := r.get("matrix"))
            }
        ),
        "heldout_max_length": cfg.heldout_max_length,
        "benchmarks": cfg.benchmarks,
        "answer_nll": cfg.answer_nll,
    }
    report["date"] = time.strftime("%Y-%m-%d")
    report["versions"] = versions()
    write_json(root / "report.json", report)
    write_text(root / "report.md", experiment_markdown(report) + "\n")
    return report


# -- summaries -------------------------------------------------------------------------------------
def _nll_summary(nlls: dict, dirs: dict, base_dirs: dict | None, load) -> dict:
    """One cell's NLL runs over seeds (``nlls``: seed -> nll.json, ``dirs``: seed -> its folder):
    per language the mean and t-interval over seeds; against the baseline's runs of the same
    seeds (``base_dirs``), the paired difference per seed averaged with a t-interval over seeds
    (the bootstrap interval over items when there is one seed), and with several seeds the pooled
    difference with a bootstrap over seeds and items (:func:`~cctuning.eval.nll.paired_difference_over_seeds`).
    ``load`` reads a run's items (the caller's, so that it can read each folder once)."""
    langs = list(next(iter(nlls.values()))["nll"])
    out: dict = {
        "nll": {lang: mean_interval([n["nll"][lang]["nll"] for n in nlls.values()]) for lang in langs}
    }
    seeds = sorted(dirs)
    if len(seeds) > 1:
        # how far apart two trainings of the same cell land: the scale of a difference between
        # cells that seeds alone can make (overall, with the paired bootstrap over items)
        out["between_seeds"] = {}
        for i, a in enumerate(seeds):
            for b in seeds[i + 1 :]:
                v = paired_difference(load(dirs[b]), load(dirs[a]), seed=a)["all"]
                out["between_seeds"][f"{b}-{a}"] = {
                    "mean": v["diff"], "ci_low": v["ci_low"], "ci_high": v["ci_high"], "n": 1
                }  # fmt: skip
    if base_dirs is None:
        return out
    diffs: dict[str, list[float]] = {}
    pairs = []
    for seed, run_dir in dirs.items():
        pair = (load(run_dir), load(base_dirs[seed]))
        pairs.append(pair)
        d = paired_difference(*pair, seed=seed)
        for lang, v in d.items():
            diffs.setdefault(lang, []).append(v["diff"])
    out["diff"] = {lang: mean_interval(v) for lang, v in diffs.items()}
    if len(dirs) == 1:
        # one seed has no spread over seeds: give the bootstrap interval over items instead
        for lang, v in d.items():
            out["diff"][lang].update(
                ci_low=v["ci_low"], ci_high=v["ci_high"], interval="bootstrap over items"
            )
    else:
        out["pooled"] = {
            lang: {"mean": v["diff"], "ci_low": v["ci_low"], "ci_high": v["ci_high"], "n": v["seeds"]}
            for lang, v in paired_difference_over_seeds(pairs, seed=min(dirs)).items()
        }
    return out


# the keys of :func:`_nll_summary` and the report's names of them for the held-out NLL
_HELDOUT_KEYS = (
    ("between_seeds", "nll_between_seeds"),
    ("diff", "nll_diff_to_baseline"),
    ("pooled", "nll_diff_pooled"),
)


def _heldout_summary(per_seed: dict, base_dirs: dict | None, load) -> dict:
    """A cell's held-out NLL over its seeds, as the report's keys name it: ``nll``, and where they
    apply ``nll_between_seeds``, ``nll_diff_to_baseline`` and ``nll_diff_pooled``."""
    s = _nll_summary(
        {seed: r["nll"] for seed, r in per_seed.items()},
        {seed: r["nll_dir"] for seed, r in per_seed.items()},
        base_dirs,
        load,
    )
    cell: dict = {"nll": s["nll"]}
    for key, name in _HELDOUT_KEYS:
        if key in s:
            cell[name] = s[key]
    return cell


def _answer_summary(bench_name: str, per_seed: dict, base: dict, paired: bool, load) -> dict | None:
    """A cell's likelihood of a benchmark's gold answers over its seeds (:func:`_nll_summary`,
    ``paired`` with the baseline's); None unless every seed of the cell (and, ``paired``, of the
    baseline) has it."""
    dirs = {seed: r.get("answer_nll", {}).get(bench_name) for seed, r in per_seed.items()}
    base_dirs = {seed: base.get(seed, {}).get("answer_nll", {}).get(bench_name) for seed in per_seed}
    if any(d is None for d in dirs.values()) or (paired and any(d is None for d in base_dirs.values())):
        return None  # not every seed of the cell (or of the baseline) has it yet
    return _nll_summary(
        {seed: json.loads((Path(d) / NLL_NAME).read_text(encoding="utf-8")) for seed, d in dirs.items()},
        dirs,
        base_dirs if paired else None,
        load,
    )


def _benchmark_summary(per_seed: dict) -> dict | None:
    """Per benchmark, its primary metric's mean and t-interval over seeds, averaged over languages
    and per language; None unless every seed has benchmark results."""
    benches = [r["bench"] for r in per_seed.values()]
    first = benches[0] if all(b is not None for b in benches) else None  # every seed, or none
    if first is None:
        return None
    out = {}
    for bench, data in first["benchmarks"].items():
        metric = first["primary_metric"][bench]
        scores = [r["bench"]["benchmarks"][bench] for r in per_seed.values()]
        out[bench] = {
            "metric": metric,
            "average": mean_interval([s["average"][metric] for s in scores]),
            "per_language": {
                lang: mean_interval([s["per_language"][lang][metric] for s in scores])
                for lang in data["per_language"]
            },
        }
    return out


def summarize_experiment(cfg, cell_runs, baseline) -> dict:
    """Mean and interval over seeds per cell; paired differences to the baseline per language, for
    the held-out NLL and for each benchmark's answer likelihood."""
    # every cell is paired with the baseline's runs: read each run's items once
    load = functools.cache(lambda run_dir: load_items(Path(run_dir)))

    out: dict = {"baseline": baseline, "seeds": cfg.seeds, "cells": {}}
    for name, per_seed in cell_runs.items():
        base = cell_runs.get(baseline, {})
        paired = name != baseline
        base_dirs = {seed: base[seed]["nll_dir"] for seed in per_seed} if paired else None
        cell = _heldout_summary(per_seed, base_dirs, load)
        for bench_name in answer_benchmarks(cfg):
            s = _answer_summary(bench_name, per_seed, base, paired, load)
            if s is not None:
                cell.setdefault("answer_nll", {})[bench_name] = s
        benchmarks = _benchmark_summary(per_seed)
        if benchmarks is not None:
            cell["benchmarks"] = benchmarks
        cell["training"] = _training_summary(per_seed)
        out["cells"][name] = cell
    return out


def _training_summary(per_seed: dict) -> dict:
    """A cell's training budget per seed (its augment, examples and optimizer steps: ``--augment
    english-prompt`` doubles the examples, and with them the steps of an epoch) and, for a model
    trained with ``bilingual-prompt``, how its held-out prompts were rendered."""
    seeds = {seed: r.get("training") for seed, r in per_seed.items()}
    first = next(iter(per_seed.values()))["nll"]
    out: dict = {
        "augment": next((t["augment"] for t in seeds.values() if t), "none"),
        "examples": {str(s): t and t["examples"] for s, t in seeds.items()},
        "steps": {str(s): t and t["steps"] for s, t in seeds.items()},
    }
    if "english_withheld" in first:
        out["english_withheld"] = first["english_withheld"]
        out["heldout_prompts_without_english"] = first["prompts_without_english"]
    return out


# -- Markdown --------------------------------------------------------------------------------------
def _fmt(m: dict, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(scale * m["mean"], spec)
    if m["ci_low"] is not None:
        text += f" [{format(scale * m['ci_low'], spec)}, {format(scale * m['ci_high'], spec)}]"
    return text


def _nll_tables(
    title: str, nll: dict, diff: dict, pooled: dict, baseline: str, n_seeds: int, between: dict | None = None
) -> list[str]:
    """An NLL table (language × cell), the paired differences to the baseline, with several
    seeds the differences pooled over seeds and items, and ``between``: each cell's difference
    between its own seeds (overall)."""
    names = list(nll)
    langs = list(nll[names[0]])
    lines = [title, "", "| lang | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for lang in langs:
        lines.append(f"| {lang} | " + " | ".join(_fmt(nll[n][lang]) for n in names) + " |")
    tables = [
        (
            diff,
            f"Paired NLL difference to `{baseline}` on the same items (negative: better)"
            + (
                "; one seed, so the interval is a 95% bootstrap over items:"
                if n_seeds == 1
                else ", the mean over seeds [95% t-interval over seeds]:"
            ),
        ),
        (
            pooled,
            "The same difference pooled over the seeds, [95% bootstrap over seeds and items] (seeds and "
            "items drawn with replacement; coarse over seeds when there are few):",
        ),
    ]
    for table, caption in tables:
        if not table:
            continue
        others = list(table)
        lines += ["", caption, "", "| lang | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for lang in table[others[0]]:
            lines.append(f"| {lang} | " + " | ".join(_fmt(table[n][lang], sign=True) for n in others) + " |")
    if between:
        pairs = list(next(iter(between.values())))
        lines += [
            "",
            "Two trainings of the same cell with different seeds, overall (seed b − seed a on the same "
            "items [95% bootstrap over items]): the size of a difference that the seed alone makes.",
            "",
            "| cell | " + " | ".join(f"seed {p.replace('-', ' − seed ')}" for p in pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for n, d in between.items():
            lines.append(f"| {n} | " + " | ".join(_fmt(d[p], sign=True) for p in pairs) + " |")
    return lines


def _setup_lines(report: dict) -> list[str]:
    """The model, the date, the training budget and the evaluation sizes (reports with a setup)."""
    setup = report.get("setup")
    if not setup:
        return []
    budget = ", ".join(
        f"{k} {v}" for k, v in setup["train"].items() if k not in ("save_steps", "save_total_limit")
    )
    return [
        f"Model `{setup['model']}`; {report.get('date', '')}; training: {setup['train_per_lang']} records per "
        f"language ({setup['langs']} languages of the bundled mix, resampled per seed), {budget}; "
        f"{_matrix_words(setup)}; held-out NLL on {setup['heldout_per_lang']} records per language (the same "
        "for every seed)"
        + (f", within {setup['heldout_max_length']} tokens" if setup.get("heldout_max_length") else "")
        + ".",
        "",
    ]


def _matrix_words(setup: dict) -> str:
    """What the Transform Matrices were fitted on: the pairs fitted and held out (a range when cells or
    seeds differ), and the sample they were drawn as; a report from before the counts were recorded
    names the sample size only."""
    pairs = setup.get("matrix_pairs")
    if not pairs:
        return f"Transform Matrix on up to {setup['matrix_samples']} records"

    def span(values) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"

    fit, held = span([p[0] for p in pairs]), span([p[1] for p in pairs])
    return (
        f"Transform Matrix fitted on {fit} parallel pairs ({held} more held out to measure its error), "
        f"of up to {setup['matrix_samples']} sampled training records"
    )


def _time_lines(report: dict) -> list[str]:
    """The wall-clock time of every stage, summed over invocations, in all and per kind of stage."""
    stages = report.get("stage_seconds") or {}
    if not stages:
        return []
    kinds: dict[str, float] = {}
    for name, sec in stages.items():
        kinds[name.split("/")[0]] = kinds.get(name.split("/")[0], 0.0) + sec
    return [
        "Time (wall clock, summed over the stages of all invocations"
        + (
            f"; {report['parallel_jobs']} jobs ran as parallel processes, so less time passed"
            if report.get("parallel_jobs")
            else ""
        )
        + f"): {sum(stages.values()) / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in kinds.items())
        + ").",
        "",
    ]


def _answer_lines(report: dict) -> list[str]:
    """One set of :func:`_nll_tables` per benchmark whose gold answers' likelihood some cell has."""
    cells, names, seeds = report["cells"], list(report["cells"]), report["seeds"]
    lines = []
    for bench in dict.fromkeys(b for n in names for b in cells[n].get("answer_nll", {})):
        have = {n: cells[n]["answer_nll"][bench] for n in names if bench in cells[n].get("answer_nll", {})}
        lines += [""] + _nll_tables(
            f"{bench}: NLL per token of the gold answers (`eval --nll {bench}`; lower is better"
            + ("; cells without it for every seed are left out" if len(have) < len(names) else "")
            + "):",
            {n: a["nll"] for n, a in have.items()},
            {n: a["diff"] for n, a in have.items() if "diff" in a},
            {n: a["pooled"] for n, a in have.items() if "pooled" in a},
            report["baseline"],
            len(seeds),
            {n: a["between_seeds"] for n, a in have.items() if "between_seeds" in a},
        )
    return lines


def _benchmark_lines(cells: dict) -> list[str]:
    """The benchmarks' averages over languages per cell (×100; —: a cell without them for every seed)."""
    names = list(cells)
    scored = [n for n in names if "benchmarks" in cells[n]]
    if not scored:
        return []
    lines = [
        "",
        "Benchmarks (×100, average over languages"
        + ("; —: not evaluated for every seed" if len(scored) < len(names) else "")
        + "):",
        "",
        "| benchmark | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for bench, data in cells[scored[0]]["benchmarks"].items():
        lines.append(
            f"| {bench} ({data['metric']}) | "
            + " | ".join(
                _fmt(cells[n]["benchmarks"][bench]["average"], 1, 100) if n in scored else "—" for n in names
            )
            + " |"
        )
    return lines


def _training_lines(cells: dict) -> list[str]:
    """Each cell's augment, examples and optimizer steps per seed (a report from before they were
    recorded has none: no table)."""
    if not all("training" in c for c in cells.values()):
        return []

    def per_seed(values: dict) -> str:
        shown = {"—" if v is None else str(v) for v in values.values()}
        return (
            shown.pop()
            if len(shown) == 1
            else ", ".join("—" if v is None else str(v) for v in values.values())
        )

    lines = [
        "Training per cell (examples: the records after `augment`; steps: optimizer steps; per seed where "
        "they differ):",
        "",
        "| cell | augment | examples | steps | prompts at inference |",
        "|---|---|---|---|---|",
    ]
    for name, cell in cells.items():
        t = cell["training"]
        prompts = "as trained"
        if "english_withheld" in t:
            prompts = (
                "without the English (withheld)"
                if t["english_withheld"]
                else f"English given ({t['heldout_prompts_without_english']} held-out prompts without it)"
            )
        lines.append(
            f"| {name} | {t['augment']} | {per_seed(t['examples'])} | {per_seed(t['steps'])} | {prompts} |"
        )
    return lines + [""]


def experiment_markdown(report: dict) -> str:
    """``report.md``: the setup and the time, then the held-out NLL tables, each benchmark's answer
    likelihood tables and the benchmarks' averages."""
    cells = report["cells"]
    names = list(cells)
    seeds = report["seeds"]
    lines = _setup_lines(report) + _time_lines(report) + _training_lines(cells)
    lines += [
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); "
        + ("mean [95% t-interval over seeds]" if len(seeds) > 1 else "no interval over seeds with one seed"),
        "",
    ]
    lines += _nll_tables(
        "Held-out NLL per token (lower is better):",
        {n: cells[n]["nll"] for n in names},
        {n: cells[n]["nll_diff_to_baseline"] for n in names if "nll_diff_to_baseline" in cells[n]},
        {n: cells[n]["nll_diff_pooled"] for n in names if "nll_diff_pooled" in cells[n]},
        report["baseline"],
        len(seeds),
        {n: cells[n]["nll_between_seeds"] for n in names if "nll_between_seeds" in cells[n]},
    )
    return "\n".join(lines + _answer_lines(report) + _benchmark_lines(cells))
