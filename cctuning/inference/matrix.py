"""Fitting the Transform Matrix: non-English FFN activations → English-like ones (docs/method.md §2.4).

Fitted after training on parallel prompts run *without* the connection: for each pair, the L
activations ``f_l[p]`` of the non-English prompt (rows of S) and of the English prompt (rows of T).
The official form pools all layers and languages into one ``d × d`` matrix M minimising
``||S M − T||²`` (row-vector convention ``â = b M``). ``per_layer`` fits one matrix per layer.

The normal equations ``SᵀS`` and ``SᵀT`` are accumulated in float64 batch by batch, so memory
does not grow with the number of pairs, and solved once (with optional ridge ``λ``:
``(SᵀS + λI) M = SᵀT``). Without ridge a singular system (fewer rows than d, as with the official
10 prompts) gets the minimum-norm solution, as ``lstsq`` would.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cctuning.data.augment import inference_records
from cctuning.data.collator import pad_rows, pad_token_id
from cctuning.data.encoding import PromptEncoder, warn_special_records
from cctuning.data.formats import DataOptions
from cctuning.data.records import load_records, system_prompt_of
from cctuning.errors import CCError
from cctuning.io import check_output_folder, folder_lock
from cctuning.model.arch import cap_to_context
from cctuning.model.health import constant_logits
from cctuning.model.transform import DECISION_MAKER_STAMP, TransformMatrix, apply_matrix

logger = logging.getLogger(__name__)

#: a matrix whose transformed activations have at most this mean cosine with the English ones (on the
#: held-out pairs, else the fit pairs) maps nothing: warned about and recorded in its report
WEAK_COSINE = 0.05


class NormalEquations:
    """Streaming accumulator of ``SᵀS``, ``SᵀT`` and ``ΣT²`` (float64), pooled or per layer."""

    def __init__(self, hidden_size: int, num_layers: int, per_layer: bool = False):
        groups = num_layers if per_layer else 1
        self.per_layer = per_layer
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.sts = torch.zeros(groups, hidden_size, hidden_size, dtype=torch.float64)
        self.stt = torch.zeros(groups, hidden_size, hidden_size, dtype=torch.float64)
        self.tt = torch.zeros(groups, dtype=torch.float64)
        self.rows = torch.zeros(groups, dtype=torch.long)

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """``source``/``target``: (batch, L, d) activations of the same prompts in two languages."""
        s = source.detach().to("cpu", torch.float64)
        t = target.detach().to("cpu", torch.float64)
        if self.per_layer:
            s, t = s.transpose(0, 1), t.transpose(0, 1)  # (L, batch, d)
        else:
            s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
        self.sts += s.transpose(1, 2) @ s
        self.stt += s.transpose(1, 2) @ t
        self.tt += (t * t).sum(dim=(1, 2))
        self.rows += s.shape[1]

    def solve(self, ridge: float = 0.0) -> torch.Tensor:
        """M of shape (d, d), or (L, d, d) per layer, in float64."""
        if int(self.rows.min()) == 0:
            raise CCError("no activation pairs were accumulated")
        eye = torch.eye(self.hidden_size, dtype=torch.float64)
        out = []
        for sts, stt in zip(self.sts, self.stt):
            a = sts + ridge * eye
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                out.append(torch.cholesky_solve(stt, chol))
            else:  # singular: the minimum-norm least-squares solution, pinv(SᵀS) SᵀT = pinv(S) T
                out.append(torch.linalg.pinv(a, hermitian=True) @ stt)
        m = torch.stack(out)
        return m if self.per_layer else m[0]

    def mse(self, matrix: torch.Tensor) -> float:
        """Mean squared error of ``S M`` against T over everything accumulated, from the sums alone."""
        m = matrix.to(torch.float64)
        m = m if self.per_layer else m.unsqueeze(0)
        total = 0.0
        for g in range(len(self.sts)):
            mg = m[g]
            sq = (mg.T @ self.sts[g] @ mg).trace() - 2 * (mg.T @ self.stt[g]).trace() + self.tt[g]
            total += float(sq)
        return total / (int(self.rows.sum()) * self.hidden_size)


def transform_error(matrix: torch.Tensor | None, source: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE and mean cosine similarity of ``source @ M`` (or of ``source`` itself when M is None)
    against ``target``; both (N, L, d)."""
    pred = source.to(torch.float64)
    if matrix is not None:
        pred = apply_matrix(matrix.to(torch.float64), pred)
    tgt = target.to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(pred, tgt, dim=-1)
    return {"mse": float(((pred - tgt) ** 2).mean()), "cosine": float(cos.mean())}


