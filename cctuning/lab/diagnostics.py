"""Diagnostics of the connection a researcher looks at; ``cctuning report`` plots them.

Three measurements, each returning plain JSON-serialisable data (the plots in
:mod:`cctuning.lab.plots` draw exactly these numbers):

* :func:`connection_norms`: per layer l, the L2 norm of what the connection would add after
  decoder layer k if the Decision Maker chose l (``f_l[p]`` of the English prompt for
  ``english``; the model's own ``f_l[p]`` mapped by the Transform Matrix for ``transform``) against
  the norm of the residual stream ``h_k[p]`` it is added to (the non-English prompt's hidden state
  after layer k, without injection). Mean and spread over prompts. A vector far larger than the
  residual swamps the hidden state; one far smaller barely moves it. With a fusion other than
  ``add`` the vector the fusion really adds (``fusion(h, c) − h``: rescaled for ``scaled``, gated
  for ``gated``) is measured too.
* :func:`training_choices`: the Decision Maker's choice over training: ``layer_top`` (most chosen
  layer) and ``layer_entropy`` (bits, of the choices since the previous log) per logged step, from
  the newest ``trainer_state.json`` of a training run, and the whole-run distribution from
  ``layer_choice.json``. Entropy ``log2(L)`` means all L layers are chosen equally often; 0 means
  one layer only.
* :func:`connection_gain`: per language, ``NLL(with connection) − NLL(none)`` on the same items
  (:func:`cctuning.eval.nll.paired_difference`, paired bootstrap 95% interval). **Negative means
  the connection helps** (the responses are more likely with it).

Norms are L2 over the hidden dimension, in float32. "Spread" is the sample standard deviation
(``n − 1``) and the 10th/50th/90th percentiles (linear interpolation, numpy's default) over prompts.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
from pathlib import Path

import torch

from cctuning.data.augment import inference_records, prompt_report
from cctuning.data.collator import pad_rows, pad_token_id
from cctuning.data.encoding import PromptEncoder
from cctuning.data.records import Record, load_prompts
from cctuning.errors import CCError
from cctuning.eval.nll import load_items, paired_difference
from cctuning.model.ccmodel import CONFIG_NAME
from cctuning.model.connection import map_activations, resolve_connection
from cctuning.training.run import TRAIN_RESULTS_NAME
from cctuning.training.trainer import LAYER_CHOICE_NAME

logger = logging.getLogger(__name__)

NORMS_NAME = "norms.json"
TRAINING_CHOICES_NAME = "training_choices.json"
CONNECTION_GAIN_NAME = "connection_gain.json"
TRAINER_STATE_NAME = "trainer_state.json"
GAIN_SIGN = (
    "diff = NLL(with connection) − NLL(connection none) per token, same items; negative: the connection helps"
)
# per-window layer distributions, if the trainer logs one (a list per log entry)
WINDOW_KEYS = ("layer_counts", "layer_share")


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, 10th/50th/90th percentiles, min and max of ``values``."""
    if not values:
        raise ValueError("no values")
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "mean": float(t.mean()),
        "std": float(t.std()) if len(values) > 1 else 0.0,
        "p10": q[0],
        "median": q[1],
        "p90": q[2],
        "min": float(t.min()),
        "max": float(t.max()),
    }


# -- 1. injected vector vs residual ---------------------------------------------------------------
def _records(records, need_english: bool) -> list[Record]:
    if isinstance(records, (str, Path)):
        return load_prompts(records, require_english=need_english)
    out = []
    for r in records:
        if isinstance(r, dict):
            r = Record(r["instruction"], r.get("output"), r.get("instruction_en"), r.get("lang"), "", 0)
        out.append(r)
    if not out:
        raise CCError("no records to measure")
    return out


