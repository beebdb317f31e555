"""The commands of the lab: ``experiment`` (a grid of runs), ``demo`` (CC-Tuning vs SFT end to end)
and ``report`` (runs side by side).

Every import of the lab's modules is in :func:`_lab` (one place to change when they move)."""

from __future__ import annotations

import argparse

from cctuning.cli.common import CONFIG_HELP, given_flags
from cctuning.config import add_dataclass_arguments, build_config, coerce, split_list
from cctuning.errors import CCError


def _lab(name: str):
    """The lab's module ``name`` (demo, experiment, report), imported when a command needs it."""
    if name == "demo":
        from cctuning.lab import demo  # deferred: the lab imports torch (seconds)

        return demo
    if name == "experiment":
        from cctuning.lab import experiment  # deferred: the lab imports torch (seconds)

        return experiment
    from cctuning.lab import report  # deferred: the report's plots and NLL code import torch (seconds)

    return report


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    {"experiment": _add_experiment, "demo": _add_demo, "report": _add_report}[name](p)
    return p


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=CONFIG_HELP)
    add_dataclass_arguments(p, _lab("demo").DemoConfig)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    lab = _lab("demo")
    table, report_dir = lab.run_demo(build_config(lab.DemoConfig, args.config, given_flags(args)))
    print()
    print(table)
    print(f"\nreport: {report_dir}/report.md · plots: {report_dir}/report.png, {report_dir}/layers.png")
    return 0


def _add_experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see examples/experiment_smollm2.yaml)")
    p.add_argument("--output", help="override the config's output folder")
    p.add_argument("--seeds", help="comma-separated: run these seeds instead of the config's")
    p.add_argument("--cells", help="comma-separated: run only these cells")
    p.add_argument(
        "--baseline",
        help="take the report's paired differences against this cell instead of the config's baseline",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="run the grid as N processes at a time, one per seed × training, each in "
        "<output>/jobs/<job> (a GPU shared by several, or one each with --devices); default: one "
        "process, cell after cell",
    )
    p.add_argument(
        "--devices", help="with --jobs: CUDA_VISIBLE_DEVICES values handed to the jobs in turn, e.g. 0,1,2,3"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the evaluations already on disk; train and evaluate nothing",
    )
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a parallel run's job
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=experiment)


def experiment(args: argparse.Namespace) -> int:
    lab = _lab("experiment")
    cfg = lab.load_config(args.config)
    if args.output:
        cfg.output = args.output
    if args.seeds:
        cfg.seeds = [coerce(v, int, "--seeds") for v in split_list(args.seeds)]
    if args.cells:
        lab.select_cells(cfg, split_list(args.cells))
    if args.baseline:
        lab.select_baseline(cfg, args.baseline)
    if args.jobs < 0:
        raise CCError(f"--jobs: expected a number ≥ 0, got {args.jobs}")
    report = lab.run_experiment(
        cfg,
        progress=not args.no_progress,
        jobs=args.jobs,
        devices=split_list(args.devices) if args.devices else None,
        config_path=args.config,
        report_only=args.report_only,
        write_report=not args.no_report,
    )
    if args.no_report:
        return 0
    print(lab.experiment_markdown(report))
    print(f"\nreport: {cfg.output}/report.md")
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    _lab("report").add_arguments(p)
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    table, png = _lab("report").build_report_from_args(args)
    print(table)
    print(f"\nplot: {png}")
    return 0
