"""Achieved FLOP/s and MFU of the training steps: SFT and CC-Tuning, float32 and bf16 autocast.

The step is row 1's (:mod:`bench.train`): ``CCModel.forward`` → backward → clip at 1.0 → AdamW →
``zero_grad``, SFT on the same batches without the English prompt. Four variants, each on its own
method's model, timed back to back in every round (order rotated): ``sft fp32``, ``cc fp32``, and
the same under ``torch.autocast(bfloat16)`` with float32 master weights (``--bf16``).

FLOPs per step are counted once per method with ``FlopCounterMode`` (matrix products, plus attention
forward and backward, which PyTorch does not count on the CPU: :func:`bench.flops.count_flops`), on
the very batches that are timed; autocast runs the same products in another dtype. The analytic count
of :func:`analytic_step_flops` is recorded beside it (what the GPU check reports). Achieved FLOP/s =
FLOPs / measured seconds; MFU = achieved / the machine's measured ``torch.mm`` peak of the same dtype
(fp32 for ``fp32``, bf16 for ``autocast``). The CC / SFT ratio per round is set against its floor
``1 + E / (3 T)`` and its target, within 1.15× of the floor.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from bench.common import Contention, Loaded, clean_rounds, pairwise_ratios, rotated, summary
from bench.flops import count_flops, synchronize
from bench.train import Runner, TrainSetup, token_counts, warmed_batches

METHODS = ("sft", "cc")
PRECISIONS = ("fp32", "autocast")
PEAK_DTYPE = {"fp32": "fp32", "autocast": "bf16"}  # the matmul peak a precision is measured against
FLOOR_TARGET = 1.15  # the CC step within this factor of its floor


# -- pure arithmetic ------------------------------------------------------------------------------
def decoder_dims(config) -> dict[str, int]:
    """The sizes the analytic count needs, from a Hugging Face decoder config (Llama-style)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def forward_flops(dims: dict[str, int], rows: int, length: int, lm_head: bool = True) -> int:
    """Matrix-product FLOPs of one forward pass of a gated-MLP decoder over ``rows`` × ``length``
    tokens (padding included): per layer the q, k, v and o projections, the three MLP projections and
    attention (``Q Kᵀ`` and the weighted sum, 4·L²·d per head, the causal mask not discounted), and
    the LM head over every position when ``lm_head``."""
    d, hd, h, kv = dims["hidden"], dims["head_dim"], dims["heads"], dims["kv_heads"]
    tokens = rows * length
    per_token = 2 * d * hd * (h + 2 * kv) + 2 * h * hd * d + 6 * d * dims["intermediate"]
    attention = 4 * rows * h * length * length * hd
    flops = dims["layers"] * (tokens * per_token + attention)
    return flops + (2 * tokens * d * dims["vocab"] if lm_head else 0)


