"""``cctuning experiment --config FILE.yaml``: a grid of methods × ablations × seeds on the same
data and budget, with the held-out NLL (and optionally a benchmark subset) per cell and seed.

Each cell names a connection mode for evaluation and any ``cctuning train`` options that differ
from the shared budget (``method``, ``layer_choice``, ``inject_layer``, ...). Cells with the same
training options share one training per seed (e.g. CC-Tuning evaluated with and without the
connection). Everything is resumable: finished trainings, matrices and evaluations are reused, and
refused when they were made with other settings than the config now gives (:func:`check_settings`).

The report gives, per cell, the mean over seeds and a 95% t-interval over seeds of the held-out
NLL (per language and overall) and of the benchmark scores, and for every cell the paired
difference to the baseline cell on the same items (per seed, then mean and t-interval over seeds).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import signal
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cctuning.config import split_list
from cctuning.errors import CCError
from cctuning.io import folder_lock, write_json, write_text
from cctuning.model.connection import CONNECTIONS
from cctuning.stats import mean_interval

logger = logging.getLogger(__name__)

STAGES_NAME = "stages.json"  # wall-clock seconds of every finished stage, kept across resumed invocations


@dataclass
class ExperimentConfig:
    model: str = "smollm2-135m"
    output: str = "runs/experiment"
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    train_per_lang: int = 12
    heldout_per_lang: int = 8
    heldout_seed: int = 0  # seed of the held-out sample, the same for every training seed
    langs: str = "all"
    train: dict = field(default_factory=dict)  # shared cctuning train options (the budget)
    cells: list = field(default_factory=list)  # [{name, connection, sample_layer, **train options}]
    baseline: str | None = None  # cell the paired differences are taken against (default: first)
    matrix_samples: int = 200
    benchmarks: dict = field(default_factory=dict)  # {names, langs, limit, limits, scoring, max_new_tokens}
    # the likelihood of generative benchmarks' gold answers (``eval --nll XQuAD``), per cell and
    # seed, with paired differences to the baseline like the held-out NLL: {names, langs, limit, max_length}
    answer_nll: dict = field(default_factory=dict)
    eval_batch_size: int = 8
    # the user's data instead of samples of the bundled mix (any `cctuning train --data` source,
    # read as data_format, columns and split say); every seed trains on the whole of `data`
    data: str | None = None  # training records (also fit the Transform Matrix)
    heldout_data: str | None = None  # records of the held-out NLL
    data_format: str = "auto"  # auto | official | messages | prompt-completion
    columns: str | dict | None = None  # FIELD=COLUMN,... or a mapping
    split: str | None = None  # the split of a DatasetDict folder given as `data`
    heldout_split: str | None = None  # ... as `heldout_data`


# options of the experiment's data: set at its top level, not per cell or in `train:`
DATA_KEYS = ("data", "data_format", "columns", "split")


BENCHMARK_KEYS = {
    "names": str,
    "langs": str,
    "limit": int,
    "limits": dict,  # {benchmark: items per language}, overriding limit for that benchmark
    "scoring": str,
    "max_new_tokens": int,
}


ANSWER_NLL_KEYS = {"names": str, "langs": str, "limit": int, "max_length": int}


def _check_section(spec: dict, keys: dict, section: str, path) -> list[str]:
    """The checks that the ``benchmarks:`` and ``answer_nll:`` sections share: known options of the
    right type, and ``names`` present and naming benchmarks; returns their canonical names."""
    from cctuning.config import coerce
    from cctuning.eval.benchmarks import resolve_name

    for key, value in spec.items():
        if key not in keys:
            raise CCError(f"{path}: {section}: unknown option '{key}' (known: {', '.join(keys)})")
        coerce(value, keys[key], f"{path}: {section}: option '{key}'")
    if not spec.get("names"):
        raise CCError(f"{path}: {section}: 'names' is missing")
    try:
        return [resolve_name(name) for name in split_list(str(spec["names"]))]
    except CCError as err:
        raise CCError(f"{path}: {section}: option 'names': {err}") from None


def _check_answer_nll(spec: dict, path) -> None:
    from cctuning.eval.benchmarks import get_spec

    if not spec:
        return
    for name in _check_section(spec, ANSWER_NLL_KEYS, "answer_nll", path):
        if get_spec(name).answer_kind == "choice":
            raise CCError(
                f"{path}: answer_nll: option 'names': {name} is multiple choice (score it under "
                "benchmarks: with scoring: likelihood)"
            )
    for key in ("limit", "max_length"):
        if key in spec and int(spec[key]) <= 0:
            raise CCError(f"{path}: answer_nll: option '{key}': expected > 0, got {spec[key]!r}")


def answer_benchmarks(cfg: ExperimentConfig) -> list[str]:
    """The benchmarks of the ``answer_nll:`` spec, by their canonical names."""
    from cctuning.eval.benchmarks import resolve_name

    return [resolve_name(n) for n in split_list(str(cfg.answer_nll.get("names", "")))]


def _check_benchmarks(spec: dict, path) -> None:
    from cctuning.config import coerce
    from cctuning.eval.benchmarks import resolve_name

    if not spec:
        return
    _check_section(spec, BENCHMARK_KEYS, "benchmarks", path)
    for name, value in (spec.get("limits") or {}).items():
        try:
            resolve_name(str(name))
        except CCError as err:
            raise CCError(f"{path}: benchmarks: option 'limits': {err}") from None
        coerce(value, int, f"{path}: benchmarks: option 'limits': '{name}'")
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
            elif key == "sample_layer":
                if coerce(value, int, where) < 0:
                    raise CCError(f"{where}: the number of layer draws must be ≥ 0, got {value!r}")
            elif key != "name":
                if key not in train_hints:
                    raise CCError(f"{path}: cell '{cell['name']}': unknown option '{key}'")
                if key in DATA_KEYS:
                    raise CCError(
                        f"{where}: every cell trains on the experiment's data (set at its top level)"
                    )
                coerce(value, train_hints[key], where)
    for key, value in cfg.train.items():
        if key not in train_hints:
            raise CCError(f"{path}: train: unknown option '{key}'")
        if key in DATA_KEYS:
            raise CCError(f"{path}: train: option '{key}': set the data at the top level of the experiment")
        coerce(value, train_hints[key], f"{path}: train: option '{key}'")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise CCError(f"{path}: baseline '{cfg.baseline}' is not a cell")
    _check_benchmarks(cfg.benchmarks, path)
    _check_answer_nll(cfg.answer_nll, path)
    try:
        data_options(cfg, heldout=False)
        data_options(cfg, heldout=True)
    except CCError as err:
        raise CCError(f"{path}: {err}") from None
    return cfg


def data_options(cfg: ExperimentConfig, heldout: bool):
    """How the user's ``data`` (or ``heldout_data``) is read; None for the bundled mix's samples."""
    from cctuning.data.formats import DataOptions

    if not (cfg.heldout_data if heldout else cfg.data):
        return None
    return DataOptions.of(cfg.data_format, cfg.columns, cfg.heldout_split if heldout else cfg.split)


# cell keys that say how a cell is evaluated, not how it is trained
EVAL_KEYS = ("name", "connection", "sample_layer")


def _train_key(options: dict) -> str:
    text = json.dumps(options, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    """One cell with its settings resolved: the training options (the shared budget plus the
    cell's own), which name its training folder, and the connection it is evaluated with."""

    name: str
    options: dict
    connection: str
    sample_layer: int = 0  # evaluation only: K Gumbel-sampled layer draws per item (0: the argmax)

    @property
    def train_name(self) -> str:
        """The training folder's name, shared by every cell with the same training options."""
        return f"{self.options.get('method', 'cc')}-{_train_key(self.options)}"


def resolve_cells(cfg: ExperimentConfig) -> list[Cell]:
    from cctuning.config import coerce
    from cctuning.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    cells = []
    for cell in cfg.cells:
        options = {**cfg.train, **{k: v for k, v in cell.items() if k not in EVAL_KEYS}}
        options = {k: coerce(v, hints[k], f"cell '{cell['name']}': option '{k}'") for k, v in options.items()}
        connection = cell.get("connection") or (
            "transform" if options.get("method", "cc") == "cc" else "none"
        )
        cells.append(Cell(cell["name"], options, connection, int(cell.get("sample_layer", 0))))
    return cells


def stage_key(kind: str, folder: str, seed: int) -> str:
    """The name of one stage in ``stages.json``: ``train|matrix/<training folder>/seed<N>`` or
    ``nll|bench/<cell>/seed<N>``."""
    return f"{kind}/{folder}/seed{seed}"


def eval_dir(root: str | Path, cell: str, seed: int) -> Path:
    """A cell's evaluations for one seed: ``nll/`` and ``bench/`` below it."""
    return Path(root) / "eval" / cell / f"seed{seed}"


SETTINGS_NAME = "experiment_settings.json"  # in a stage's folder: the settings its result was made with


def _sidecar(result: Path) -> Path:
    """Where the settings of a result are recorded: ``experiment_settings.json`` in a stage's folder,
    ``<stem>.settings.json`` beside a file (a data sample, a matrix)."""
    if result.suffix in (".jsonl", ".safetensors"):
        return result.with_suffix(".settings.json")
    return result / SETTINGS_NAME


def _first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first setting (a dotted name) whose value differs, said in words; None when none does."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if said := _first_difference(a, b, f"{prefix}{key}."):
                return said
        elif a != b:
            return f"{prefix}{key} was {json.dumps(a)}, the config now gives {json.dumps(b)}"
    return None


def check_settings(result: Path, settings: dict, *, exists: bool, record: bool = True) -> None:
    """Refuse, in one line, to reuse a result (a sampled data file, a training, a matrix, an
    evaluation) that was made with other settings than the config now gives: changing
    ``heldout_per_lang`` or a cell's ``connection`` must not report the old numbers under the new
    config. A result from before settings were recorded takes the current ones (``record``)."""
    settings = json.loads(json.dumps(settings))
    side = _sidecar(result)
    if exists and side.is_file():
        if said := _first_difference(json.loads(side.read_text(encoding="utf-8")), settings):
            raise CCError(
                f"{result}: made with other settings ({said}); give another output folder, "
                f"or delete {result} to redo it"
            )
    elif exists and record:
        logger.info("%s: recording the settings it is reused with (it predates recorded settings)", result)
        write_json(side, settings)


def record_settings(result: Path, settings: dict) -> None:
    """Record the settings a result is (being) made with, for :func:`check_settings`."""
    write_json(_sidecar(result), settings)


def make_once(result: Path, settings: dict, *, exists: bool, make: typing.Callable[[], object]) -> None:
    """Reuse ``result`` when it ``exists`` (refused in one line when it was made with other
    ``settings``: :func:`check_settings`); else ``make()`` it, then record the settings it was made
    with. A training is the exception: it records its settings before it starts, because an
    interrupted one is resumed from its checkpoint."""
    check_settings(result, settings, exists=exists)
    if not exists:
        make()
        record_settings(result, settings)


def _train_data_settings(cfg: ExperimentConfig, seed: int) -> dict:
    """What a seed's training records are: the user's ``data``, or the bundled mix's sample."""
    if cfg.data:
        return {"data": cfg.data, "data_format": cfg.data_format, "columns": cfg.columns, "split": cfg.split}
    return {"train_per_lang": cfg.train_per_lang, "langs": cfg.langs, "seed": seed}


def _heldout_settings(cfg: ExperimentConfig) -> dict:
    """What the held-out records are: the user's ``heldout_data``, or the bundled mix's sample."""
    if cfg.heldout_data:
        return {
            "heldout_data": cfg.heldout_data,
            "data_format": cfg.data_format,
            "columns": cfg.columns,
            "heldout_split": cfg.heldout_split,
        }
    return {"heldout_per_lang": cfg.heldout_per_lang, "langs": cfg.langs, "heldout_seed": cfg.heldout_seed}


def _answer_settings(cfg: ExperimentConfig, benchmark: str) -> dict:
    """Which of a benchmark's gold answers are scored (``answer_nll:``'s langs and limit)."""
    return {
        "benchmark": benchmark,
        "langs": cfg.answer_nll.get("langs"),
        "limit": cfg.answer_nll.get("limit"),
    }


def _training_settings(cfg: ExperimentConfig, cell: Cell, seed: int) -> dict:
    """What a training is: the base model, the training options and the records."""
    return {"model": cfg.model, "options": cell.options, "data": _train_data_settings(cfg, seed)}


def _stage_settings(cfg: ExperimentConfig, cell: Cell, seed: int, kind: str) -> dict:
    """What one evaluation of a cell is (``kind``: ``nll``, ``bench`` or ``answer-nll-<B>``): the
    training, the connection it runs with, the matrix, and the evaluation's own settings."""
    settings = {
        "training": _training_settings(cfg, cell, seed),
        "connection": cell.connection,
        "sample_layer": cell.sample_layer,
    }
    if cell.connection == "transform":
        settings["matrix_samples"] = cfg.matrix_samples
    if kind == "nll":
        settings["heldout"] = _heldout_settings(cfg)
        settings["max_length"] = cell.options.get("max_length", 1024)
    elif kind == "bench":
        settings["benchmarks"] = cfg.benchmarks
    else:
        settings["answers"] = _answer_settings(cfg, kind.removeprefix("answer-nll-"))
        settings["max_length"] = int(cfg.answer_nll.get("max_length", 1024))
    return settings


class StageClock:
    """Wall-clock seconds of every finished stage, in ``stages.json``, kept across resumed invocations."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        )

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Record the seconds of stage ``name`` once it finishes (a stage that fails records nothing)."""
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        write_json(self.path, self.seconds)


@dataclass
class _SeedRun:
    """What every stage of one seed needs."""

    root: Path
    model_path: str
    seed: int
    train_file: Path
    held_file: Path
    stages: StageClock
    progress: bool
    train_options: typing.Any = None  # DataOptions of the user's training data (None: the mix sample)
    held_options: typing.Any = None  # ... of the user's held-out data


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


def select_cells(cfg: ExperimentConfig, names: list[str]) -> None:
    """Keep only the cells named (in the config's order); an unknown name is a one-line error."""
    known = [c["name"] for c in cfg.cells]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CCError(f"unknown cell {', '.join(unknown)} (cells: {', '.join(known)})")
    cfg.cells = [c for c in cfg.cells if c["name"] in names]
    if cfg.baseline not in names:
        cfg.baseline = None


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

    ``jobs`` ≥ 1 runs the grid's :func:`plan_jobs` as that many ``cctuning experiment`` processes at
    a time, each in its own folder under ``<output>/jobs/`` (re-reading ``config_path``), with
    ``CUDA_VISIBLE_DEVICES`` taken in turn from ``devices`` when given; the report then reads the
    jobs' folders. ``report_only`` writes the report from the evaluations already on disk (a
    parallel run's job folders where they exist) and trains nothing: a missing evaluation is an
    error naming it. ``write_report=False`` runs the stages only (a job of a parallel run).
    """
    from cctuning.loading import resolve_model_path
    from cctuning.versions import versions

    root = Path(cfg.output)
    with folder_lock(root, "cctuning experiment"):  # a second runner on the same folder is refused
        started = time.time()
        model_path = cfg.model if report_only else resolve_model_path(cfg.model)
        if report_only:
            cell_runs, seconds, parallel = _collect_runs(cfg, root)
        elif jobs:
            _check_finished(cfg, root, resolve_cells(cfg), jobs=True)  # before any job trains
            write_json(root / "experiment_config.json", {"config": asdict(cfg), "versions": versions()})
            _run_jobs(cfg, root, jobs, devices, config_path, progress)
            cell_runs, seconds, parallel = _collect_runs(cfg, root)
        else:
            cells = resolve_cells(cfg)
            _check_finished(cfg, root, cells)  # before hours of training, not after
            write_json(root / "experiment_config.json", {"config": asdict(cfg), "versions": versions()})
            stages = StageClock(root / STAGES_NAME)
            cell_runs = {}
            for seed in cfg.seeds:
                train_file, held_file = _seed_data(cfg, root, seed)
                run = _SeedRun(
                    root,
                    str(model_path),
                    seed,
                    train_file,
                    held_file,
                    stages,
                    progress,
                    data_options(cfg, heldout=False),
                    data_options(cfg, heldout=True),
                )
                for name, result in _run_seed(cfg, cells, run).items():
                    cell_runs.setdefault(name, {})[seed] = result
            seconds, parallel = stages.seconds, 0
        if not write_report:
            return {"cells": {}, "stage_seconds": seconds}
        return _write_report(
            cfg, root, cell_runs, seconds, time.time() - started, model_path, parallel_jobs=parallel
        )


@dataclass(frozen=True)
class _Evaluation:
    """One evaluation the config asks of a cell and seed: its kind (``nll``, ``answer-nll-<B>`` or
    ``bench``, as :func:`_stage_settings` takes it), its folder, and the file that is there once it
    has finished."""

    kind: str
    folder: Path
    result: Path

    @property
    def finished(self) -> bool:
        return self.result.is_file()


def _evaluations(cfg: ExperimentConfig, root: Path, cell_name: str, seed: int) -> dict[str, _Evaluation]:
    """Every evaluation of a cell and seed under ``root``, finished or not, by kind, in the order a
    seed's stages make them: the held-out NLL, each benchmark's answer likelihood, the benchmarks.
    The one place that says where an evaluation lives and when it counts as done."""
    from cctuning.eval.nll import NLL_NAME
    from cctuning.eval.runner import RESULTS_NAME

    edir = eval_dir(root, cell_name, seed)
    found = [_Evaluation("nll", edir / "nll", edir / "nll" / NLL_NAME)]
    for bench_name in answer_benchmarks(cfg):
        folder = edir / answer_nll_name(bench_name)
        found.append(_Evaluation(answer_nll_name(bench_name), folder, folder / NLL_NAME))
    if cfg.benchmarks:
        found.append(_Evaluation("bench", edir / "bench", edir / "bench" / RESULTS_NAME))
    return {ev.kind: ev for ev in found}


def _check_cell(cfg: ExperimentConfig, root: Path, cell: Cell, seed: int) -> None:
    """Every finished evaluation of a cell and seed was made with the config's settings (one-line
    error): checked before a run trains anything, and before a report shows them. An evaluation not
    made yet has nothing to check (its stage records its settings when it runs)."""
    for ev in _evaluations(cfg, root, cell.name, seed).values():
        if ev.finished:
            check_settings(ev.folder, _stage_settings(cfg, cell, seed, ev.kind), exists=True, record=False)


def _check_finished(cfg: ExperimentConfig, root: Path, cells: list[Cell], jobs: bool = False) -> None:
    """:func:`_check_cell` over the grid: in ``root``, or (``jobs``) in each job's own folder of a
    parallel run (``jobs/<job>``), where that job's evaluations are made; a job folder that does not
    exist yet holds nothing to check."""
    by_name = {cell.name: cell for cell in cells}
    for job in plan_jobs(cfg):
        base = job_root(root, job) if jobs else root
        for name in job.cells:
            _check_cell(cfg, base, by_name[name], job.seed)


def _run_jobs(cfg, root: Path, jobs: int, devices, config_path, progress: bool) -> None:
    """Run :func:`plan_jobs` as ``jobs`` child processes at a time; each writes its log beside its
    folder (``jobs/<job>.log``). A failed job does not stop the others; the failures are reported
    together at the end, each with its log's last line."""
    import os
    import subprocess
    import sys

    if config_path is None:
        raise CCError("a parallel experiment (--jobs) needs the config file its jobs re-read")
    planned = plan_jobs(cfg)
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(planned)))
    pending, running, failed = list(enumerate(planned)), [], []
    previous = _stop_on_sigterm()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(planned), desc="experiment jobs", unit="job")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, job = pending.pop(0)
                env = dict(os.environ)
                if devices:
                    env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
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
                running.append((job, proc, log_path))
            time.sleep(0.5)
            for entry in list(running):
                job, proc, log_path = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                if bar is not None:
                    bar.update(1)
                if proc.returncode != 0:
                    lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                    failed.append(
                        f"{job.name} (exit {proc.returncode}, {log_path}: {lines[-1] if lines else ''})"
                    )
                    logger.error("job %s failed: see %s", job.name, log_path)
                else:
                    logger.info("job %s finished", job.name)
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


