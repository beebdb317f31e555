"""Training: time and peak memory of a CC-Tuning optimizer step next to a vanilla SFT step.

Both run on the library's own pipeline, exactly what ``cctuning train`` feeds the Trainer:
``PromptEncoder.encode_example`` → ``CCCollator`` (right padding) → ``CCModel.forward`` (method
``sft`` without English inputs, method ``cc`` with them) → ``loss.backward()`` → gradient
clipping at 1.0 → ``torch.optim.AdamW.step()`` → ``zero_grad(set_to_none=True)``. The Trainer's
own bookkeeping is identical for both methods and left out.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Contention,
    Loaded,
    clean_rounds,
    load_base,
    mix_records,
    pairwise_ratios,
    peak_rss_mb,
    reset_peak_rss,
    rotated,
    rss_mb,
    set_threads,
    summary,
    wrap,
)

VARIANTS = ("sft", "cc", "cc_english_grad")


@dataclass
class TrainSetup:
    batch_size: int
    max_length: int
    steps: int  # optimizer steps (distinct batches) per variant and repeat
    repeats: int
    warmup: int = 1
    lr: float = 1e-5
    seed: int = 0


def encode_batches(tokenizer, n_batches: int, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """CC-Tuning training batches (with the English prompt) from the bundled mix."""
    from cctuning.data import CCCollator, PromptEncoder, PromptFormat

    encoder = PromptEncoder(tokenizer, PromptFormat(), max_length)
    records = mix_records(n_batches * batch_size, seed=seed)
    feats = [
        encoder.encode_example(r["instruction"], r["output"], r["instruction_en"]).features() for r in records
    ]
    collator = CCCollator(tokenizer.pad_token_id)
    return [collator(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]


def warmed_batches(tokenizer, setup, runner, variants, contention, device: str = "cpu") -> list[dict]:
    """The training benchmarks' batches (``setup``: steps, batch_size, max_length, seed, warmup) on
    ``device``, once the machine has settled and ``runner`` has taken ``setup.warmup`` steps of each
    variant (first-touch allocations, AdamW state, kernels)."""
    batches = encode_batches(tokenizer, setup.steps, setup.batch_size, setup.max_length, setup.seed)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    contention.settle()
    for variant in variants:
        for batch in batches[: setup.warmup]:
            runner.step(variant, batch)
    return batches


def sft_batch(batch: dict) -> dict:
    """The same batch as the SFT baseline sees it (``--method sft`` encodes no English prompt)."""
    return {k: v for k, v in batch.items() if not k.startswith("en_")}


def token_counts(batches: list[dict]) -> dict[str, Any]:
    """Tokens computed per step (padded shapes) and real tokens, and the floors they imply.

    A training token costs about 3 forward-token units (forward + backward ≈ 1 + 2); an English
    prompt token costs 1 without gradient and about 3 with ``--english-grad``.
    """
    train = sum(b["input_ids"].numel() for b in batches)
    english = sum(b["en_input_ids"].numel() for b in batches)
    train_real = sum(int(b["attention_mask"].sum()) for b in batches)
    english_real = sum(int(b["en_attention_mask"].sum()) for b in batches)
    return {
        "train_tokens_per_step": round(train / len(batches), 1),
        "english_tokens_per_step": round(english / len(batches), 1),
        "train_tokens_per_step_unpadded": round(train_real / len(batches), 1),
        "english_tokens_per_step_unpadded": round(english_real / len(batches), 1),
        "floor": round(1 + english / (3 * train), 4),
        "floor_english_grad": round(1 + english / train, 4),
    }


def optimizer_step(model, optimizer, batch: dict) -> float:
    """One optimizer step of the training loop; returns the loss."""
    import torch

    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


class Runner:
    """The three variants on copies of one base model: SFT, CC-Tuning, CC-Tuning with --english-grad."""

    def __init__(
        self, loaded: Loaded, lr: float, variants: tuple[str, ...] = VARIANTS, copy_base: bool = True
    ):
        import torch

        self.models: dict[str, Any] = {}
        self.optimizers: dict[str, Any] = {}
        methods = sorted({"sft" if v == "sft" else "cc" for v in variants})
        if not copy_base and len(methods) > 1:
            raise ValueError("several methods need their own copy of the base model")
        for method in methods:
            model = wrap(loaded, method, copy_base=copy_base).train()
            self.models[method] = model
            self.optimizers[method] = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(self, variant: str, batch: dict) -> float:
        method = "sft" if variant == "sft" else "cc"
        model = self.models[method]
        if method == "cc":
            model.cc_config.english_grad = variant == "cc_english_grad"
        return optimizer_step(model, self.optimizers[method], sft_batch(batch) if method == "sft" else batch)


def bench_train_time(loaded: Loaded, setup: TrainSetup, contention: Contention) -> dict[str, Any]:
    """Seconds per optimizer step of each variant, interleaved per repeat; ratios over SFT per repeat."""
    runner = Runner(loaded, setup.lr)
    batches = warmed_batches(loaded.tokenizer, setup, runner, VARIANTS, contention)

    def one_round(_index: int, attempt: int) -> dict[str, float]:
        times = {}
        for variant in rotated(VARIANTS, attempt):
            gc.collect()
            start = time.perf_counter()
            for batch in batches:
                runner.step(variant, batch)
            times[variant] = (time.perf_counter() - start) / len(batches)
        return times

    rounds, info = clean_rounds(setup.repeats, one_round, contention, f"train {loaded.name}")
    seconds = {v: [r[v] for r in rounds] for v in VARIANTS}
    counts = token_counts(batches)
    return {
        "ratio": summary(pairwise_ratios(seconds["cc"], seconds["sft"])),
        "ratio_english_grad": summary(pairwise_ratios(seconds["cc_english_grad"], seconds["sft"])),
        "floor": counts["floor"],
        "floor_english_grad": counts["floor_english_grad"],
        "seconds_per_step": {v: summary(s) for v, s in seconds.items()},
        "tokens": counts,
        "contention": info,
        "setup": {
            "batch_size": setup.batch_size,
            "max_length": setup.max_length,
            "steps_per_repeat": setup.steps,
            "warmup_steps": setup.warmup,
            "optimizer": "torch AdamW",
        },
    }


def memory_worker(args: dict) -> dict:
    """In a fresh process: build one variant, take a warm-up step (allocates the AdamW state), then
    measure the RSS high-water mark over a second step on the same batch."""
    set_threads(args["threads"])
    loaded = load_base(args["model"], args.get("seed", 0))
    variant = args["variant"]
    batches = encode_batches(loaded.tokenizer, 1, args["batch_size"], args["max_length"], args.get("seed", 0))
    runner = Runner(loaded, 1e-5, (variant,), copy_base=False)
    del loaded
    runner.step(variant, batches[0])
    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    runner.step(variant, batches[0])
    peak = peak_rss_mb()
    return {"peak_mb": round(peak, 1), "step_mb": round(peak - before, 1), "before_mb": round(before, 1)}
