"""The stages of a sequential run, seed by seed: the seed's data samples, then per cell its training,
its Transform Matrix, its held-out NLL, each benchmark's answer likelihood and the benchmarks
(:func:`_run_seeds`). Every stage is skipped when its result is already on disk, and refused when
that result was made with other settings (:mod:`cctuning.lab.experiment.reuse`)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from cctuning.config import split_list
from cctuning.data.formats import DataOptions
from cctuning.data.mix import sample_mix
from cctuning.eval.benchmarks import answer_records
from cctuning.eval.nll import evaluate_nll
from cctuning.eval.runner import evaluate
from cctuning.inference.matrix import fit_matrix_from_file
from cctuning.io import is_incomplete, write_json, write_jsonl, write_text
from cctuning.lab.diagnostics import TRAINER_STATE_NAME
from cctuning.lab.experiment.config import (
    STAGES_NAME,
    Cell,
    ExperimentConfig,
    answer_benchmarks,
    answer_nll_name,
    bench_config,
    data_options,
    heldout_budget,
    stage_key,
    train_dir,
)
from cctuning.lab.experiment.reuse import (
    _answer_settings,
    _Evaluation,
    _evaluations,
    _heldout_settings,
    _stage_settings,
    _train_data_settings,
    _training_settings,
    check_settings,
    make_once,
    matrix_fit,
    record_settings,
    training_budget,
)
from cctuning.loading import load_for_inference
from cctuning.model.transform import MATRIX_NAME
from cctuning.training import TrainConfig
from cctuning.training.run import TRAIN_RESULTS_NAME, last_checkpoint, train_or_reuse

logger = logging.getLogger(__name__)


class StageClock:
    """Wall-clock seconds of every finished stage, in ``stages.json``, kept across resumed invocations.

    A stage that an invocation does not finish (stopped with Ctrl-C, or failing) keeps its seconds so
    far in ``stages_unfinished.json``; the invocation that finishes it adds them, so that a training
    resumed from a checkpoint counts every invocation's time (including the steps the stop lost after
    the last checkpoint). A process killed outright (SIGKILL, power loss) records nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.unfinished_path = path.with_name(f"{path.stem}_unfinished{path.suffix}")
        self.seconds: dict[str, float] = self._read(path)
        self.unfinished: dict[str, float] = self._read(self.unfinished_path)

    @staticmethod
    def _read(path: Path) -> dict[str, float]:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Record the seconds of stage ``name`` once it finishes, with those of the invocations before
        that stopped it; a stage that stops is kept as unfinished."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.unfinished[name] = round(self.unfinished.get(name, 0.0) + time.perf_counter() - t0, 1)
            write_json(self.unfinished_path, self.unfinished)
            raise
        before = self.unfinished.pop(name, None)
        self.seconds[name] = round((before or 0.0) + time.perf_counter() - t0, 1)
        write_json(self.path, self.seconds)
        if before is not None:
            write_json(self.unfinished_path, self.unfinished)


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
    train_options: DataOptions | None = None  # how the user's training data is read (None: the mix sample)
    held_options: DataOptions | None = None  # ... the user's held-out data


def _seed_data(cfg: ExperimentConfig, root: Path, seed: int) -> tuple[Path, Path]:
    """The seed's training sample and the held-out sample (written once, then reused); the user's
    ``data`` and ``heldout_data`` instead where given."""
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
    tdirs = {cell.name: train_dir(run.root, cell, run.seed) for cell in cells}
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
            "matrix": matrix_fit(run.root, cell, run.seed),
            "training": training_budget(tdirs[cell.name]),
        }
    return results


def _train_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, run: _SeedRun) -> None:
    settings = _training_settings(cfg, cell, run.seed)
    # a checkpoint is resumed, so it must have been trained with the same settings too
    check_settings(
        tdir, settings, exists=(tdir / TRAIN_RESULTS_NAME).is_file() or bool(last_checkpoint(tdir))
    )
    if (tdir / TRAIN_RESULTS_NAME).is_file():
        drop_checkpoints(tdir, cfg.keep_checkpoints)  # a training finished before this version kept them
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
    drop_checkpoints(tdir, cfg.keep_checkpoints)


