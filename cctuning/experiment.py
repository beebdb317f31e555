"""``cctuning experiment --config FILE.yaml``: a grid of methods × ablations × seeds on the same
data and budget, with the held-out NLL (and optionally a benchmark subset) per cell and seed.

Each cell names a connection mode for evaluation and any ``cctuning train`` options that differ
from the shared budget (``method``, ``layer_choice``, ``inject_layer``, ...). Cells with the same
training options share one training per seed (e.g. CC-Tuning evaluated with and without the
connection). Everything is resumable: finished trainings, matrices and evaluations are reused.

The report gives, per cell, the mean over seeds and a 95% t-interval over seeds of the held-out
NLL (per language and overall) and of the benchmark scores, and for every cell the paired
difference to the baseline cell on the same items (per seed, then mean and t-interval over seeds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cctuning.errors import CCError
from cctuning.io import write_json, write_text

logger = logging.getLogger(__name__)

CONNECTIONS = ("transform", "none", "english")
STAGES_NAME = "stages.json"  # wall-clock seconds of every finished stage, kept across resumed invocations

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal value)
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (a single value has no interval)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


@dataclass
class ExperimentConfig:
    model: str = "smollm2-135m"
    output: str = "runs/experiment"
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    train_per_lang: int = 12
    heldout_per_lang: int = 8
    langs: str = "all"
    train: dict = field(default_factory=dict)  # shared cctuning train options (the budget)
    cells: list = field(default_factory=list)  # [{name, connection, **train options}]
    baseline: str | None = None  # cell the paired differences are taken against (default: first)
    matrix_samples: int = 200
    benchmarks: dict = field(default_factory=dict)  # {names, langs, limit, scoring, max_new_tokens}
    eval_batch_size: int = 8


BENCHMARK_KEYS = {"names": str, "langs": str, "limit": int, "scoring": str, "max_new_tokens": int}


def _check_benchmarks(spec: dict, path) -> None:
    from cctuning.config import coerce
    from cctuning.eval.benchmarks import resolve_name

    if not spec:
        return
    for key, value in spec.items():
        if key not in BENCHMARK_KEYS:
            raise CCError(f"{path}: benchmarks: unknown option '{key}' (known: {', '.join(BENCHMARK_KEYS)})")
        coerce(value, BENCHMARK_KEYS[key], f"{path}: benchmarks: option '{key}'")
    if not spec.get("names"):
        raise CCError(f"{path}: benchmarks: 'names' is missing")
    for name in str(spec["names"]).split(","):
        try:
            resolve_name(name.strip())
        except CCError as err:
            raise CCError(f"{path}: benchmarks: option 'names': {err}") from None
    if spec.get("scoring", "generate") not in ("generate", "likelihood"):
        raise CCError(
            f"{path}: benchmarks: option 'scoring': expected generate or likelihood, got {spec['scoring']!r}"
        )


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment YAML: every name and value is validated here, so that a typo
    fails at once with a one-line error rather than after an hour of training."""
    from cctuning.config import coerce, read_yaml
    from cctuning.training import TrainConfig

    data = read_yaml(path)
    hints = typing.get_type_hints(ExperimentConfig)
    for key, value in data.items():
        if key not in hints:
            raise CCError(f"{path}: unknown option '{key}'")
        if key == "seeds":
            if not isinstance(value, list) or not value:
                raise CCError(f"{path}: option 'seeds': expected a non-empty list of integers, got {value!r}")
            data[key] = [coerce(v, int, f"{path}: option 'seeds'") for v in value]
        elif key == "cells":
            if not isinstance(value, list):
                raise CCError(f"{path}: option 'cells': expected a list, got {value!r}")
        else:
            data[key] = coerce(value, hints[key], f"{path}: option '{key}'")
    cfg = ExperimentConfig(**data)
    train_hints = typing.get_type_hints(TrainConfig)
    if not cfg.cells:
        raise CCError(f"{path}: 'cells' is empty")
    names = set()
    for i, cell in enumerate(cfg.cells):
        if not isinstance(cell, dict) or "name" not in cell:
            raise CCError(f"{path}: cell {i + 1} needs a name")
        if cell["name"] in names:
            raise CCError(f"{path}: two cells are named '{cell['name']}'")
        names.add(cell["name"])
        for key, value in cell.items():
            where = f"{path}: cell '{cell['name']}': option '{key}'"
            if key == "connection":
                if value not in CONNECTIONS:
                    raise CCError(f"{where}: expected one of {', '.join(CONNECTIONS)}, got {value!r}")
            elif key != "name":
                if key not in train_hints:
                    raise CCError(f"{path}: cell '{cell['name']}': unknown option '{key}'")
                coerce(value, train_hints[key], where)
    for key, value in cfg.train.items():
        if key not in train_hints:
            raise CCError(f"{path}: train: unknown option '{key}'")
        coerce(value, train_hints[key], f"{path}: train: option '{key}'")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise CCError(f"{path}: baseline '{cfg.baseline}' is not a cell")
    _check_benchmarks(cfg.benchmarks, path)
    return cfg