def _stop_on_sigterm():
    """In the main thread: SIGTERM raises KeyboardInterrupt, so that a runner stopped with ``kill``
    stops its jobs too instead of leaving them running alone; returns the handler it replaced."""
    import threading

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
            evs = _evaluations(cfg, base, name, job.seed)
            if not evs["nll"].finished:
                raise CCError(
                    f"{evs['nll'].result}: missing: cell '{name}' seed {job.seed} has no held-out NLL yet"
                )
            # the report must not show results made with other settings under this config's names
            _check_cell(cfg, base, resolved[name], job.seed)
            bench = None
            if "bench" in evs:
                if evs["bench"].finished:
                    bench = json.loads(evs["bench"].result.read_text(encoding="utf-8"))
                else:  # the report shows the held-out NLL, and no benchmark score for this cell
                    logger.warning(
                        "%s: missing: cell '%s' seed %d has no benchmarks yet",
                        evs["bench"].result,
                        name,
                        job.seed,
                    )
            answers = {}
            for bench_name in answer_benchmarks(cfg):
                ev = evs[answer_nll_name(bench_name)]
                if ev.finished:
                    answers[bench_name] = ev.folder
                else:  # the report leaves this cell out of that benchmark's answer-likelihood table
                    logger.warning(
                        "%s: missing: cell '%s' seed %d has no %s answer NLL yet",
                        ev.result,
                        name,
                        job.seed,
                        bench_name,
                    )
            cell_runs.setdefault(name, {})[job.seed] = {
                "nll": json.loads(evs["nll"].result.read_text(encoding="utf-8")),
                "bench": bench,
                "nll_dir": evs["nll"].folder,
                "answer_nll": answers,
            }
    # the config's cell order, whatever order the jobs came in
    return {name: cell_runs[name] for name in resolved if name in cell_runs}, seconds, parallel


