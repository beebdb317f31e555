"""``cctuning demo`` (``make demo``): CC-Tuning next to vanilla SFT on a real model, offline.

The demo is a small preset of :func:`cctuning.lab.experiment.run_experiment`: one seed and three cells,
``sft`` (vanilla SFT, connection none), ``cc`` (CC-Tuning, transform) and ``cc-none`` (the same
CC-Tuning model without the connection, to show what the matrix adds). The experiment runs the
stages, each reused when it already finished (re-running continues where a killed run stopped):

1. the model preset (installed and converted once, see :mod:`cctuning.presets`);
2. a stratified sample of the bundled training mix, and a held-out sample for the NLL metric;
3. vanilla SFT and CC-Tuning on the same records, seed and step budget (a killed training resumes
   from its last checkpoint; a finished one keeps no checkpoint);
4. the Transform Matrix of the CC model;
5. the held-out response NLL of each cell (within ``nll_max_length`` tokens, not the training budget,
   which cut 44 of the 84 held-out responses to fewer than 4 tokens) and a development subset of the
   six benchmarks;

and the demo adds one side-by-side report (``report/summary.md``, plus the table and plots of
:func:`cctuning.lab.report.build_report`).

The default budget is sized for 2 CPU cores and about 20 minutes; ``--config`` takes a YAML file
with any :class:`DemoConfig` field for a fuller run (``examples/demo_full.yaml``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cctuning.config import split_list
from cctuning.eval.benchmarks import resolve_name
from cctuning.eval.nll import NLL_NAME, load_items, paired_difference
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import write_json, write_text
from cctuning.lab.experiment import ExperimentConfig, eval_dir, resolve_cells, run_experiment, stage_key
from cctuning.lab.report import build_report
from cctuning.training.args import opt
from cctuning.versions import versions

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
    matrix_samples: int = opt(
        200, "training records sampled for the Transform Matrix (at most; a tenth of the pairs is held out)"
    )
    benchmarks: str = opt("XNLI,XStoryCloze,MMMLU,XQuAD,MKQA,XLSum", "benchmarks to evaluate")
    eval_langs: str = opt("en,sw,zh,ar", "evaluation languages (each benchmark uses those it has), or all")
    eval_limit: int = opt(4, "items per benchmark and language")
    xlsum_limit: int = opt(2, "items per language for XL-Sum (long articles)")
    max_new_tokens: int = opt(40, "generated tokens per item")
    eval_batch_size: int = opt(8, "generation batch size")
    nll_per_lang: int = opt(4, "held-out records per language for the NLL metric")
    nll_max_length: int = opt(
        512,
        "token budget of a held-out NLL item, prompt and response (at 512, 3 of the default 84 held-out "
        "responses are cut to fewer than 4 tokens; at the training budget of 128, 44 were)",
    )
    bf16: bool = opt(
        False,
        "train under bf16 autocast with float32 master weights (a CC-Tuning step took 0.54x the float32 "
        "time on this CPU; see docs/scaling.md); recorded in the summary",
    )


# the demo's cells: (name, column title in the summary, training method, connection)
CELLS = (
    ("sft", "SFT", "sft", "none"),
    ("cc", "CC-Tuning (transform)", "cc", "transform"),
    ("cc-none", "CC-Tuning (no connection)", "cc", "none"),
)


def experiment_config(cfg: DemoConfig) -> ExperimentConfig:
    """The demo as an experiment: one seed, the three cells, the demo's budget and benchmark limits."""
    benchmarks = {
        "names": ",".join(split_list(cfg.benchmarks)),
        "limit": cfg.eval_limit,
        "limits": {"XLSum": cfg.xlsum_limit},
        "max_new_tokens": cfg.max_new_tokens,
    }
    if cfg.eval_langs != "all":
        benchmarks["langs"] = ",".join(split_list(cfg.eval_langs))
    return ExperimentConfig(
        model=cfg.model,
        output=cfg.output,
        seeds=[cfg.seed],
        train_per_lang=cfg.train_per_lang,
        heldout_per_lang=cfg.nll_per_lang,
        heldout_seed=cfg.seed,  # the held-out sample is drawn with the demo's seed
        heldout_max_length=cfg.nll_max_length,
        langs=cfg.langs,
        train={
            "max_steps": cfg.max_steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "max_length": cfg.max_length,
            "logging_steps": 4,
            "save_steps": 12,
            "save_total_limit": 1,
            **({"bf16": True} if cfg.bf16 else {}),  # absent by default: finished runs keep their keys
        },
        cells=[{"name": name, "method": method, "connection": conn} for name, _, method, conn in CELLS],
        baseline="sft",
        matrix_samples=cfg.matrix_samples,
        benchmarks=benchmarks,
        eval_batch_size=cfg.eval_batch_size,
    )


