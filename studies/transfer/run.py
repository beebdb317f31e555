"""Running the study: one seed's pipeline (its world, stage 1, the stage-2 trainings, the Transform
Matrix and the evaluation cells) and every seed followed by ``summary.json`` and ``summary.md``."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from cctuning.data.records import load_records
from cctuning.errors import CCError
from cctuning.inference.matrix import fit_transform_matrix
from cctuning.io import write_json, write_jsonl, write_text
from cctuning.loading import load_for_inference
from cctuning.stats import accuracy_summary, paired_bootstrap_mean
from cctuning.training import TrainConfig, train
from studies.transfer.config import (
    BASELINE,
    CELLS,
    TRAININGS,
    TransferConfig,
    check_train_options,
    trained_methods,
)
from studies.transfer.probes import entity_probes
from studies.transfer.scoring import (
    activation_diagnostics,
    correct,
    english_items,
    layer_histogram,
    majority_baseline,
    score_candidates,
)
from studies.transfer.summary import SUMMARY_MD_NAME, SUMMARY_NAME, summarize, summary_markdown
from studies.transfer.world import (
    FOREIGN_LANG,
    World,
    build_model,
    build_tokenizer,
    build_world,
    eval_items,
    matrix_records,
    stage1_records,
    stage2_records,
)

logger = logging.getLogger(__name__)

WORLD_NAME = "world.json"  # written first into a seed folder; marks the folder as ours to rewrite
CONNECTED = "cc"  # the stage-2 training whose model gets the Transform Matrix


@dataclass
class SeedData:
    """What one seed's trainings and evaluations read, as written into its folder."""

    world: World
    base: Path  # the randomly initialised model and the tokenizer
    stage1_rows: list[dict]
    stage2_rows: list[dict]
    stage1_file: Path
    stage2_file: Path
    matrix_file: Path  # the parallel sentences the Transform Matrix is fitted on
    held: list[dict]  # the held-out entities' questions: the evaluation
    train_items: list[dict]  # the training entities' questions (probes, English accuracy)
    vocabulary: int

    @property
    def foreign_records(self) -> int:
        return sum(r["lang"] == FOREIGN_LANG for r in self.stage2_rows)


@contextlib.contextmanager
def _timed(times: dict[str, float], key: str):
    tick = time.time()
    yield
    times[key] = time.time() - tick


