"""What makes a result reusable: the settings it was made with, recorded beside it and compared with
what the config now gives (:func:`check_settings`, :func:`make_once`), the settings of every kind of
stage, and where each evaluation of a cell and seed lives and when it counts as done
(:func:`_evaluations`)."""

from __future__ import annotations

import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval.nll import NLL_NAME
from cctuning.eval.runner import RESULTS_NAME
from cctuning.io import write_json
from cctuning.lab.experiment.config import (
    Cell,
    ExperimentConfig,
    answer_benchmarks,
    answer_nll_name,
    eval_dir,
    heldout_budget,
    train_dir,
)
from cctuning.model.transform import MATRIX_REPORT_NAME
from cctuning.training.run import TRAIN_RESULTS_NAME

logger = logging.getLogger(__name__)

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
    if cell.withhold_english:  # recorded only when set, so that earlier results keep their settings
        settings["withhold_english"] = True
    if cell.connection == "transform":
        settings["matrix_samples"] = cfg.matrix_samples
    if kind == "nll":
        settings["heldout"] = _heldout_settings(cfg)
        settings["max_length"] = heldout_budget(cfg, cell)
    elif kind == "bench":
        settings["benchmarks"] = cfg.benchmarks
    else:
        settings["answers"] = _answer_settings(cfg, kind.removeprefix("answer-nll-"))
        settings["max_length"] = int(cfg.answer_nll.get("max_length", 1024))
    return settings


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


def matrix_fit(root: Path, cell: Cell, seed: int) -> dict | None:
    """How many pairs a cell's Transform Matrix was fitted on (``fit``) and held out to measure its
    error (``heldout``), from the report saved beside it; None for a cell evaluated without the
    transform, or whose matrix is not fitted yet."""
    report = train_dir(root, cell, seed) / MATRIX_REPORT_NAME
    if cell.connection != "transform" or not report.is_file():
        return None
    meta = json.loads(report.read_text(encoding="utf-8"))
    return {"fit": meta.get("fit_pairs"), "heldout": meta.get("heldout_pairs")}


def training_budget(tdir: Path) -> dict | None:
    """What a training trained on: its examples (the records after ``augment``) and optimizer steps,
    from its ``train_results.json``; None before it has finished."""
    results = tdir / TRAIN_RESULTS_NAME
    if not results.is_file():
        return None
    data = json.loads(results.read_text(encoding="utf-8"))
    return {
        "augment": data["config"].get("augment", "none"),
        "records": data.get("records"),
        "examples": data.get("examples", data.get("records")),  # before --augment: one per record
        "steps": data.get("global_step"),
    }