def drop_checkpoints(tdir: Path, keep: bool = False) -> None:
    """Remove the ``checkpoint-*`` folders of a finished training (unless ``keep``): they serve only to
    resume it. Finished means its final model is saved: ``train_results.json`` is written after it and
    no interrupted save left its marker; an interrupted training keeps them. The newest checkpoint's
    ``trainer_state.json`` (the training's log, which ``cctuning report`` reads) is kept in ``tdir``."""
    checkpoints = sorted(p for p in tdir.glob("checkpoint-*") if p.is_dir())
    if keep or not checkpoints or not (tdir / TRAIN_RESULTS_NAME).is_file() or is_incomplete(tdir):
        return
    newest = last_checkpoint(tdir)
    if newest and not (tdir / TRAINER_STATE_NAME).is_file():
        write_text(tdir / TRAINER_STATE_NAME, (Path(newest) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    freed = sum(f.stat().st_size for c in checkpoints for f in c.rglob("*") if f.is_file())
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)
    logger.info(
        "%s: finished, so its %d checkpoint(s) were removed (%.1f MB freed)",
        tdir,
        len(checkpoints),
        freed / 1e6,
    )


def _matrix_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, run: _SeedRun) -> None:
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

    def make() -> None:
        with run.stages(stage_key(ev.kind, cell.name, run.seed)):
            model, tok, _ = load_for_inference(str(tdir))
            evaluate(model, tok)

    make_once(ev.folder, _stage_settings(cfg, cell, run.seed, ev.kind), exists=ev.finished, make=make)


def _nll_evaluation(
    cfg: ExperimentConfig,
    cell: Cell,
    tdir: Path,
    ev: _Evaluation,
    run: _SeedRun,
    data,
    max_length: int,
    **options,
) -> None:
    """The held-out NLL or a benchmark's answer likelihood of one cell: ``evaluate_nll`` of ``data``
    within ``max_length`` tokens, as one evaluation stage (``options``: e.g. ``data_options``)."""
    _evaluation_stage(
        cfg,
        cell,
        tdir,
        ev,
        run,
        lambda model, tok: evaluate_nll(
            model,
            tok,
            data,
            cell.connection,
            ev.folder,
            batch_size=cfg.eval_batch_size,
            max_length=max_length,
            seed=run.seed,
            progress=run.progress,
            model_name=str(tdir),
            sample_layer=cell.sample_layer,
            withhold_english=cell.withhold_english,
            **options,
        ),
    )


def _nll_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, ev: _Evaluation, run: _SeedRun) -> None:
    budget = heldout_budget(cfg, cell)
    _nll_evaluation(cfg, cell, tdir, ev, run, run.held_file, budget, data_options=run.held_options)


def _answer_records_file(cfg: ExperimentConfig, root: Path, benchmark: str) -> Path:
    """The benchmark's gold answers as records (``eval --nll BENCHMARK``'s), written once under
    ``data/answers/`` and the same for every seed and cell, so that they compare item by item."""
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
    records = _answer_records_file(cfg, run.root, benchmark)
    # the benchmark's prompts (a context and a question) are longer than training records
    _nll_evaluation(cfg, cell, tdir, ev, run, records, int(cfg.answer_nll.get("max_length", 1024)))


def _bench_stage(cfg: ExperimentConfig, cell: Cell, tdir: Path, ev: _Evaluation, run: _SeedRun) -> dict:
    spec = bench_config(
        cfg, str(tdir), cell.connection, ev.folder, run.seed, cell.sample_layer, cell.withhold_english
    )
    _evaluation_stage(
        cfg, cell, tdir, ev, run, lambda model, tok: evaluate(spec, model, tok, progress=run.progress)
    )
    return json.loads(ev.result.read_text(encoding="utf-8"))


def _run_seeds(cfg: ExperimentConfig, root: Path, cells: list[Cell], model_path: str, progress: bool):
    """The sequential run: every seed's stages in turn (:func:`_run_seed`), timed in ``stages.json``;
    returns the evaluations by cell and seed, and the seconds of every stage finished so far."""
    stages = StageClock(root / STAGES_NAME)
    cell_runs: dict[str, dict[int, dict]] = {}
    for seed in cfg.seeds:
        train_file, held_file = _seed_data(cfg, root, seed)
        run = _SeedRun(
            root,
            model_path,
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
    return cell_runs, stages.seconds