def _train_key(options: dict) -> str:
    text = json.dumps(options, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict:
    """Run (or resume) every cell × seed and write ``report.json`` / ``report.md``."""
    from cctuning.config import coerce
    from cctuning.data.mix import sample_mix
    from cctuning.demo import _write_records
    from cctuning.eval.nll import NLL_NAME, evaluate_nll, load_items, paired_difference
    from cctuning.eval.runner import RESULTS_NAME, EvalConfig, evaluate
    from cctuning.inference.matrix import MATRIX_NAME, fit_matrix_from_file
    from cctuning.loading import load_for_inference, resolve_model_path
    from cctuning.training import TrainConfig
    from cctuning.training.run import TRAIN_RESULTS_NAME, train_or_reuse
    from cctuning.versions import versions

    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "experiment_config.json", {"config": asdict(cfg), "versions": versions()})
    model_path = resolve_model_path(cfg.model)
    langs = None if cfg.langs == "all" else [x.strip() for x in cfg.langs.split(",")]
    baseline = cfg.baseline or cfg.cells[0]["name"]
    hints = typing.get_type_hints(TrainConfig)
    cell_runs: dict[str, dict[int, dict]] = {}
    started = time.time()
    stages_file = root / STAGES_NAME
    stages: dict[str, float] = (
        json.loads(stages_file.read_text(encoding="utf-8")) if stages_file.is_file() else {}
    )

    @contextlib.contextmanager
    def stage(name: str):
        """Record the wall-clock seconds of one stage once it finishes (kept across resumed invocations)."""
        t0 = time.perf_counter()
        yield
        stages[name] = round(time.perf_counter() - t0, 1)
        write_json(stages_file, stages)

    for seed in cfg.seeds:
        data_dir = root / "data" / f"seed{seed}"
        train_file, held_file = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
        if not train_file.is_file():
            _write_records(train_file, sample_mix("train", cfg.train_per_lang, langs, seed))
        if not held_file.is_file():
            # the held-out items are the same for every seed, so that seeds can be compared pairwise
            _write_records(held_file, sample_mix("heldout", cfg.heldout_per_lang, langs, 0))
        for cell in cfg.cells:
            options = {**cfg.train, **{k: v for k, v in cell.items() if k not in ("name", "connection")}}
            options = {
                k: coerce(v, hints[k], f"cell '{cell['name']}': option '{k}'") for k, v in options.items()
            }
            tdir = root / "train" / f"{options.get('method', 'cc')}-{_train_key(options)}" / f"seed{seed}"
            if not (tdir / TRAIN_RESULTS_NAME).is_file():
                logger.info("training %s seed %d -> %s", cell["name"], seed, tdir)
                tcfg = TrainConfig(
                    **{
                        **options,
                        "model": model_path,
                        "data": str(train_file),
                        "output": str(tdir),
                        "seed": seed,
                    }
                )
                with stage(f"train/{tdir.parent.name}/seed{seed}"):
                    train_or_reuse(tcfg)  # resumes an interrupted training
            connection = cell.get("connection") or (
                "transform" if options.get("method", "cc") == "cc" else "none"
            )
            if connection == "transform" and not (tdir / MATRIX_NAME).is_file():
                with stage(f"matrix/{tdir.parent.name}/seed{seed}"):
                    model, tok, _ = load_for_inference(str(tdir))
                    fit_matrix_from_file(
                        model, tok, train_file, tdir, samples=cfg.matrix_samples, seed=seed, progress=progress
                    )
            edir = root / "eval" / cell["name"] / f"seed{seed}"
            if not (edir / "nll" / NLL_NAME).is_file():
                with stage(f"nll/{cell['name']}/seed{seed}"):
                    model, tok, _ = load_for_inference(str(tdir))
                    evaluate_nll(
                        model,
                        tok,
                        held_file,
                        connection,
                        edir / "nll",
                        batch_size=cfg.eval_batch_size,
                        max_length=options.get("max_length", 1024),
                        seed=seed,
                        progress=progress,
                        model_name=str(tdir),
                    )
            bench = None
            if cfg.benchmarks:
                b = cfg.benchmarks
                ecfg = EvalConfig(
                    model=str(tdir),
                    benchmarks=[x.strip() for x in str(b.get("names", "")).split(",")],
                    langs=[x.strip() for x in str(b["langs"]).split(",")] if b.get("langs") else None,
                    limit=b.get("limit"),
                    connection=connection,
                    scoring=b.get("scoring", "generate"),
                    max_new_tokens=b.get("max_new_tokens", 40),
                    batch_size=cfg.eval_batch_size,
                    output=str(edir / "bench"),
                    seed=seed,
                )
                if not (edir / "bench" / RESULTS_NAME).is_file():
                    with stage(f"bench/{cell['name']}/seed{seed}"):
                        model, tok, _ = load_for_inference(str(tdir))
                        evaluate(ecfg, model, tok, progress=progress)
                bench = json.loads((edir / "bench" / RESULTS_NAME).read_text(encoding="utf-8"))
            nll = json.loads((edir / "nll" / NLL_NAME).read_text(encoding="utf-8"))
            cell_runs.setdefault(cell["name"], {})[seed] = {
                "nll": nll,
                "bench": bench,
                "nll_dir": edir / "nll",
            }
    report = summarize_experiment(cfg, cell_runs, baseline, paired_difference, load_items)
    report["seconds_this_invocation"] = round(time.time() - started, 1)
    report["stage_seconds"] = stages
    report["setup"] = {
        "model": cfg.model,
        "model_path": str(model_path),
        "train": cfg.train,
        "train_per_lang": cfg.train_per_lang,
        "heldout_per_lang": cfg.heldout_per_lang,
        "langs": cfg.langs,
        "matrix_samples": cfg.matrix_samples,
        "benchmarks": cfg.benchmarks,
    }
    report["date"] = time.strftime("%Y-%m-%d")
    report["versions"] = versions()
    write_json(root / "report.json", report)
    write_text(root / "report.md", experiment_markdown(report) + "\n")
    return report