def _seed_data(cfg: ExperimentConfig, root: Path, seed: int) -> tuple[Path, Path]:
    """The seed's training sample and the held-out sample (written once, then reused); the user's
    ``data`` and ``heldout_data`` instead where given."""
    from cctuning.data.mix import sample_mix
    from cctuning.io import write_jsonl

    langs = None if cfg.langs == "all" else split_list(cfg.langs)
    data_dir = root / "data" / f"seed{seed}"
    train_file, held_file = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    if cfg.data:
        train_file = Path(cfg.data)
    else:
        make_once(
            train_file,
            _train_data_settings(cfg, seed),
            exists=train_file.is_file(),
            make=lambda: write_jsonl(train_file, sample_mix("train", cfg.train_per_lang, langs, seed)),
        )
    if cfg.heldout_data:
        held_file = Path(cfg.heldout_data)
    else:
        # the held-out items are the same for every seed, so that seeds can be compared pairwise
        make_once(
            held_file,
            _heldout_settings(cfg),
            exists=held_file.is_file(),
            make=lambda: write_jsonl(
                held_file, sample_mix("heldout", cfg.heldout_per_lang, langs, cfg.heldout_seed)
            ),
        )
    return train_file, held_file


def _run_seed(cfg: ExperimentConfig, cells: list[Cell], run: _SeedRun) -> dict[str, dict]:
    """Every cell for one seed, stage by stage over the cells: each cell's training (shared with
    cells of the same options), its matrix when it is evaluated with the transform and its held-out
    NLL; then every cell's answer likelihood; then every cell's benchmarks (generation, the slowest
    and, at small scale, the least informative), so that a run cut short has the cheap evaluations
    of every cell. Each stage is skipped when its result is already on disk."""
    tdirs = {cell.name: run.root / "train" / cell.train_name / f"seed{run.seed}" for cell in cells}
    evs = {cell.name: _evaluations(cfg, run.root, cell.name, run.seed) for cell in cells}
    for cell in cells:
        _train_stage(cfg, cell, tdirs[cell.name], run)
        if cell.connection == "transform":
            _matrix_stage(cfg, cell, tdirs[cell.name], run)
        _nll_stage(cfg, cell, tdirs[cell.name], evs[cell.name]["nll"], run)
    for bench_name in answer_benchmarks(cfg):
        for cell in cells:
            ev = evs[cell.name][answer_nll_name(bench_name)]
            _answer_nll_stage(cfg, cell, bench_name, tdirs[cell.name], ev, run)
    results = {}
    for cell in cells:
        ev = evs[cell.name]
        results[cell.name] = {
            "nll": json.loads(ev["nll"].result.read_text(encoding="utf-8")),
            "bench": _bench_stage(cfg, cell, tdirs[cell.name], ev["bench"], run) if "bench" in ev else None,
            "nll_dir": ev["nll"].folder,
            "answer_nll": {b: ev[answer_nll_name(b)].folder for b in answer_benchmarks(cfg)},
        }
    return results


