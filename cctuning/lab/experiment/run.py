"""``cctuning experiment``'s entry point: the grid run in one process or as parallel jobs, or only
its report written from the evaluations on disk."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from cctuning.guard import check_output
from cctuning.io import folder_lock, write_json
from cctuning.lab.experiment.config import ExperimentConfig, resolve_cells
from cctuning.lab.experiment.jobs import _check_finished, _collect_runs, _run_jobs
from cctuning.lab.experiment.report import _write_report
from cctuning.lab.experiment.stages import _run_seeds
from cctuning.loading import model_inputs, resolve_model_path
from cctuning.versions import versions


def run_experiment(
    cfg: ExperimentConfig,
    progress: bool = True,
    *,
    jobs: int = 0,
    devices: list[str] | None = None,
    config_path: str | Path | None = None,
    report_only: bool = False,
    write_report: bool = True,
) -> dict:
    """Run (or resume) every cell × seed and write ``report.json`` / ``report.md``.

    ``jobs`` ≥ 1 runs the grid's :func:`~cctuning.lab.experiment.jobs.plan_jobs` as that many
    ``cctuning experiment`` processes at a time, each in its own folder under ``<output>/jobs/``
    (re-reading ``config_path``), with ``CUDA_VISIBLE_DEVICES`` taken in turn from ``devices`` when
    given; the report then reads the jobs' folders. ``report_only`` writes the report from the
    evaluations already on disk (a parallel run's job folders where they exist) and trains nothing:
    a missing evaluation is an error naming it. ``write_report=False`` runs the stages only (a job
    of a parallel run).
    """
    root = Path(cfg.output)
    check_experiment_output(cfg, config_path)
    with folder_lock(root, "cctuning experiment"):  # a second runner on the same folder is refused
        started = time.time()
        model_path = cfg.model if report_only else resolve_model_path(cfg.model)
        if report_only:
            cell_runs, seconds, parallel = _collect_runs(cfg, root)
        elif jobs:
            _check_finished(cfg, root, resolve_cells(cfg), jobs=True)  # before any job trains
            _record_config(cfg, root)
            _run_jobs(cfg, root, jobs, devices, config_path, progress)
            cell_runs, seconds, parallel = _collect_runs(cfg, root)
        else:
            cells = resolve_cells(cfg)
            _check_finished(cfg, root, cells)  # before hours of training, not after
            _record_config(cfg, root)
            cell_runs, seconds = _run_seeds(cfg, root, cells, str(model_path), progress)
            parallel = 0
        if not write_report:
            return {"cells": {}, "stage_seconds": seconds}
        return _write_report(
            cfg, root, cell_runs, seconds, time.time() - started, model_path, parallel_jobs=parallel
        )


def check_experiment_output(cfg: ExperimentConfig, config_path: str | Path | None) -> None:
    """The experiment's folder is none of its inputs (its config file, ``data``, ``heldout_data``,
    the model folder and the base it records) and neither holds one nor lies inside one."""
    inputs = {
        "config": config_path,
        "data": cfg.data,
        "heldout_data": cfg.heldout_data,
        **model_inputs(cfg.model, "model"),
    }
    check_output(cfg.output, inputs, option="output", folder=True)


def _record_config(cfg: ExperimentConfig, root: Path) -> None:
    """``experiment_config.json``: the config this invocation runs, and the package versions."""
    write_json(root / "experiment_config.json", {"config": asdict(cfg), "versions": versions()})