def summarize_experiment(cfg, cell_runs, baseline, paired_difference, load_items) -> dict:
    """Mean and interval over seeds per cell; paired differences to the baseline per language."""
    out: dict = {"baseline": baseline, "seeds": cfg.seeds, "cells": {}}
    for name, per_seed in cell_runs.items():
        langs = list(next(iter(per_seed.values()))["nll"]["nll"])
        cell: dict = {
            "nll": {
                lang: mean_interval([r["nll"]["nll"][lang]["nll"] for r in per_seed.values()])
                for lang in langs
            }
        }
        if name != baseline:
            diffs: dict[str, list[float]] = {}
            for seed, run in per_seed.items():
                d = paired_difference(
                    load_items(run["nll_dir"]), load_items(cell_runs[baseline][seed]["nll_dir"]), seed=seed
                )
                for lang, v in d.items():
                    diffs.setdefault(lang, []).append(v["diff"])
            cell["nll_diff_to_baseline"] = {lang: mean_interval(v) for lang, v in diffs.items()}
            if len(per_seed) == 1:
                # one seed has no spread over seeds: give the bootstrap interval over items instead
                for lang, v in d.items():
                    cell["nll_diff_to_baseline"][lang].update(
                        ci_low=v["ci_low"], ci_high=v["ci_high"], interval="bootstrap over items"
                    )
        first = next(iter(per_seed.values()))["bench"]
        if first is not None:
            cell["benchmarks"] = {}
            for bench, data in first["benchmarks"].items():
                metric = first["primary_metric"][bench]
                cell["benchmarks"][bench] = {
                    "metric": metric,
                    "average": mean_interval(
                        [r["bench"]["benchmarks"][bench]["average"][metric] for r in per_seed.values()]
                    ),
                    "per_language": {
                        lang: mean_interval(
                            [
                                r["bench"]["benchmarks"][bench]["per_language"][lang][metric]
                                for r in per_seed.values()
                            ]
                        )
                        for lang in data["per_language"]
                    },
                }
        out["cells"][name] = cell
    return out