def _train_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, run: _SeedRun) -> None:
    from cctuning.training import TrainConfig
    from cctuning.training.run import TRAIN_RESULTS_NAME, last_checkpoint, train_or_reuse

    settings = _training_settings(cfg, cell, run.seed)
    # a checkpoint is resumed, so it must have been trained with the same settings too
    check_settings(
        tdir, settings, exists=(tdir / TRAIN_RESULTS_NAME).is_file() or bool(last_checkpoint(tdir))
    )
    if (tdir / TRAIN_RESULTS_NAME).is_file():
        return
    record_settings(tdir, settings)
    logger.info("training %s seed %d -> %s", cell.name, run.seed, tdir)
    tcfg = TrainConfig(
        **{
            **cell.options,
            "model": run.model_path,
            "data": str(run.train_file),
            **(
                {"data_format": o.format, "columns": dict(o.columns) or None, "split": o.split}
                if (o := run.train_options)
                else {}
            ),
            "output": str(tdir),
            "seed": run.seed,
        }
    )
    with run.stages(stage_key("train", cell.train_name, run.seed)):
        train_or_reuse(tcfg)  # resumes an interrupted training


def _matrix_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, run: _SeedRun) -> None:
    from cctuning.inference.matrix import fit_matrix_from_file
    from cctuning.loading import load_for_inference
    from cctuning.model.transform import MATRIX_NAME

    def make() -> None:
        with run.stages(stage_key("matrix", cell.train_name, run.seed)):
            model, tok, _ = load_for_inference(str(tdir))
            fit = fit_matrix_from_file(
                model,
                tok,
                run.train_file,
                tdir,
                data_options=run.train_options,
                samples=cfg.matrix_samples,
                seed=run.seed,
                progress=run.progress,
            )
        if fit.heldout:
            logger.info(
                "transform matrix of %s: held-out cosine %.4f -> %.4f",
                tdir,
                fit.heldout["before"]["cosine"],
                fit.heldout["after"]["cosine"],
            )

    matrix = tdir / MATRIX_NAME
    settings = {"matrix_samples": cfg.matrix_samples, "data": _train_data_settings(cfg, run.seed)}
    make_once(matrix, settings, exists=matrix.is_file(), make=make)