def _prompt_pass(model, encoder, texts, pad, max_length, residual: bool):
    """``f_l[p]`` (n, L, d) and, with ``residual``, ``h_k[p]`` (n, d), both float32 on the CPU, for one
    batch of prompts (left-padded; positions ignore the padding)."""
    encoded = [encoder.encode_prompt(t, max_length) for t in texts]
    ids, mask, shift = pad_rows([e.ids for e in encoded], pad, "left")
    positions = torch.tensor([e.position for e in encoded], dtype=torch.long) + shift
    device = model.arch.embeddings.weight.device
    captured = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured["h"] = torch.stack([hidden[row, int(pos)] for row, pos in enumerate(positions)])

    handle = model.arch.layers[model.cc_config.inject_layer].register_forward_hook(hook) if residual else None
    try:
        acts = model.collect_activations(ids.to(device), mask.to(device), positions.to(device))
    finally:
        if handle is not None:
            handle.remove()
    h = captured["h"].float().cpu() if residual else None
    return acts, h


def connection_norms(
    model,
    tokenizer,
    records,
    connection: str | list[str] | None = None,
    samples: int = 200,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int | None = None,
) -> dict:
    """Per layer: norm of the vector the connection would inject if that layer were chosen, against
    the norm of ``h_k[p]`` it is added to; statistics over up to ``samples`` prompts (a seeded
    sample of ``records``: a data file or a list of records).

    ``connection``: ``english``, ``transform``, a list of them, or ``None`` for every one the model
    and the records allow (``transform`` when the model has a matrix, ``english`` when every sampled
    record has ``instruction_en``). Returns::

        {"inject_layer": k, "num_layers": L, "hidden_size": d, "fusion": ..., "samples": n,
         "languages": {lang: n}, "residual": spread,
         "connections": {name: {"vector": [spread per layer], "ratio": [spread per layer],
                                 "added": [spread per layer]  # only when fusion != add
                                 }}}

    ``ratio`` is ``‖vector‖ / ‖h_k[p]‖`` per prompt. For ``transform`` the vector is
    ``f_l[p] M`` (the Transform Matrix applied, as at inference).
    """
    recs, names = _norms_inputs(model, records, connection, samples, seed)
    # the prompt the model is given at inference: for a --augment bilingual-prompt model, the English
    # instruction and then the non-English one, where the record has its English
    prompted, fallbacks = inference_records(recs, model.cc_config.augment, "connection norms")
    fusion = copy.deepcopy(model.fusion).float().cpu()  # the model's own stays where it is
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            residual, per = _measure_norms(model, tokenizer, prompted, names, fusion, batch_size, max_length)
    finally:
        model.train(was_training)
    out = {
        "inject_layer": model.cc_config.inject_layer,
        "num_layers": model.arch.num_layers,
        "hidden_size": model.arch.hidden_size,
        "fusion": fusion.kind,
        "samples": len(recs),
        "languages": _count(r.lang or "?" for r in recs),
        "residual": spread(residual),
        "connections": {},
        **prompt_report(model.cc_config.augment, False, fallbacks),
    }
    for c in names:
        vec = per[c]["vector"]
        entry = {
            "vector": [spread(v) for v in vec],
            "ratio": [spread([a / max(b, 1e-12) for a, b in zip(v, residual)]) for v in vec],
        }
        if fusion.kind != "add":
            entry["added"] = [spread(v) for v in per[c]["added"]]
        out["connections"][c] = entry
    return out


def _norms_inputs(model, records, connection, samples: int, seed: int) -> tuple[list[Record], list[str]]:
    """The records :func:`connection_norms` measures (a seeded sample of at most ``samples``) and the
    connections it measures, resolved; a one-line error for a model or a request it cannot measure."""
    if not model.uses_connection:
        raise CCError(
            f"connection norms need a CC-Tuning model; this one is method '{model.cc_config.method}'"
        )
    wanted = [connection] if isinstance(connection, str) else list(connection or [])
    if "none" in wanted:
        raise CCError("connection 'none' injects nothing: measure 'english' or 'transform'")
    recs = _records(records, need_english="english" in wanted)
    if len(recs) > samples:
        chosen = sorted(random.Random(seed).sample(range(len(recs)), samples))
        recs = [recs[i] for i in chosen]
    has_english = all(r.instruction_en for r in recs)
    if not wanted:
        wanted = [c for c in ("english", "transform") if c != "transform" or model.transform is not None]
        wanted = [c for c in wanted if c != "english" or has_english]
        if not wanted:
            raise CCError(
                "nothing to measure: the model has no transform matrix and the records lack instruction_en"
            )
    return recs, [resolve_connection(model, c, english=has_english) for c in wanted]