@dataclass
class FitReport:
    pairs: int
    fit_pairs: int
    heldout_pairs: int
    ridge: float
    per_layer: bool
    num_layers: int
    hidden_size: int
    fit: dict
    heldout: dict
    seed: int
    data: str | None = None
    max_length: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def weak_matrix_warning(report: FitReport) -> str | None:
    """The warning about a matrix that maps nothing: its mean cosine after the transform (held-out
    pairs, else fit pairs) at most :data:`WEAK_COSINE` (or not a number); None for a working one."""
    part, metrics = ("held-out", report.heldout) if report.heldout else ("fit", report.fit)
    cosine = metrics["after"]["cosine"]
    if cosine > WEAK_COSINE:
        return None
    return (
        f"weak transform matrix: its {part} cosine is {cosine:.4f} (≤ {WEAK_COSINE}), it maps the "
        "activations to nothing like the English ones; check that the model is trained and sound "
        "(finite weights, outputs that vary with the input)"
    )


def length_batches(
    lengths: list[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped by length (shortest first): at most ``batch_size`` prompts and, unless one prompt
    alone is longer, at most ``max_batch_tokens`` padded tokens per batch."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        full = len(current) == batch_size or (
            max_batch_tokens is not None and (len(current) + 1) * lengths[i] > max_batch_tokens
        )
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def prompt_activations(
    model,
    encoder,
    texts: list[str],
    batch_size: int,
    pad_token_id: int,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """``f_l[p]`` of every prompt as (len(texts), L, d) float32 on the CPU, in input order. Prompts are
    batched by length (:func:`length_batches`), so little compute is spent on padding."""
    device = model.arch.embeddings.weight.device
    out = torch.empty(len(texts), model.arch.num_layers, model.arch.hidden_size)
    for idx, ids, mask, positions in prompt_batches(
        encoder, texts, batch_size, pad_token_id, max_length, max_batch_tokens
    ):
        acts = model.collect_activations(ids.to(device), mask.to(device), positions.to(device))
        out[idx] = acts.float().cpu()
    return out


def prompt_batches(
    encoder,
    texts: list[str],
    batch_size: int,
    pad_token_id: int,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(indices into texts, ids, attention mask, p per row)``: the prompts encoded, batched by length
    (:func:`length_batches`) and padded on the left, p shifted by the padding."""
    encoded = [encoder.encode_prompt(t, max_length) for t in texts]
    for idx in length_batches([len(e.ids) for e in encoded], batch_size, max_batch_tokens):
        ids, mask, shift = pad_rows([encoded[i].ids for i in idx], pad_token_id, "left")
        positions = torch.tensor([encoded[i].position for i in idx], dtype=torch.long) + shift
        yield torch.tensor(idx), ids, mask, positions


def split_pairs(count: int, samples: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The seeded sample of up to ``samples`` of ``count`` pairs, split into fit and held-out indices (each
    sorted): ``heldout_fraction`` of the sample is held out, rounded, but at least one pair and never all."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(count), min(samples, count)))
    n_held = (
        min(max(1, round(len(chosen) * heldout_fraction)), len(chosen) - 1) if heldout_fraction > 0 else 0
    )
    order = chosen[:]
    rng.shuffle(order)
    return sorted(order[n_held:]), sorted(order[:n_held])


def pair_activations(
    model, encoder, pairs, indices: list[int], window: int, **batching
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(source, target)``: the activations of the instructions and of the English instructions of
    ``pairs[i]`` for ``indices``, ``window`` pairs at a time; ``batching`` is
    :func:`prompt_activations`'s (batch_size, pad_token_id, max_length, max_batch_tokens)."""
    for start in range(0, len(indices), window):
        chunk = indices[start : start + window]
        yield (
            prompt_activations(model, encoder, [pairs[i].instruction for i in chunk], **batching),
            prompt_activations(model, encoder, [pairs[i].instruction_en for i in chunk], **batching),
        )


class StoredPairs:
    """The first ``limit`` activation pairs of a part (fit or held-out), kept to measure the error."""

    def __init__(self, limit: int):
        self.limit = limit
        self.source: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        kept = sum(x.shape[0] for x in self.source)
        if kept < self.limit:
            self.source.append(source[: self.limit - kept])
            self.target.append(target[: self.limit - kept])

    def before_after(self, matrix: torch.Tensor) -> dict:
        """:func:`transform_error` of the stored pairs without and with the matrix."""
        source, target = torch.cat(self.source), torch.cat(self.target)
        return {
            "before": transform_error(None, source, target),
            "after": transform_error(matrix, source, target),
        }


def accumulate_pairs(
    model,
    encoder,
    pairs,
    fit: list[int],
    held: list[int],
    acc: NormalEquations,
    max_stored_pairs: int,
    window: int,
    progress: bool,
    **batching,
) -> dict[str, StoredPairs]:
    """Run the fit and held-out pairs through the model (eval mode, no gradient): the fit pairs go into
    ``acc``; the first ``max_stored_pairs`` of each part are returned, by part ("fit", "held")."""
    stored = {"fit": StoredPairs(max_stored_pairs), "held": StoredPairs(max_stored_pairs)}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(fit) + len(held), desc="activations", unit="pair", disable=not progress)
    with torch.no_grad():
        for part, indices in (("fit", fit), ("held", held)):
            for s, t in pair_activations(model, encoder, pairs, indices, window, **batching):
                if part == "fit":
                    acc.add(s, t)
                stored[part].add(s, t)
                bar.update(s.shape[0])
    bar.close()
    model.train(was_training)
    return stored


def check_fit_options(
    samples: int, ridge: float, heldout_fraction: float, batch_size: int, max_length: int | None = None
) -> None:
    """Values that would fit nothing, or a wrong matrix that looks like a result: refused."""
    if not ridge >= 0:
        raise CCError(f"--ridge must be ≥ 0, got {ridge} (a negative ridge fits a wrong matrix)")
    if not 0 <= heldout_fraction < 1:
        raise CCError(f"--heldout must be in [0, 1), got {heldout_fraction}")
    if samples < 2:
        raise CCError(f"--samples must be ≥ 2, got {samples}")
    if batch_size <= 0:
        raise CCError(f"--batch-size must be > 0, got {batch_size}")
    if max_length is not None and max_length <= 0:
        raise CCError(f"--max-length must be > 0, got {max_length}")


def fit_transform_matrix(
    model,
    tokenizer,
    records,
    samples: int = 1000,
    ridge: float = 0.0,
    per_layer: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    max_length: int | None = 1024,
    max_stored_pairs: int = 500,
    progress: bool = False,
    max_batch_tokens: int | None = 8192,
    window: int = 256,
    allow_special_tokens: bool = False,
) -> tuple[TransformMatrix, FitReport]:
    """Fit M on up to ``samples`` records (seeded sample; each record pairs its own instruction and
    instruction_en). ``heldout_fraction`` of the pairs are kept out of the fit to measure the error
    on unseen prompts. The fit-set MSE is exact (from the normal equations); the fit-set cosine is
    measured on its first ``max_stored_pairs`` pairs, the held-out metrics on up to that many.

    Pairs are processed ``window`` at a time; within a window each side's prompts are batched by
    length (at most ``batch_size`` prompts and ``max_batch_tokens`` padded tokens a batch), so that
    time is not spent on padding and memory does not grow with the longest prompt seen. Memory is
    bounded by the window and the batch budget, whatever the number of pairs.

    ``max_length`` is each prompt's token budget (as ``eval --nll``'s), lowered to the model's context:
    a longer instruction loses tokens from its start, and a huge one is cut at the character level
    before it is tokenised (:func:`~cctuning.data.encoding.precut`), so no record is tokenised whole.
    None: the model's context alone. Special-token strings in the prompts are plain text unless
    ``allow_special_tokens`` (:class:`~cctuning.data.encoding.PromptEncoder`)."""
    check_fit_options(samples, ridge, heldout_fraction, batch_size, max_length)
    max_length = cap_to_context(max_length, model)
    pairs = [r for r in records if r.instruction_en]
    if len(pairs) < 2:
        raise CCError("fitting a transform matrix needs at least 2 records with instruction_en")
    # the source is the prompt the model sees at inference: bilingual for --augment bilingual-prompt
    pairs, _ = inference_records(pairs, model.cc_config.augment, "fit-matrix")
    fit, held = split_pairs(len(pairs), samples, heldout_fraction, seed)
    acc = NormalEquations(model.arch.hidden_size, model.arch.num_layers, per_layer)
    stored = accumulate_pairs(
        model,
        PromptEncoder(tokenizer, model.cc_config.prompt_format, allow_special_tokens=allow_special_tokens),
        pairs,
        fit,
        held,
        acc,
        max_stored_pairs,
        window,
        progress,
        batch_size=batch_size,
        pad_token_id=pad_token_id(tokenizer),
        max_length=max_length,
        max_batch_tokens=max_batch_tokens,
    )
    return solve_matrix(model, acc, stored, len(fit), len(held), ridge, seed, max_length)


def warn_underdetermined(acc: NormalEquations, fit_pairs: int) -> None:
    """Warn when a least-squares fit has fewer activation rows than unknowns per column (the hidden
    size): the matrix then reproduces the fit pairs exactly, so its fit error (~0) says nothing, and
    it is one of many that do. Pooled, each pair gives one row per layer; per layer, one row."""
    rows, d = int(acc.rows.min()), acc.hidden_size
    if rows >= d:
        return
    per_pair = 1 if acc.per_layer else acc.num_layers
    logger.warning(
        "the Transform Matrix is underdetermined: %d fit pairs give %d activation rows%s, fewer than the "
        "hidden size %d, so it fits them exactly (a fit MSE of ~0 says nothing about other prompts); "
        "use --ridge (e.g. 0.1) or more --samples (at least %d fit pairs)",
        fit_pairs,
        rows,
        " per layer" if acc.per_layer else f" ({per_pair} layers each)",
        d,
        -(-d // per_pair),
    )


def solve_matrix(
    model,
    acc: NormalEquations,
    stored: dict,
    fit_pairs: int,
    heldout_pairs: int,
    ridge: float,
    seed: int,
    max_length: int | None = None,
) -> tuple[TransformMatrix, FitReport]:
    """Solve the accumulated normal equations with ``ridge``; the matrix (stamped with the model's
    Decision Maker) and its report, with the metrics measured on the ``stored`` pairs (a weak matrix,
    :func:`weak_matrix_warning`, is logged and its warning kept in the report)."""
    if not ridge:
        warn_underdetermined(acc, fit_pairs)
    solution = acc.solve(ridge)
    matrix = solution.float()
    report = FitReport(
        pairs=fit_pairs + heldout_pairs,
        fit_pairs=fit_pairs,
        heldout_pairs=heldout_pairs,
        ridge=ridge,
        per_layer=acc.per_layer,
        num_layers=model.arch.num_layers,
        hidden_size=model.arch.hidden_size,
        fit={**stored["fit"].before_after(matrix), "mse_all_pairs": acc.mse(solution)},
        heldout=stored["held"].before_after(matrix) if heldout_pairs else {},
        seed=seed,
        max_length=max_length,
    )
    warning = weak_matrix_warning(report)
    if warning:
        logger.warning("%s", warning)
        report.warnings.append(warning)
    meta = report.to_dict()
    stamp = getattr(model, "decision_maker_sha256", None)
    if stamp:  # ties the matrix to this Decision Maker: another model's matrix is refused on load
        meta[DECISION_MAKER_STAMP] = stamp
    return TransformMatrix(matrix=matrix, meta=meta), report


DEAD_MODEL_WARNING = (
    "the model gives every token the same logit on a probe prompt (a dead model: its training diverged; "
    "retrain with a lower --lr): its activations, and so this matrix, carry nothing"
)


def warn_dead_model(model, tokenizer, report: FitReport, matrix: TransformMatrix) -> None:
    """Log, and keep in the report and the matrix's metadata, that ``model`` is dead
    (:func:`~cctuning.model.health.constant_logits`): one forward of a short probe prompt."""
    if constant_logits(model, tokenizer):
        logger.warning("%s", DEAD_MODEL_WARNING)
        report.warnings.append(DEAD_MODEL_WARNING)
        matrix.meta["warnings"] = list(report.warnings)


def fit_matrix_from_file(
    model,
    tokenizer,
    data: str | Path,
    folder: str | Path,
    skip_invalid: bool = False,
    data_options: DataOptions | None = None,
    lock: bool = True,
    **options,
) -> FitReport:
    """Fit the Transform Matrix on the records of ``data`` (CC-Tuning records with English
    counterparts, in any format :func:`~cctuning.data.records.load_records` reads as
    ``data_options`` say), record that data in its metadata and save it into ``folder`` beside the
    model. ``options`` are :func:`fit_transform_matrix`'s. The folder is locked while fitting (``lock``
    False: the caller holds its lock already); a matrix already there (a stale one, after retraining)
    is replaced."""
    check_fit_options(
        options.get("samples", 1000),
        options.get("ridge", 0.0),
        options.get("heldout_fraction", 0.1),
        options.get("batch_size", 16),
        options.get("max_length", 1024),
    )
    held = (
        contextlib.nullcontext()
        if not lock
        else folder_lock(check_output_folder(folder, "model folder"), "cctuning fit-matrix")
    )
    with held:
        records = load_records(data, require_english=True, skip_invalid=skip_invalid, options=data_options)
        system_prompt_of(records, model.cc_config.prompt_format.system_prompt, model=True)
        allow = options.get("allow_special_tokens", False)
        encoder = PromptEncoder(tokenizer, model.cc_config.prompt_format, allow_special_tokens=allow)
        warn_special_records(encoder, records, data, fields=("instruction", "instruction_en"))
        matrix, report = fit_transform_matrix(model, tokenizer, records, **options)
        warn_dead_model(model, tokenizer, report, matrix)
        matrix.meta["data"] = str(data)
        if data_options is not None and data_options.describe():
            matrix.meta["data_options"] = data_options.describe()
        matrix.save(folder)
    return report