def _evaluation_stage(
    cfg: ExperimentConfig,
    cell: Cell,
    tdir: Path,
    ev: _Evaluation,
    run: _SeedRun,
    evaluate: typing.Callable[[typing.Any, typing.Any], object],
) -> None:
    """One evaluation of a cell's trained model, unless it is finished (:func:`make_once`):
    ``evaluate(model, tokenizer)`` writes into ``ev.folder``, timed as stage ``<kind>/<cell>/seed<N>``."""
    from cctuning.loading import load_for_inference

    def make() -> None:
        with run.stages(stage_key(ev.kind, cell.name, run.seed)):
            model, tok, _ = load_for_inference(str(tdir))
            evaluate(model, tok)

    make_once(ev.folder, _stage_settings(cfg, cell, run.seed, ev.kind), exists=ev.finished, make=make)


def _nll_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, ev: _Evaluation, run: _SeedRun) -> None:
    from cctuning.eval.nll import evaluate_nll

    _evaluation_stage(
        cfg,
        cell,
        tdir,
        ev,
        run,
        lambda model, tok: evaluate_nll(
            model,
            tok,
            run.held_file,
            cell.connection,
            ev.folder,
            batch_size=cfg.eval_batch_size,
            max_length=cell.options.get("max_length", 1024),
            seed=run.seed,
            progress=run.progress,
            model_name=str(tdir),
            sample_layer=cell.sample_layer,
            data_options=run.held_options,
        ),
    )


