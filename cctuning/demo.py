"""``cctuning demo`` (``make demo``): CC-Tuning next to vanilla SFT on a real model, offline.

Stages, each reused when it already finished (re-running continues where a killed run stopped):

1. the model preset (installed and converted once, see :mod:`cctuning.presets`);
2. a stratified sample of the bundled training mix, and a held-out sample for the NLL metric;
3. vanilla SFT and CC-Tuning on the same records, seed and step budget (checkpoints, resumable);
4. the Transform Matrix of the CC model;
5. evaluation of SFT (connection none), CC-Tuning (transform) and CC-Tuning without the
   connection (none, to show what the matrix adds) on a development subset of the six benchmarks,
   plus the held-out response NLL of each;
6. one side-by-side report (table + plots).

The default budget is sized for 2 CPU cores and about 20 minutes; ``--config`` takes a YAML file
with any :class:`DemoConfig` field for a fuller run (``examples/demo_full.yaml``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cctuning.data.mix import sample_mix
from cctuning.io import write_json, write_text
from cctuning.training.args import opt

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    model: str = opt("smollm2-135m", "preset name or model folder")
    output: str = opt("runs/demo", "folder for everything the demo writes")
    train_per_lang: int = opt(8, "training records per language, drawn from the bundled mix")
    langs: str = opt("all", "comma-separated training languages of the mix, or all")
    max_steps: int = opt(24, "optimizer steps of each training run")
    batch_size: int = opt(4, "training batch size")
    lr: float = opt(1e-4, "learning rate")
    max_length: int = opt(128, "training sequence budget in tokens")
    seed: int = opt(42, "seed of sampling, training and evaluation")
    matrix_samples: int = opt(200, "parallel prompts for the Transform Matrix")
    benchmarks: str = opt("XNLI,XStoryCloze,MMMLU,XQuAD,MKQA,XLSum", "benchmarks to evaluate")
    eval_langs: str = opt("en,sw,zh,ar", "evaluation languages (each benchmark uses those it has), or all")
    eval_limit: int = opt(4, "items per benchmark and language")
    xlsum_limit: int = opt(2, "items per language for XL-Sum (long articles)")
    max_new_tokens: int = opt(40, "generated tokens per item")
    eval_batch_size: int = opt(8, "generation batch size")
    nll_per_lang: int = opt(4, "held-out records per language for the NLL metric")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _write_records(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _train(cfg: DemoConfig, model_path: str, data: Path, method: str, out: Path) -> None:
    from cctuning.training import TrainConfig
    from cctuning.training.run import train_or_reuse

    tcfg = TrainConfig(
        model=model_path,
        data=str(data),
        output=str(out),
        method=method,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        max_length=cfg.max_length,
        seed=cfg.seed,
        logging_steps=4,
        save_steps=12,
        save_total_limit=1,
    )
    train_or_reuse(tcfg)


def run_demo(cfg: DemoConfig) -> tuple[str, Path]:
    """Run every stage; returns the report's Markdown and the folder it is in."""
    from cctuning.eval.nll import NLL_NAME, evaluate_nll
    from cctuning.eval.report import build_report
    from cctuning.eval.runner import EvalConfig, evaluate
    from cctuning.inference.matrix import MATRIX_NAME, fit_matrix_from_file
    from cctuning.loading import load_for_inference, resolve_model_path
    from cctuning.versions import versions

    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "demo_config.json", {"config": asdict(cfg), "versions": versions()})
    model_path = resolve_model_path(cfg.model)
    langs = None if cfg.langs == "all" else _csv(cfg.langs)
    train_file, held_file = root / "data" / "train.jsonl", root / "data" / "heldout.jsonl"
    _write_records(train_file, sample_mix("train", cfg.train_per_lang, langs, cfg.seed))
    _write_records(held_file, sample_mix("heldout", cfg.nll_per_lang, langs, cfg.seed))
    timings = {}
    for method in ("sft", "cc"):
        t = time.time()
        _train(cfg, model_path, train_file, method, root / method)
        timings[f"train_{method}"] = round(time.time() - t, 1)
    cc_dir = root / "cc"
    t = time.time()
    if not (cc_dir / MATRIX_NAME).is_file():
        model, tok, _ = load_for_inference(str(cc_dir))
        report = fit_matrix_from_file(
            model, tok, train_file, cc_dir, samples=cfg.matrix_samples, seed=cfg.seed, progress=True
        )
        logger.info(
            "transform matrix: held-out cosine %.4f -> %.4f",
            report.heldout["before"]["cosine"],
            report.heldout["after"]["cosine"],
        )
    timings["fit_matrix"] = round(time.time() - t, 1)
    runs = []
    for name, folder, connection in (
        ("sft", root / "sft", "none"),
        ("cc", cc_dir, "transform"),
        ("cc", cc_dir, "none"),
    ):
        t = time.time()
        model, tok, _ = load_for_inference(str(folder))
        out = root / "eval" / f"{name}-{connection}"
        for bench in _csv(cfg.benchmarks):
            limit = cfg.xlsum_limit if bench.lower().replace("-", "") == "xlsum" else cfg.eval_limit
            eval_langs = None if cfg.eval_langs == "all" else _csv(cfg.eval_langs)
            evaluate(
                EvalConfig(
                    model=str(folder),
                    benchmarks=[bench],
                    langs=eval_langs,
                    limit=limit,
                    connection=connection,
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.eval_batch_size,
                    output=str(out / bench),
                    seed=cfg.seed,
                ),
                model,
                tok,
            )
        nll_out = root / "eval" / f"{name}-{connection}-nll"
        if not (nll_out / NLL_NAME).is_file():
            evaluate_nll(
                model,
                tok,
                held_file,
                connection,
                nll_out,
                batch_size=cfg.eval_batch_size,
                max_length=cfg.max_length,
                seed=cfg.seed,
                model_name=str(folder),
            )
        runs.append((out, nll_out))
        timings[f"eval_{name}_{connection}"] = round(time.time() - t, 1)
    merged = []
    for out, _ in runs:
        merged.append(_merge_benchmark_runs(out, [b for b in _csv(cfg.benchmarks)]))
    report_dir = root / "report"
    build_report([str(m) for m in merged] + [str(n) for _, n in runs], report_dir)
    timings["total"] = round(time.time() - started, 1)
    write_json(root / "timings.json", timings)
    table = summary_markdown(cfg, merged, [n for _, n in runs], timings)
    write_text(report_dir / "summary.md", table + "\n")
    return table, report_dir


