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

The parts: :mod:`.config` (the config, its checks and its cells), :mod:`.reuse` (the settings every
result is recorded and reused with), :mod:`.stages` (the sequential run's stages), :mod:`.jobs` (a
parallel run, and reading the evaluations back), :mod:`.report` (the summaries and ``report.md``)
and :mod:`.run` (:func:`run_experiment`, which runs them).
"""

from cctuning.lab.experiment.config import (
    Cell,
    ExperimentConfig,
    answer_benchmarks,
    answer_nll_name,
    bench_config,
    data_options,
    eval_dir,
    load_config,
    resolve_cells,
    select_baseline,
    select_cells,
    stage_key,
)
from cctuning.lab.experiment.jobs import Job, job_root, plan_jobs
from cctuning.lab.experiment.report import experiment_markdown, summarize_experiment
from cctuning.lab.experiment.reuse import check_settings, make_once, record_settings
from cctuning.lab.experiment.run import run_experiment

__all__ = [
    "Cell",
    "ExperimentConfig",
    "Job",
    "answer_benchmarks",
    "answer_nll_name",
    "bench_config",
    "check_settings",
    "data_options",
    "eval_dir",
    "experiment_markdown",
    "job_root",
    "load_config",
    "make_once",
    "plan_jobs",
    "record_settings",
    "resolve_cells",
    "run_experiment",
    "select_baseline",
    "select_cells",
    "stage_key",
    "summarize_experiment",
]
