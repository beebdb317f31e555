"""A parallel run (``cctuning experiment --jobs N``): the grid planned as independent jobs, one per
seed × training (:func:`plan_jobs`), each run as a ``cctuning experiment`` process of its own in
``<output>/jobs/<job>`` (:func:`_run_jobs`); and the evaluations of every cell × seed read back for
the report, from the job folders where they exist (:func:`_collect_runs`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cctuning.errors import CCError
from cctuning.lab.experiment.config import (
    STAGES_NAME,
    Cell,
    ExperimentConfig,
    answer_benchmarks,
    answer_nll_name,
    resolve_cells,
    train_dir,
)
from cctuning.lab.experiment.reuse import _check_cell, _evaluations, matrix_fit, training_budget

logger = logging.getLogger(__name__)

JOBS_DIR = "jobs"  # the folders of a parallel run's jobs, one per seed × training


@dataclass(frozen=True)
class Job:
    """One training of one seed and every cell evaluated on it: the unit a parallel run
    (``--jobs N``) hands to a process of its own."""

    seed: int
    train_name: str
    cells: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.train_name}"


def plan_jobs(cfg: ExperimentConfig) -> list[Job]:
    """The grid as independent jobs: per seed, one job per training, holding the cells that share it
    (in the config's order)."""
    groups: dict[str, list[str]] = {}
    for cell in resolve_cells(cfg):
        groups.setdefault(cell.train_name, []).append(cell.name)
    return [Job(seed, name, tuple(cells)) for seed in cfg.seeds for name, cells in groups.items()]


def job_root(root: str | Path, job: Job) -> Path:
    """The experiment folder of one job of a parallel run (``<output>/jobs/<job>``)."""
    return Path(root) / JOBS_DIR / job.name


def _check_finished(cfg: ExperimentConfig, root: Path, cells: list[Cell], jobs: bool = False) -> None:
    """:func:`_check_cell` over the grid: in ``root``, or (``jobs``) in each job's own folder of a
    parallel run (``jobs/<job>``), where that job's evaluations are made; a job folder that does not
    exist yet holds nothing to check."""
    by_name = {cell.name: cell for cell in cells}
    for job in plan_jobs(cfg):
        base = job_root(root, job) if jobs else root
        for name in job.cells:
            _check_cell(cfg, base, by_name[name], job.seed)


# a started job: the job, its process and its log
_Running = tuple[Job, subprocess.Popen, Path]


def _run_jobs(cfg, root: Path, jobs: int, devices, config_path, progress: bool) -> None:
    """Run :func:`plan_jobs` as ``jobs`` child processes at a time; each writes its log beside its
    folder (``jobs/<job>.log``). A failed job does not stop the others; the failures are reported
    together at the end, each with its log's last line."""
    if config_path is None:
        raise CCError("a parallel experiment (--jobs) needs the config file its jobs re-read")
    planned = plan_jobs(cfg)
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(planned)))
    pending, running, failed = list(enumerate(planned)), [], []
    previous = _stop_on_sigterm()
    bar = tqdm(total=len(planned), desc="experiment jobs", unit="job") if progress else None
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, job = pending.pop(0)
                device = devices[i % len(devices)] if devices else None
                running.append(_start_job(root, job, config_path, device, threads))
            time.sleep(0.5)
            failed += _reap(running, bar)
    finally:
        for _, proc, _ in running:  # interrupted: stop the children too (each resumes next time)
            proc.terminate()
        for _, proc, _ in running:
            proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    if failed:
        raise CCError(f"{len(failed)} of {len(planned)} experiment jobs failed: " + "; ".join(failed))


def _start_job(root: Path, job: Job, config_path, device: str | None, threads: int) -> _Running:
    """Start one job as ``cctuning experiment`` on its own folder, seed and cells, with
    ``CUDA_VISIBLE_DEVICES`` set to ``device`` when given and its share of the CPU threads."""
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    log_path = root / JOBS_DIR / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cctuning.cli", "experiment", "--config", str(config_path),
           "--output", str(job_root(root, job)), "--seeds", str(job.seed),
           "--cells", ",".join(job.cells), "--no-report", "--no-progress"]  # fmt: skip
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    logger.info("job %s started (pid %d, log %s)", job.name, proc.pid, log_path)
    return job, proc, log_path