def summary_markdown(cfg: DemoConfig, bench_runs: list[Path], nll_runs: list[Path], timings: dict) -> str:
    """The demo's one table: benchmark averages and held-out NLL of the three runs, side by side,
    with the paired NLL difference to SFT (per-language details are in report.md)."""
    from cctuning.eval.nll import NLL_NAME, load_items, paired_difference
    from cctuning.eval.runner import RESULTS_NAME

    names = ["SFT", "CC-Tuning (transform)", "CC-Tuning (no connection)"]
    results = [json.loads((r / RESULTS_NAME).read_text(encoding="utf-8")) for r in bench_runs]
    nlls = [json.loads((n / NLL_NAME).read_text(encoding="utf-8")) for n in nll_runs]
    lines = [
        f"model {cfg.model} · {cfg.max_steps} steps × batch {cfg.batch_size} on "
        f"{cfg.train_per_lang} records/language of the bundled mix · seed {cfg.seed} · "
        f"eval: {cfg.eval_limit} items/language ({cfg.xlsum_limit} for XL-Sum), languages {cfg.eval_langs}",
        "",
        "| benchmark (metric ×100, avg over languages / without en) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for bench in results[0]["benchmarks"]:
        metric = results[0]["primary_metric"][bench]
        cells = []
        for res in results:
            data = res["benchmarks"][bench]
            avg, no_en = data["average"][metric], (data.get("average_without_en") or {}).get(metric)
            cells.append(f"{100 * avg:.1f} / " + ("–" if no_en is None else f"{100 * no_en:.1f}"))
        lines.append(f"| {bench} ({metric}) | " + " | ".join(cells) + " |")
    cells = [
        f"{n['nll']['all']['nll']:.3f} [{n['nll']['all']['ci_low']:.3f}, {n['nll']['all']['ci_high']:.3f}]"
        for n in nlls
    ]
    items = nlls[0]["nll"]["all"]["items"]
    lines.append(f"| held-out NLL/token, {items} items (lower is better) | " + " | ".join(cells) + " |")
    base = load_items(nll_runs[0])
    diffs = ["0"]
    for run in nll_runs[1:]:
        d = paired_difference(load_items(run), base, seed=cfg.seed)["all"]
        diffs.append(f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    lines.append("| paired NLL difference to SFT (95% CI) | " + " | ".join(diffs) + " |")
    lines += [
        "",
        f"this invocation took {timings['total'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total")
        + ")",
    ]
    return "\n".join(lines)


def _merge_benchmark_runs(folder: Path, benches: list[str]) -> Path:
    """One results.json for a run evaluated benchmark by benchmark (each with its own limit)."""
    from cctuning.eval.benchmarks import get_spec
    from cctuning.eval.runner import RESULTS_NAME, write_results

    merged: dict | None = None
    for bench in benches:
        part = json.loads((folder / get_spec(bench).name / RESULTS_NAME).read_text(encoding="utf-8"))
        if merged is None:
            merged = {**part, "benchmarks": {}, "primary_metric": {}, "layer_choice": {}, "limit": {}}
        name = get_spec(bench).name
        merged["benchmarks"].update(part["benchmarks"])
        merged["primary_metric"].update(part["primary_metric"])
        merged["limit"][name] = part["limit"]
        for lang, counts in part.get("layer_choice", {}).items():
            target = merged["layer_choice"].setdefault(lang, {})
            for k, v in counts.items():
                target[k] = target.get(k, 0) + v
    write_results(folder, merged)
    return folder