def answer_nll_name(benchmark: str) -> str:
    """The folder, in a cell's evaluation folder, of a benchmark's answer likelihood."""
    return f"answer-nll-{benchmark}"


def _answer_records_file(cfg: ExperimentConfig, root: Path, benchmark: str) -> Path:
    """The benchmark's gold answers as records (``eval --nll BENCHMARK``'s), written once under
    ``data/answers/`` and the same for every seed and cell, so that they compare item by item."""
    from cctuning.eval.benchmarks import answer_records
    from cctuning.io import write_jsonl

    a = cfg.answer_nll
    file = root / "data" / "answers" / f"{benchmark}.jsonl"
    langs = split_list(str(a["langs"])) if a.get("langs") else None
    make_once(
        file,
        _answer_settings(cfg, benchmark),
        exists=file.is_file(),
        make=lambda: write_jsonl(file, answer_records(benchmark, langs, None, a.get("limit"))),
    )
    return file


def _answer_nll_stage(
    cfg: ExperimentConfig, cell: Cell, benchmark: str, tdir: Path, ev: _Evaluation, run: _SeedRun
) -> None:
    from cctuning.eval.nll import evaluate_nll

    records = _answer_records_file(cfg, run.root, benchmark)
    _evaluation_stage(
        cfg,
        cell,
        tdir,
        ev,
        run,
        lambda model, tok: evaluate_nll(
            model,
            tok,
            records,
            cell.connection,
            ev.folder,
            batch_size=cfg.eval_batch_size,
            # the benchmark's prompts (a context and a question) are longer than training records
            max_length=int(cfg.answer_nll.get("max_length", 1024)),
            seed=run.seed,
            progress=run.progress,
            model_name=str(tdir),
            sample_layer=cell.sample_layer,
        ),
    )


