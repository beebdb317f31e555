"""The Transform Matrix: non-English FFN activations → English-like ones (method.md §2.4).

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

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cctuning.errors import CCError
from cctuning.io import save_safetensors, write_json

logger = logging.getLogger(__name__)

MATRIX_NAME = "transform_matrix.safetensors"
MATRIX_REPORT_NAME = "transform_matrix.json"


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


def apply_matrix(matrix: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``â_l = b_l M`` (or ``b_l M_l`` per layer); ``acts`` is (batch, L, d)."""
    if matrix.dim() == 2:
        return acts @ matrix
    return torch.einsum("bld,lde->ble", acts, matrix)


@dataclass
class TransformMatrix:
    matrix: torch.Tensor  # (d, d) or (L, d, d), float32
    meta: dict = field(default_factory=dict)

    @property
    def per_layer(self) -> bool:
        return self.matrix.dim() == 3

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        m = self.matrix.to(device=acts.device, dtype=acts.dtype)
        return apply_matrix(m, acts)

    def check_fits(self, num_layers: int, hidden_size: int, where: str = MATRIX_NAME) -> None:
        shape = tuple(self.matrix.shape)
        expected = (num_layers, hidden_size, hidden_size) if self.per_layer else (hidden_size, hidden_size)
        if shape != expected:
            raise CCError(
                f"{where}: transform matrix of shape {shape} does not fit this model "
                f"({num_layers} layers, hidden size {hidden_size}); refit it with `cctuning fit-matrix`"
            )

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        save_safetensors(folder / MATRIX_NAME, {"matrix": self.matrix.float()}, metadata=meta)
        write_json(folder / MATRIX_REPORT_NAME, self.meta)

    @classmethod
    def load(cls, folder: str | Path) -> TransformMatrix | None:
        from safetensors import safe_open

        file = Path(folder) / MATRIX_NAME
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as fh:
            raw = fh.metadata() or {}
            matrix = fh.get_tensor("matrix")
        meta = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        return cls(matrix=matrix, meta=meta)


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

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_batches(
    encoder, texts: list[str], batch_size: int, pad_token_id: int, max_length: int | None = None
):
    """Tokenise prompts and yield left-padded batches ``(ids, mask, positions)`` in input order."""
    from cctuning.data.collator import pad_rows

    for start in range(0, len(texts), batch_size):
        encoded = [encoder.encode_prompt(t, max_length) for t in texts[start : start + batch_size]]
        ids, mask, shift = pad_rows([e.ids for e in encoded], pad_token_id, "left")
        positions = torch.tensor([e.position for e in encoded], dtype=torch.long) + shift
        yield ids, mask, positions


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
    from cctuning.data.collator import pad_rows

    encoded = [encoder.encode_prompt(t, max_length) for t in texts]
    device = model.arch.embeddings.weight.device
    out = torch.empty(len(texts), model.arch.num_layers, model.arch.hidden_size)
    for idx in length_batches([len(e.ids) for e in encoded], batch_size, max_batch_tokens):
        ids, mask, shift = pad_rows([encoded[i].ids for i in idx], pad_token_id, "left")
        positions = torch.tensor([encoded[i].position for i in idx], dtype=torch.long) + shift
        acts = model.collect_activations(ids.to(device), mask.to(device), positions.to(device))
        out[torch.tensor(idx)] = acts.float().cpu()
    return out


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
    max_length: int | None = None,
    max_stored_pairs: int = 500,
    progress: bool = False,
    max_batch_tokens: int | None = 8192,
    window: int = 256,
) -> tuple[TransformMatrix, FitReport]:
    """Fit M on up to ``samples`` records (seeded sample; each record pairs its own instruction and
    instruction_en). ``heldout_fraction`` of the pairs are kept out of the fit to measure the error
    on unseen prompts. The fit-set MSE is exact (from the normal equations); the fit-set cosine is
    measured on its first ``max_stored_pairs`` pairs, the held-out metrics on up to that many.

    Pairs are processed ``window`` at a time; within a window each side's prompts are batched by
    length (at most ``batch_size`` prompts and ``max_batch_tokens`` padded tokens a batch), so that
    time is not spent on padding and memory does not grow with the longest prompt seen. Memory is
    bounded by the window and the batch budget, whatever the number of pairs."""
    import random

    from tqdm.auto import tqdm

    from cctuning.data.encoding import PromptEncoder, PromptFormat

    pairs = [r for r in records if r.instruction_en]
    if len(pairs) < 2:
        raise CCError("fitting a transform matrix needs at least 2 records with instruction_en")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(pairs)), min(samples, len(pairs))))
    n_held = (
        min(max(1, round(len(chosen) * heldout_fraction)), len(chosen) - 1) if heldout_fraction > 0 else 0
    )
    order = chosen[:]
    rng.shuffle(order)
    held = sorted(order[:n_held])
    fit = sorted(order[n_held:])
    encoder = PromptEncoder(tokenizer, PromptFormat.from_dict(model.cc_config.prompt_format))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    acc = NormalEquations(model.arch.hidden_size, model.arch.num_layers, per_layer)
    stored = {"fit": ([], []), "held": ([], [])}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(chosen), desc="activations", unit="pair", disable=not progress)
    with torch.no_grad():
        for part, indices in (("fit", fit), ("held", held)):
            for start in range(0, len(indices), window):
                chunk = indices[start : start + window]
                s, t = (
                    prompt_activations(model, encoder, texts, batch_size, pad, max_length, max_batch_tokens)
                    for texts in (
                        [pairs[i].instruction for i in chunk],
                        [pairs[i].instruction_en for i in chunk],
                    )
                )
                if part == "fit":
                    acc.add(s, t)
                kept = sum(x.shape[0] for x in stored[part][0])
                if kept < max_stored_pairs:
                    stored[part][0].append(s[: max_stored_pairs - kept])
                    stored[part][1].append(t[: max_stored_pairs - kept])
                bar.update(s.shape[0])
    bar.close()
    model.train(was_training)
    solution = acc.solve(ridge)
    matrix = solution.float()
    fit_s, fit_t = torch.cat(stored["fit"][0]), torch.cat(stored["fit"][1])
    fit_metrics = {
        "before": transform_error(None, fit_s, fit_t),
        "after": transform_error(matrix, fit_s, fit_t),
        "mse_all_pairs": acc.mse(solution),
    }
    held_metrics = {}
    if held:
        held_s, held_t = torch.cat(stored["held"][0]), torch.cat(stored["held"][1])
        held_metrics = {
            "before": transform_error(None, held_s, held_t),
            "after": transform_error(matrix, held_s, held_t),
        }
    report = FitReport(
        pairs=len(chosen),
        fit_pairs=len(fit),
        heldout_pairs=len(held),
        ridge=ridge,
        per_layer=per_layer,
        num_layers=model.arch.num_layers,
        hidden_size=model.arch.hidden_size,
        fit=fit_metrics,
        heldout=held_metrics,
        seed=seed,
    )
    meta = report.to_dict()
    stamp = getattr(model, "decision_maker_sha256", None)
    if stamp:  # ties the matrix to this Decision Maker: another model's matrix is refused on load
        from cctuning.model.ccmodel import DECISION_MAKER_STAMP

        meta[DECISION_MAKER_STAMP] = stamp
    return TransformMatrix(matrix=matrix, meta=meta), report


def fit_matrix_from_file(
    model, tokenizer, data: str | Path, folder: str | Path, skip_invalid: bool = False, **options
) -> FitReport:
    """Fit the Transform Matrix on the records of ``data`` (a CC-Tuning JSONL file with English
    counterparts), record that file in its metadata and save it into ``folder`` beside the model.
    ``options`` are :func:`fit_transform_matrix`'s."""
    from cctuning.data.records import load_records

    records = load_records(data, require_english=True, skip_invalid=skip_invalid)
    matrix, report = fit_transform_matrix(model, tokenizer, records, **options)
    matrix.meta["data"] = str(data)
    matrix.save(folder)
    return report