def _fmt(m: dict, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(scale * m["mean"], spec)
    if m["ci_low"] is not None:
        text += f" [{format(scale * m['ci_low'], spec)}, {format(scale * m['ci_high'], spec)}]"
    return text


def experiment_markdown(report: dict) -> str:
    cells = report["cells"]
    names = list(cells)
    seeds = report["seeds"]
    lines = []
    setup = report.get("setup")
    if setup:
        budget = ", ".join(
            f"{k} {v}" for k, v in setup["train"].items() if k not in ("save_steps", "save_total_limit")
        )
        lines += [
            f"Model `{setup['model']}`; {report.get('date', '')}; training: {setup['train_per_lang']} records per "
            f"language ({setup['langs']} languages of the bundled mix, resampled per seed), {budget}; "
            f"Transform Matrix on {setup['matrix_samples']} prompts; held-out NLL on {setup['heldout_per_lang']} "
            "records per language (the same for every seed).",
            "",
        ]
    stages = report.get("stage_seconds") or {}
    if stages:
        kinds: dict[str, float] = {}
        for name, sec in stages.items():
            kinds[name.split("/")[0]] = kinds.get(name.split("/")[0], 0.0) + sec
        lines += [
            "Time (wall clock, summed over the stages of all invocations): "
            f"{sum(stages.values()) / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in kinds.items())
            + ").",
            "",
        ]
    lines += [
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); "
        + ("mean [95% t-interval over seeds]" if len(seeds) > 1 else "no interval over seeds with one seed"),
        "",
        "Held-out NLL per token (lower is better):",
        "",
        "| lang | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    langs = list(cells[names[0]]["nll"])
    for lang in langs:
        lines.append(f"| {lang} | " + " | ".join(_fmt(cells[n]["nll"][lang]) for n in names) + " |")
    others = [n for n in names if n != report["baseline"]]
    if others:
        lines += [
            "",
            f"Paired NLL difference to `{report['baseline']}` on the same items (negative: better)"
            + ("; one seed, so the interval is a 95% bootstrap over items:" if len(seeds) == 1 else ":"),
            "",
            "| lang | " + " | ".join(others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for lang in langs:
            lines.append(
                f"| {lang} | "
                + " | ".join(_fmt(cells[n]["nll_diff_to_baseline"][lang], sign=True) for n in others)
                + " |"
            )
    if "benchmarks" in cells[names[0]]:
        lines += [
            "",
            "Benchmarks (×100, average over languages):",
            "",
            "| benchmark | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for bench, data in cells[names[0]]["benchmarks"].items():
            lines.append(
                f"| {bench} ({data['metric']}) | "
                + " | ".join(_fmt(cells[n]["benchmarks"][bench]["average"], 1, 100) for n in names)
                + " |"
            )
    return "\n".join(lines)