def bench_config(
    cfg: ExperimentConfig, model: str, connection: str, output: Path, seed: int, sample_layer: int = 0
):
    """The :class:`~cctuning.eval.runner.EvalConfig` of the experiment's ``benchmarks:`` spec."""
    from cctuning.eval.runner import EvalConfig

    b = cfg.benchmarks
    return EvalConfig(
        model=model,
        benchmarks=split_list(str(b.get("names", ""))),
        langs=split_list(str(b["langs"])) if b.get("langs") else None,
        limit=b.get("limit"),
        limits={str(k): int(v) for k, v in (b.get("limits") or {}).items()},
        connection=connection,
        scoring=b.get("scoring", "generate"),
        max_new_tokens=b.get("max_new_tokens", 40),
        batch_size=cfg.eval_batch_size,
        output=str(output),
        seed=seed,
        sample_layer=sample_layer,
    )


def _bench_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, ev: _Evaluation, run: _SeedRun) -> dict:
    from cctuning.eval.runner import evaluate

    spec = bench_config(cfg, str(tdir), cell.connection, ev.folder, run.seed, cell.sample_layer)
    _evaluation_stage(
        cfg, cell, tdir, ev, run, lambda model, tok: evaluate(spec, model, tok, progress=run.progress)
    )
    return json.loads(ev.result.read_text(encoding="utf-8"))


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
    from cctuning.versions import versions

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
        "benchmarks": cfg.benchmarks,
        "answer_nll": cfg.answer_nll,
    }
    report["date"] = time.strftime("%Y-%m-%d")
    report["versions"] = versions()
    write_json(root / "report.json", report)
    write_text(root / "report.md", experiment_markdown(report) + "\n")
    return report