def run_demo(cfg: DemoConfig) -> tuple[str, Path]:
    """Run every stage; returns the report's Markdown and the folder it is in."""
    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "demo_config.json", {"config": asdict(cfg), "versions": versions()})
    exp = experiment_config(cfg)
    report = run_experiment(exp)
    table, report_dir = write_summary(cfg, exp, report["stage_seconds"], time.time() - started)
    return table, report_dir


def write_summary(cfg: DemoConfig, exp: ExperimentConfig, stages: dict, seconds: float) -> tuple[str, Path]:
    """``report/``: the side-by-side report of the three cells' evaluation folders and the summary table."""
    dirs = [eval_dir(exp.output, name, cfg.seed) for name, *_ in CELLS]
    bench_runs, nll_runs = [d / "bench" for d in dirs], [d / "nll" for d in dirs]
    report_dir = Path(exp.output) / "report"
    build_report([str(r) for r in bench_runs + nll_runs], report_dir)
    table = summary_markdown(cfg, bench_runs, nll_runs, demo_stage_seconds(exp, stages), seconds)
    write_text(report_dir / "summary.md", table + "\n")
    return table, report_dir


def demo_stage_seconds(exp: ExperimentConfig, stages: dict) -> dict[str, float]:
    """The recorded seconds of this demo's stages (over every invocation), labelled by cell:
    ``train sft``, ``matrix cc``, ``bench cc-none``, ... (a training shared by two cells is
    labelled with the first)."""
    seed = exp.seeds[0]
    out: dict[str, float] = {}
    seen: set[str] = set()
    for cell in resolve_cells(exp):
        for kind, folder in (
            ("train", cell.train_name),
            ("matrix", cell.train_name),
            ("nll", cell.name),
            ("bench", cell.name),
        ):
            key = stage_key(kind, folder, seed)
            if key in stages and key not in seen:
                seen.add(key)
                out[f"{kind} {cell.name}"] = stages[key]
    return out


def summary_header(cfg: DemoConfig) -> str:
    """The summary's first line: model, budget, seed, evaluation sizes and (when on) bf16."""
    return (
        f"model {cfg.model} · {cfg.max_steps} steps × batch {cfg.batch_size} on "
        f"{cfg.train_per_lang} records/language of the bundled mix · seed {cfg.seed} · "
        f"eval: {cfg.eval_limit} items/language ({cfg.xlsum_limit} for XL-Sum), languages {cfg.eval_langs}, "
        f"held-out NLL within {cfg.nll_max_length} tokens"
        + (" · trained under bf16 autocast" if cfg.bf16 else "")
    )


def summary_markdown(
    cfg: DemoConfig, bench_runs: list[Path], nll_runs: list[Path], stages: dict[str, float], seconds: float
) -> str:
    """The demo's one table: benchmark averages and held-out NLL of the three runs, side by side,
    with the paired NLL difference to SFT (per-language details are in report.md), and the time
    of every stage (summed over the invocations that ran them) and of this invocation."""
    lines = [
        summary_header(cfg),
        "",
        *_table_rows(cfg, bench_runs, nll_runs),
        "",
        f"the stages took {sum(stages.values()) / 60:.1f} min over every invocation ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items())
        + f"); this invocation took {seconds / 60:.1f} min",
    ]
    return "\n".join(lines)


def _table_rows(cfg: DemoConfig, bench_runs: list[Path], nll_runs: list[Path]) -> list[str]:
    names = [title for _, title, *_ in CELLS]
    results = [json.loads((r / RESULTS_NAME).read_text(encoding="utf-8")) for r in bench_runs]
    nlls = [json.loads((n / NLL_NAME).read_text(encoding="utf-8")) for n in nll_runs]
    lines = [
        "| benchmark (metric ×100, avg over languages / without en) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    # the demo's order of benchmarks (a results.json lists them by name)
    order = [resolve_name(b) for b in split_list(cfg.benchmarks)]
    for bench in sorted(results[0]["benchmarks"], key=lambda b: order.index(b) if b in order else len(order)):
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
    return lines