def _measure_norms(model, tokenizer, recs, names, fusion, batch_size: int, max_length) -> tuple[list, dict]:
    """Batch by batch: the norm of ``h_k[p]`` per prompt, and per connection and layer the norm of
    the vector it would add (and, with a fusion other than ``add``, of what the fusion adds)."""
    encoder = PromptEncoder(tokenizer, model.cc_config.prompt_format)
    pad = pad_token_id(tokenizer)
    num_layers = model.arch.num_layers
    residual: list[float] = []
    per = {
        c: {"vector": [[] for _ in range(num_layers)], "added": [[] for _ in range(num_layers)]}
        for c in names
    }
    for start in range(0, len(recs), batch_size):
        batch = recs[start : start + batch_size]
        own, h = _prompt_pass(model, encoder, [r.instruction for r in batch], pad, max_length, True)
        english = None
        if "english" in names:
            english, _ = _prompt_pass(
                model, encoder, [r.instruction_en for r in batch], pad, max_length, False
            )
        residual += h.norm(dim=-1).tolist()
        for c in names:
            vectors = map_activations(model, c, english if c == "english" else own).float().cpu()
            for layer in range(num_layers):
                v = vectors[:, layer]
                per[c]["vector"][layer] += v.norm(dim=-1).tolist()
                if fusion.kind != "add":
                    weights = torch.zeros(len(batch), num_layers)
                    weights[:, layer] = 1.0
                    added = fusion(h, v, weights) - h
                    per[c]["added"][layer] += added.norm(dim=-1).tolist()
    return residual, per


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


# -- 2. the Decision Maker's choice over training -------------------------------------------------
def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _step(folder: Path) -> int:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def is_training_run(path: str | Path) -> bool:
    """A training run folder (or one of its checkpoints): it holds ``trainer_state.json`` or
    ``layer_choice.json`` itself or in a ``checkpoint-*`` folder."""
    path = Path(path)
    if not path.is_dir():
        return False
    folders = [path, *path.glob("checkpoint-*")]
    return any((f / TRAINER_STATE_NAME).is_file() or (f / LAYER_CHOICE_NAME).is_file() for f in folders)


def newest_trainer_state(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The readable ``trainer_state.json`` with the highest ``global_step`` among the run folder's own
    and its ``checkpoint-*`` folders' (the run folder's on a tie); None when there is none."""
    run_dir = Path(run_dir)
    best = None
    for folder in [run_dir, *sorted(run_dir.glob("checkpoint-*"), key=_step)]:
        state = _read_json(folder / TRAINER_STATE_NAME)
        if not isinstance(state, dict):
            continue
        step = state.get("global_step", _step(folder))
        if best is None or step > best[0]:
            best = (step, folder / TRAINER_STATE_NAME, state)
    return None if best is None else (best[1], best[2])


def _whole_run_counts(run_dir: Path) -> tuple[list[int] | None, str | None]:
    """Whole-run layer counts: the run's ``layer_choice.json``, else ``train_results.json``, else the
    newest checkpoint's ``layer_choice.json``."""
    data = _read_json(run_dir / LAYER_CHOICE_NAME)
    if isinstance(data, dict) and data.get("counts"):
        return [int(c) for c in data["counts"]], str(run_dir / LAYER_CHOICE_NAME)
    data = _read_json(run_dir / TRAIN_RESULTS_NAME)
    if isinstance(data, dict) and data.get("layer_choice_counts"):
        return [int(c) for c in data["layer_choice_counts"]], str(run_dir / TRAIN_RESULTS_NAME)
    for folder in sorted(run_dir.glob("checkpoint-*"), key=_step, reverse=True):
        data = _read_json(folder / LAYER_CHOICE_NAME)
        if isinstance(data, dict) and data.get("counts"):
            return [int(c) for c in data["counts"]], str(folder / LAYER_CHOICE_NAME)
    return None, None