def _nll_summary(nlls: dict, dirs: dict, base_dirs: dict | None, load_items) -> dict:
    """One cell's NLL runs over seeds (``nlls``: seed -> nll.json, ``dirs``: seed -> its folder):
    per language the mean and t-interval over seeds; against the baseline's runs of the same
    seeds (``base_dirs``), the paired difference per seed averaged with a t-interval over seeds
    (the bootstrap interval over items when there is one seed), and with several seeds the pooled
    difference with a bootstrap over seeds and items (:func:`~cctuning.eval.nll.paired_difference_over_seeds`).
    ``load_items`` reads a run's items (the caller's, so that it can read each folder once)."""
    from cctuning.eval.nll import paired_difference, paired_difference_over_seeds

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
                v = paired_difference(load_items(dirs[b]), load_items(dirs[a]), seed=a)["all"]
                out["between_seeds"][f"{b}-{a}"] = {
                    "mean": v["diff"], "ci_low": v["ci_low"], "ci_high": v["ci_high"], "n": 1
                }  # fmt: skip
    if base_dirs is None:
        return out
    diffs: dict[str, list[float]] = {}
    pairs = []
    for seed, run_dir in dirs.items():
        pair = (load_items(run_dir), load_items(base_dirs[seed]))
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


def summarize_experiment(cfg, cell_runs, baseline) -> dict:
    """Mean and interval over seeds per cell; paired differences to the baseline per language, for
    the held-out NLL and for each benchmark's answer likelihood."""
    from cctuning.eval.nll import NLL_NAME, load_items

    # every cell is paired with the baseline's runs: read each run's items once
    load = functools.cache(lambda run_dir: load_items(Path(run_dir)))

    out: dict = {"baseline": baseline, "seeds": cfg.seeds, "cells": {}}
    for name, per_seed in cell_runs.items():
        base = cell_runs.get(baseline, {})
        s = _nll_summary(
            {seed: r["nll"] for seed, r in per_seed.items()},
            {seed: r["nll_dir"] for seed, r in per_seed.items()},
            {seed: base[seed]["nll_dir"] for seed in per_seed} if name != baseline else None,
            load,
        )
        cell: dict = {"nll": s["nll"]}
        if "between_seeds" in s:
            cell["nll_between_seeds"] = s["between_seeds"]
        if "diff" in s:
            cell["nll_diff_to_baseline"] = s["diff"]
        if "pooled" in s:
            cell["nll_diff_pooled"] = s["pooled"]
        for bench_name in answer_benchmarks(cfg):
            dirs = {seed: r.get("answer_nll", {}).get(bench_name) for seed, r in per_seed.items()}
            base_dirs = {seed: base.get(seed, {}).get("answer_nll", {}).get(bench_name) for seed in per_seed}
            if any(d is None for d in dirs.values()) or (
                name != baseline and any(d is None for d in base_dirs.values())
            ):
                continue  # not every seed of the cell (or of the baseline) has it yet
            s = _nll_summary(
                {
                    seed: json.loads((Path(d) / NLL_NAME).read_text(encoding="utf-8"))
                    for seed, d in dirs.items()
                },
                dirs,
                base_dirs if name != baseline else None,
                load,
            )
            cell.setdefault("answer_nll", {})[bench_name] = s
        benches = [r["bench"] for r in per_seed.values()]
        first = benches[0] if all(b is not None for b in benches) else None  # every seed, or none
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
    scored = [n for n in names if "benchmarks" in cells[n]]
    if scored:
        lines += [
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
                    _fmt(cells[n]["benchmarks"][bench]["average"], 1, 100) if n in scored else "—"
                    for n in names
                )
                + " |"
            )
    return "\n".join(lines)