def analytic_step_flops(
    dims: dict[str, int],
    train_shape: tuple[int, int],
    english_shape: tuple[int, int] | None = None,
    english_grad: bool = False,
) -> int:
    """FLOPs of one training step: forward + backward (3 × the forward) over the training batch,
    plus for CC-Tuning the English prompt pass (decoder only, no LM head: 1 × its forward, 3 × with
    ``--english-grad``) and the Decision Maker (``Linear(hidden, layers)`` per row, with its backward).
    AdamW and the element-wise work are not counted (as the FLOP counter does not)."""
    flops = 3 * forward_flops(dims, *train_shape)
    if english_shape is not None:
        flops += (3 if english_grad else 1) * forward_flops(dims, *english_shape, lm_head=False)
        flops += 3 * 2 * english_shape[0] * dims["hidden"] * dims["layers"]
    return flops


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the peak (given in GFLOP/s)."""
    return flops / seconds / (peak_gflops * 1e9)


def batch_flops(dims: dict[str, int], batch: dict, method: str) -> int:
    """:func:`analytic_step_flops` of one collated batch (padded shapes, as computed)."""
    english = tuple(batch["en_input_ids"].shape) if method == "cc" else None
    return analytic_step_flops(dims, tuple(batch["input_ids"].shape), english)


# -- the measurement ------------------------------------------------------------------------------
class PrecisionRunner:
    """:class:`bench.train.Runner` (SFT and CC-Tuning) with the variants ``"{method} {precision}"``."""

    def __init__(self, loaded: Loaded, lr: float, device: str = "cpu"):
        self.runner = Runner(loaded, lr, METHODS)
        for model in self.runner.models.values():
            model.to(device)
        self.device = device

    def step(self, variant: str, batch: dict) -> float:
        import torch  # deferred: bench modules import without torch (the run's argument parsing)

        method, precision = variant.split()
        kind = self.device.split(":")[0]
        with torch.autocast(kind, torch.bfloat16, enabled=precision == "autocast"):
            return self.runner.step(method, batch)


def variant_names(precisions: tuple[str, ...] = PRECISIONS) -> list[str]:
    return [f"{m} {p}" for p in precisions for m in METHODS]


def _count(loaded: Loaded, runner: PrecisionRunner, batches: list[dict]) -> dict[str, dict]:
    """Counted and analytic FLOPs per step of each method (a counted step is a real step)."""
    dims = decoder_dims(loaded.base.config)
    out = {}
    for method in METHODS:
        counted = sum(count_flops(lambda b=b, m=method: runner.step(f"{m} fp32", b)) for b in batches)
        analytic = sum(batch_flops(dims, b, method) for b in batches)
        out[method] = {"counted": counted / len(batches), "analytic": analytic / len(batches)}
    return out


def _figures(rounds: list[dict], flops: dict, peaks: dict, counts: dict, precisions: tuple[str, ...]) -> dict:
    """Seconds, tokens/s, GFLOP/s and MFU per variant; the CC / SFT ratio per precision."""
    out: dict[str, Any] = {k: {} for k in ("seconds_per_step", "tokens_per_s", "gflops", "mfu")}
    for variant in variant_names(precisions):
        method, precision = variant.split()
        seconds = [r[variant] for r in rounds]
        per_step = flops[method]["counted"]
        peak = peaks[PEAK_DTYPE[precision]]["peak"]
        out["seconds_per_step"][variant] = summary(seconds)
        out["tokens_per_s"][variant] = summary([counts["train_tokens_per_step"] / s for s in seconds], 1)
        out["gflops"][variant] = summary([per_step / s / 1e9 for s in seconds], 2)
        out["mfu"][variant] = summary([mfu(per_step, s, peak) for s in seconds])
    floor = counts["floor"]
    out["ratio"], out["ratio_over_floor"], out["holds"] = {}, {}, {}
    for precision in precisions:
        ratios = pairwise_ratios(
            [r[f"cc {precision}"] for r in rounds], [r[f"sft {precision}"] for r in rounds]
        )
        out["ratio"][precision] = summary(ratios)
        out["ratio_over_floor"][precision] = summary([x / floor for x in ratios])
        out["holds"][precision] = out["ratio_over_floor"][precision]["median"] <= FLOOR_TARGET
    return out


def bench_train_flops(
    loaded: Loaded,
    setup: TrainSetup,
    contention: Contention,
    peaks: dict,
    device: str = "cpu",
    precisions: tuple[str, ...] = PRECISIONS,
) -> dict[str, Any]:
    """The variants' step times, FLOP/s and MFU; CC / SFT against the floor per precision (``fp32``,
    ``autocast``)."""
    runner = PrecisionRunner(loaded, setup.lr, device)
    variants = variant_names(precisions)
    batches = warmed_batches(loaded.tokenizer, setup, runner, variants, contention, device)
    flops = _count(loaded, runner, batches)

    def one_round(_index: int, attempt: int) -> dict[str, float]:
        times = {}
        for variant in rotated(variants, attempt):
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                runner.step(variant, batch)
            synchronize(device)
            times[variant] = (time.perf_counter() - start) / len(batches)
        return times

    rounds, info = clean_rounds(setup.repeats, one_round, contention, f"train-flops {loaded.name}")
    counts = token_counts(batches)
    return {
        "flops_per_step": flops,
        "peak_gflops": {p: peaks[PEAK_DTYPE[p]]["peak"] for p in precisions},
        **_figures(rounds, flops, peaks, counts, precisions),
        "floor": counts["floor"],
        "floor_target": FLOOR_TARGET,
        "tokens": counts,
        "contention": info,
        "setup": {"batch_size": setup.batch_size, "max_length": setup.max_length,
                  "steps_per_round": setup.steps, "device": device},
    }  # fmt: skip