def _seed_folder(root: Path, seed: int) -> Path:
    """A fresh folder for one seed; an earlier run's folder (it has world.json) is replaced, any
    other non-empty folder is refused."""
    folder = root / f"seed-{seed}"
    if folder.exists():
        if not (folder / WORLD_NAME).is_file() and any(folder.iterdir()):
            raise CCError(
                f"{folder} exists and was not written by the transfer task; choose another --output"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def prepare_seed(cfg: TransferConfig, seed: int, folder: Path) -> SeedData:
    """Draw the seed's world and write it, the untrained model, the training data and the
    held-out items into ``folder``."""
    world = build_world(cfg, seed)
    write_json(
        folder / WORLD_NAME,
        asdict(world)
        | {
            "facts": [[e, r, v] for (e, r), v in world.facts.items()],
            "context_facts": [[e, c, v] for (e, c), v in world.context_facts.items()],
        },
    )
    tokenizer = build_tokenizer(world)
    base = folder / "base"
    build_model(cfg, len(tokenizer), seed).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = SeedData(
        world=world,
        base=base,
        stage1_rows=stage1_records(world),
        stage2_rows=stage2_records(world, cfg.stage2_english, cfg.stage2_context),
        stage1_file=folder / "stage1.jsonl",
        stage2_file=folder / "stage2.jsonl",
        matrix_file=folder / "matrix.jsonl",
        held=eval_items(world, world.heldout_entities),
        train_items=eval_items(world, world.train_entities),
        vocabulary=len(tokenizer),
    )
    write_jsonl(data.stage1_file, data.stage1_rows)
    write_jsonl(data.stage2_file, data.stage2_rows)
    write_jsonl(data.matrix_file, matrix_records(world))
    write_jsonl(folder / "heldout.jsonl", data.held)
    return data


def _train(
    cfg: TransferConfig,
    seed: int,
    stage: int,
    start: Path,
    data: Path,
    output: Path,
    method: str,
    augment: str = "none",
    max_steps: int | None = None,
) -> dict:
    """One ``cctuning train`` run of stage 1 or 2 from the model in ``start``, with that stage's
    budget (``max_steps``: that many optimizer steps instead of the epochs) and ``--augment``
    (and, in stage 2, ``--fusion`` and the ``--train-option`` values); returns its
    train_results.json."""
    epochs, lr = (cfg.stage1_epochs, cfg.stage1_lr) if stage == 1 else (cfg.stage2_epochs, cfg.stage2_lr)
    options = dict(
        model=str(start),
        data=str(data),
        output=str(output),
        method=method,
        augment=augment,
        epochs=epochs,
        lr=lr,
        batch_size=cfg.batch_size,
        seed=seed,
        template="plain",
        max_length=64,
        warmup_ratio=0.05,
        trainer={"save_strategy": "no", "disable_tqdm": True, "logging_strategy": "no"},
    )
    if max_steps is not None:
        options["max_steps"] = max_steps
    if stage == 2:
        options.update(check_train_options(cfg.train_options, cfg.fusion))
    train(TrainConfig(**options))
    return json.loads((output / "train_results.json").read_text(encoding="utf-8"))


def _evaluate_stage1(cfg: TransferConfig, seed: int, data: SeedData, folder: Path, trained: dict) -> dict:
    """The stage-1 model's English accuracy on both splits' facts and its foreign accuracy."""
    model, tok, _ = load_for_inference(str(folder))
    bs = cfg.eval_batch_size
    en_held = correct(score_candidates(model, tok, english_items(data.held), "none", bs))
    en_train = correct(score_candidates(model, tok, english_items(data.train_items), "none", bs))
    foreign = correct(score_candidates(model, tok, data.held, "none", bs))
    logger.info(
        "seed %d: stage-1 English accuracy %.3f (held-out entities), %.3f (training entities)",
        seed,
        sum(en_held) / len(en_held),
        sum(en_train) / len(en_train),
    )
    return {
        "english_accuracy_heldout_entities": accuracy_summary(en_held),
        "english_accuracy_train_entities": accuracy_summary(en_train),
        "foreign_accuracy_heldout": accuracy_summary(foreign),
        "train_loss": trained["train_loss"],
        "steps": trained["global_step"],
        "entity_probe": entity_probes(model, tok, data.world),
    }


def _fit_matrix(cfg: TransferConfig, seed: int, data: SeedData, folder: Path):
    """Load the connected model, fit its Transform Matrix on the matrix records (parallel sentences
    that are no evaluation question; it maps foreign activations to English ones), save and set
    it; returns the model, its tokenizer, the matrix, the fit and the held-out entities' activation
    diagnostics."""
    model, tok, _ = load_for_inference(str(folder))
    records = [r for r in load_records(data.matrix_file, require_english=True) if r.lang == FOREIGN_LANG]
    matrix, fit = fit_transform_matrix(
        model, tok, records, samples=len(records), ridge=cfg.matrix_ridge, seed=seed, heldout_fraction=0.1
    )
    matrix.save(folder)
    model.set_transform(matrix)
    return model, tok, matrix, fit, activation_diagnostics(model, tok, matrix, data.train_items, data.held)


def _cell_summaries(results: dict[str, list[dict]], held: list[dict], num_layers: int) -> dict:
    """Per cell: accuracy overall, on the dictionary's entities and the others, and the layer choices."""
    in_dict = [it["in_dictionary"] for it in held]
    cells = {}
    for name, rows in results.items():
        hits = correct(rows)
        cells[name] = {
            **accuracy_summary(hits),
            "in_dictionary": accuracy_summary([c for c, d in zip(hits, in_dict) if d]),
            "not_in_dictionary": accuracy_summary([c for c, d in zip(hits, in_dict) if not d]),
            "layer_histogram": layer_histogram([r["layer"] for r in rows], num_layers),
        }
    return cells


def _margins(results: dict[str, list[dict]], reps: int, seed: int) -> dict:
    """Each cell's paired bootstrap margin over the baseline cell (the same items)."""
    baseline = correct(results[BASELINE])
    return {
        cell.name: paired_bootstrap_mean(correct(results[cell.name]), baseline, reps, seed)
        for cell in CELLS
        if cell.name != BASELINE
    }


def _write_predictions(path: Path, held: list[dict], results: dict[str, list[dict]]) -> None:
    """One line per held-out item: the item, then each cell's prediction and chosen layer."""
    write_jsonl(
        path,
        [
            {
                **it,
                **{
                    name: {"prediction": r[i]["prediction"], "layer": r[i]["layer"]}
                    for name, r in results.items()
                },
            }
            for i, it in enumerate(held)
        ],
    )


def _world_summary(cfg: TransferConfig, data: SeedData) -> dict:
    world = data.world
    return {
        "entities": len(world.english_names),
        "train_entities": len(world.train_entities),
        "heldout_entities": len(world.heldout_entities),
        "dictionary_entities": len(world.dictionary_entities),
        "dictionary_pairs": len(world.dictionary()),
        "stage1_records": len(data.stage1_rows),
        "stage2_records": len(data.stage2_rows),
        "stage2_foreign_records": data.foreign_records,
        "context_relations": len(world.context_relations),
        "matrix_records": sum(1 for _ in data.matrix_file.open(encoding="utf-8")),
        "heldout_items": len(data.held),
        "vocabulary": data.vocabulary,
        "chance": 1 / cfg.values,
    }


def _stage2(cfg: TransferConfig, seed: int, data: SeedData, folder: Path, times: dict) -> dict[str, dict]:
    """Every stage-2 training the cells need, from the stage-1 folder with the same data and budget
    (epochs; a training with ``same_steps_as`` gets that training's optimizer steps instead)."""
    runs = {}
    for name in trained_methods():
        spec = TRAININGS[name]
        steps = runs[spec.same_steps_as]["global_step"] if spec.same_steps_as else None
        with _timed(times, f"stage2_{name}"):
            logger.info(
                "seed %d: stage 2 (%s: --method %s --augment %s%s), %d records (%d foreign)",
                seed,
                name,
                spec.method,
                spec.augment,
                f", {steps} steps" if steps else "",
                len(data.stage2_rows),
                data.foreign_records,
            )
            runs[name] = _train(
                cfg,
                seed,
                2,
                folder / "stage1",
                data.stage2_file,
                folder / name,
                spec.method,
                spec.augment,
                steps,
            )
    return runs


def _evaluate_cells(cfg: TransferConfig, data: SeedData, folder: Path, connected) -> tuple[dict, dict]:
    """Every cell's scores on the held-out foreign questions, and each stage-2 model's scores on
    the same questions in English (``connected``: the connected model, already loaded)."""
    models = {
        m: connected if m == CONNECTED else load_for_inference(str(folder / m))[:2] for m in trained_methods()
    }
    bs = cfg.eval_batch_size
    results = {
        c.name: score_candidates(*models[c.method], data.held, c.connection, bs, c.withhold_english)
        for c in CELLS
    }
    english = {m: score_candidates(*models[m], english_items(data.held), "none", bs) for m in models}
    return results, english


def _training_summary(name: str, trained: dict) -> dict:
    spec = TRAININGS[name]
    return {
        "method": spec.method,
        "augment": spec.augment,
        "budget": f"max_steps of {spec.same_steps_as}" if spec.same_steps_as else "epochs",
        "train_loss": trained["train_loss"],
        "steps": trained["global_step"],
        "examples": trained.get("examples"),
    }


def _stage2_entity_probes(data: SeedData, folder: Path, connected, matrix) -> dict:
    """The entity probes after stage 2: the connected model (with its Transform Matrix's image of
    the foreign activations) and the SFT model. Empty in the default world."""
    if not data.world.context_relations:
        return {}
    sft = load_for_inference(str(folder / BASELINE))[:2]
    return {
        "cc": entity_probes(*connected, data.world, matrix),
        "sft": entity_probes(*sft, data.world),
    }


def run_seed(cfg: TransferConfig, seed: int, folder: Path) -> dict:
    """One world: stage 1, stage 2 (every trained method from the stage-1 folder), the Transform
    Matrix and the evaluation cells. Writes the data, models and per-item predictions under ``folder``."""
    times: dict[str, float] = {}
    with _timed(times, "stage1"):
        data = prepare_seed(cfg, seed, folder)
        logger.info("seed %d: stage 1, %d English/dictionary records", seed, len(data.stage1_rows))
        s1 = _train(cfg, seed, 1, data.base, data.stage1_file, folder / "stage1", "sft")
    with _timed(times, "stage1_eval"):
        stage1 = _evaluate_stage1(cfg, seed, data, folder / "stage1", s1)
    runs = _stage2(cfg, seed, data, folder, times)
    with _timed(times, "matrix"):
        cc, cc_tok, matrix, fit, diagnostics = _fit_matrix(cfg, seed, data, folder / CONNECTED)
    with _timed(times, "eval"):
        results, english = _evaluate_cells(cfg, data, folder, (cc, cc_tok))
        probes = _stage2_entity_probes(data, folder, (cc, cc_tok), matrix)
    cells = _cell_summaries(results, data.held, cc.arch.num_layers)
    _write_predictions(folder / "predictions.jsonl", data.held, results)
    logger.info(
        "seed %d: held-out foreign accuracy %s",
        seed,
        ", ".join(f"{name} {cell['accuracy']:.3f}" for name, cell in cells.items()),
    )
    return {
        "seed": seed,
        "world": _world_summary(cfg, data),
        "stage1": stage1,
        "stage2": {m: _training_summary(m, r) for m, r in runs.items()},
        "entity_probe": {"stage1": stage1["entity_probe"], **probes},
        "english_accuracy_after_stage2": {m: accuracy_summary(correct(rows)) for m, rows in english.items()},
        "majority_baseline": majority_baseline(data.world, data.held),
        "cells": cells,
        "margins_over_sft": _margins(results, cfg.bootstrap_reps, seed),
        "layer_choice_training": runs[CONNECTED]["layer_choice_counts"],
        "matrix": {"fit": fit.fit, "heldout_pairs": fit.heldout, "heldout_entities": diagnostics},
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }


@contextlib.contextmanager
def _quiet_torch(threads: int):
    """``threads`` torch threads (0: unchanged) and no progress bars (a dozen tiny loads and saves
    per seed: progress is logged instead); both restored afterwards."""
    before, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if bars:
            hf_logging.enable_progress_bar()


def run_transfer_task(cfg: TransferConfig) -> dict:
    """Run every seed and write ``summary.json`` and ``summary.md`` into ``cfg.output``."""
    cfg.check()
    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    with _quiet_torch(cfg.threads):
        runs = [run_seed(cfg, seed, _seed_folder(root, seed)) for seed in cfg.seed_values()]
    summary = summarize(cfg, runs, time.time() - started)
    write_json(root / SUMMARY_NAME, summary)
    write_text(root / SUMMARY_MD_NAME, summary_markdown(summary))
    logger.info(
        "transfer task finished in %.0f s; summary in %s", summary["seconds"]["total"], root / SUMMARY_NAME
    )
    return summary