def training_choices(run_dir: str | Path) -> dict:
    """The Decision Maker's choices over a training run (see the module docstring)::

    {"run", "trainer_state", "num_layers", "max_entropy_bits",
     "steps", "layer_top", "layer_entropy",   # one entry per log that has them
     "windows": [{"step", "share": [per layer]}],   # only if the trainer logs a distribution
     "counts", "share", "counts_source"}      # whole run (None when not found)
    """
    run_dir = Path(run_dir)
    found = newest_trainer_state(run_dir)
    steps, tops, entropies, windows = [], [], [], []
    if found is not None:
        for entry in found[1].get("log_history", []):
            if "layer_entropy" in entry and "layer_top" in entry:
                steps.append(int(entry.get("step", len(steps))))
                tops.append(int(entry["layer_top"]))
                entropies.append(float(entry["layer_entropy"]))
            window = next((entry[k] for k in WINDOW_KEYS if isinstance(entry.get(k), list)), None)
            if window:
                total = sum(window)
                windows.append(
                    {
                        "step": int(entry.get("step", 0)),
                        "share": [w / total if total else 0.0 for w in window],
                    }
                )
    counts, source = _whole_run_counts(run_dir)
    if found is None and counts is None:
        raise CCError(
            f"{run_dir}: no {TRAINER_STATE_NAME} (itself or in checkpoint-*) and no layer_choice.json"
        )
    config = _read_json(run_dir / CONFIG_NAME)
    if not isinstance(config, dict) and found is not None:
        config = _read_json(found[0].parent / CONFIG_NAME)
    num_layers = (config or {}).get("num_layers") or (len(counts) if counts else None)
    if num_layers is None and (tops or windows):
        num_layers = max([t + 1 for t in tops] + [len(w["share"]) for w in windows])
    total = sum(counts) if counts else 0
    return {
        "run": str(run_dir),
        "trainer_state": None if found is None else str(found[0]),
        "num_layers": num_layers,
        "max_entropy_bits": math.log2(num_layers) if num_layers else None,
        "steps": steps,
        "layer_top": tops,
        "layer_entropy": entropies,
        "windows": windows,
        "counts": counts,
        "share": [c / total for c in counts] if total else None,
        "counts_source": source,
    }


# -- 3. the connection's gain per language -------------------------------------------------------
def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def gain_pairs(runs: list[tuple[str, dict]]) -> list[tuple[tuple[str, dict], tuple[str, dict]]]:
    """Among loaded NLL runs ``(label, run)``: each run with a connection paired with the run with
    connection ``none`` of the same model (the recorded ``model`` path) on the same data file."""
    nll = [(label, run) for label, run in runs if run.get("kind") == "nll"]
    pairs = []
    for label, run in nll:
        if run["connection"] == "none":
            continue
        for other_label, other in nll:
            if (
                other["connection"] == "none"
                and _same_model(run.get("model"), other.get("model"))
                and _same_model(run.get("data"), other.get("data"))
            ):
                pairs.append(((label, run), (other_label, other)))
                break
    return pairs


def connection_gain(
    with_connection: str | Path | list[dict],
    without: str | Path | list[dict],
    reps: int = 1000,
    seed: int = 0,
) -> dict:
    """Per language and ``all``: ``NLL(with) − NLL(without)`` on the same items with its paired
    bootstrap 95% interval (:func:`paired_difference`). Runs are NLL run folders or their items.
    Negative: the connection helps."""
    a = with_connection if isinstance(with_connection, list) else load_items(with_connection)
    b = without if isinstance(without, list) else load_items(without)
    return paired_difference(a, b, reps=reps, seed=seed)