def _reap(running: list[_Running], bar) -> list[str]:
    """Take the jobs that have ended out of ``running`` (counting each on ``bar``); returns the
    failed ones, each said with its exit status and its log's last line."""
    failed = []
    for entry in list(running):
        job, proc, log_path = entry
        if proc.poll() is None:
            continue
        running.remove(entry)
        if bar is not None:
            bar.update(1)
        if proc.returncode != 0:
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            failed.append(f"{job.name} (exit {proc.returncode}, {log_path}: {lines[-1] if lines else ''})")
            logger.error("job %s failed: see %s", job.name, log_path)
        else:
            logger.info("job %s finished", job.name)
    return failed


def _stop_on_sigterm():
    """In the main thread: SIGTERM raises KeyboardInterrupt, so that a runner stopped with ``kill``
    stops its jobs too instead of leaving them running alone; returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def _collect_runs(cfg: ExperimentConfig, root: Path) -> tuple[dict, dict, int]:
    """Every cell × seed's evaluations on disk, read from a parallel run's job folders where they
    exist, else from ``root`` itself; and the stage times of all of them. A missing evaluation is a
    one-line error naming it. The third value counts the job folders read."""
    cell_runs: dict[str, dict[int, dict]] = {}
    seconds: dict[str, float] = {}
    resolved = {cell.name: cell for cell in resolve_cells(cfg)}  # in the config's order
    parallel = 0
    for job in plan_jobs(cfg):
        base = job_root(root, job)
        if base.is_dir():
            parallel += 1
        else:
            base = root
        stages = base / STAGES_NAME
        if stages.is_file():
            seconds.update(json.loads(stages.read_text(encoding="utf-8")))
        for name in job.cells:
            cell_runs.setdefault(name, {})[job.seed] = _read_cell_run(cfg, base, resolved[name], job.seed)
    # the config's cell order, whatever order the jobs came in
    return {name: cell_runs[name] for name in resolved if name in cell_runs}, seconds, parallel


def _read_cell_run(cfg: ExperimentConfig, base: Path, cell: Cell, seed: int) -> dict:
    """One cell and seed's evaluations under ``base``, as the report takes them: the held-out NLL
    (an error when it is missing), the benchmarks' results and the answer likelihoods' folders (each
    left out, with a warning, when it is missing)."""
    name = cell.name
    evs = _evaluations(cfg, base, name, seed)
    if not evs["nll"].finished:
        raise CCError(f"{evs['nll'].result}: missing: cell '{name}' seed {seed} has no held-out NLL yet")
    # the report must not show results made with other settings under this config's names
    _check_cell(cfg, base, cell, seed)
    bench = None
    if "bench" in evs:
        if evs["bench"].finished:
            bench = json.loads(evs["bench"].result.read_text(encoding="utf-8"))
        else:  # the report shows the held-out NLL, and no benchmark score for this cell
            logger.warning(
                "%s: missing: cell '%s' seed %d has no benchmarks yet", evs["bench"].result, name, seed
            )
    answers = {}
    for bench_name in answer_benchmarks(cfg):
        ev = evs[answer_nll_name(bench_name)]
        if ev.finished:
            answers[bench_name] = ev.folder
        else:  # the report leaves this cell out of that benchmark's answer-likelihood table
            logger.warning(
                "%s: missing: cell '%s' seed %d has no %s answer NLL yet", ev.result, name, seed, bench_name
            )
    return {
        "nll": json.loads(evs["nll"].result.read_text(encoding="utf-8")),
        "bench": bench,
        "nll_dir": evs["nll"].folder,
        "answer_nll": answers,
        "matrix": matrix_fit(base, cell, seed),
        "training": training_budget(train_dir(base, cell, seed)),
    }
