"""bf16 against fp32: CC-Tuning training step time, and what bf16 weights do to the held-out NLL.

Train step: the CC-Tuning optimizer step of :mod:`bench.train` (``CCModel.forward`` with the English
prompt → backward → clip at 1.0 → AdamW step) in three precisions, on copies of the same base model
and the same batches:

* ``fp32``: float32 weights (the default);
* ``bf16``: the weights in bfloat16 (``--dtype bfloat16``);
* ``autocast``: float32 weights, the forward under ``torch.autocast(bfloat16)`` (``--bf16``); the
  ``fp32`` model is reused (its weights moved by the fp32 steps, which changes no shape or cost).

Held-out NLL: ``evaluate_nll`` (transform connection) of the bundled held-out mix with the float32 model,
with the same float32 weights under bf16 autocast (``--bf16``) and with the same weights in bfloat16 (no
training in between), and the paired differences autocast − fp32 and bf16 − fp32 with their bootstrap
intervals. With the train step's autocast / fp32 time ratio, the first is what a bf16-autocast default
for training trades: time saved against what bf16 arithmetic does to the same model's likelihoods. The generation and evaluation ratios bf16 / fp32 come from
:mod:`bench.flops`, which times both dtypes of every path in the same rounds.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Contention,
    Loaded,
    clean_rounds,
    mix_records,
    pairwise_ratios,
    rotated,
    summary,
    wrap,
)
from bench.flops import synchronize
from bench.train import optimizer_step, warmed_batches

VARIANTS = ("fp32", "bf16", "autocast")


@dataclass
class PrecisionSetup:
    batch_size: int
    max_length: int
    steps: int  # optimizer steps per variant and round
    repeats: int
    warmup: int = 1
    nll_records: int = 32
    lr: float = 1e-5
    seed: int = 0


class PrecisionRunner:
    """A float32 and a bfloat16 CC-Tuning model with their AdamW optimizers."""

    def __init__(self, loaded: Loaded, lr: float, device: str = "cpu"):
        import torch

        self.device = device
        self.models = {
            "fp32": wrap(loaded, "cc").to(device).train(),
            "bf16": wrap(loaded, "cc").to(device=device, dtype=torch.bfloat16).train(),
        }
        self.optimizers = {k: torch.optim.AdamW(m.parameters(), lr=lr) for k, m in self.models.items()}

    def step(self, variant: str, batch: dict) -> float:
        import torch

        name = "bf16" if variant == "bf16" else "fp32"
        with torch.autocast(self.device.split(":")[0], torch.bfloat16, enabled=variant == "autocast"):
            return optimizer_step(self.models[name], self.optimizers[name], batch)


def train_step_times(
    loaded: Loaded, setup: PrecisionSetup, contention: Contention, device: str = "cpu"
) -> dict:
    runner = PrecisionRunner(loaded, setup.lr, device)
    batches = warmed_batches(loaded.tokenizer, setup, runner, VARIANTS, contention, device)

    def one_round(_index: int, attempt: int) -> dict[str, float]:
        times = {}
        for variant in rotated(VARIANTS, attempt):
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                runner.step(variant, batch)
            synchronize(device)
            times[variant] = (time.perf_counter() - start) / len(batches)
        return times

    rounds, info = clean_rounds(setup.repeats, one_round, contention, f"precision {loaded.name} train")
    seconds = {v: [r[v] for r in rounds] for v in VARIANTS}
    return {
        "seconds_per_step": {v: summary(s) for v, s in seconds.items()},
        "ratio_bf16": summary(pairwise_ratios(seconds["bf16"], seconds["fp32"])),
        "ratio_autocast": summary(pairwise_ratios(seconds["autocast"], seconds["fp32"])),
        "setup": {
            "batch_size": setup.batch_size,
            "max_length": setup.max_length,
            "steps_per_round": setup.steps,
        },
        "contention": info,
    }


def nll_agreement(loaded: Loaded, records: int, device: str = "cpu") -> dict:
    """Held-out NLL of the same weights in float32, under bf16 autocast and in bfloat16, and the paired
    differences to float32."""
    import json

    import torch

    from cctuning.eval.nll import evaluate_nll, load_items, paired_difference

    rows = mix_records(records, split="heldout", seed=2)
    out: dict[str, Any] = {"records": len(rows)}
    with tempfile.TemporaryDirectory(prefix="cctuning-bench-nll-") as tmp:
        data = Path(tmp) / "heldout.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        model = wrap(loaded, "cc", with_transform=True).eval().to(device)
        # fp32, then the same float32 weights under bf16 autocast (--bf16), then cast to bf16 (in place)
        for name, dtype in (("fp32", torch.float32), ("autocast", torch.float32), ("bf16", torch.bfloat16)):
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=name == "autocast"):
                report = evaluate_nll(model.to(dtype=dtype), loaded.tokenizer, data, "transform",
                                      Path(tmp) / name, progress=False)  # fmt: skip
            out[name] = round(report["nll"]["all"]["nll"], 5)
        fp32_items = load_items(Path(tmp) / "fp32")
        for name in ("bf16", "autocast"):
            items = load_items(Path(tmp) / name)
            diff = paired_difference(items, fp32_items)["all"]
            out[f"{name}_minus_fp32"] = {
                k: round(v, 5) if isinstance(v, float) else v for k, v in diff.items()
            }
            same = [i["layer"] for i in items] == [i["layer"] for i in fp32_items]
            out["same_layers" if name == "bf16" else "same_layers_autocast"] = same
    return out


def bench_precision(
    loaded: Loaded, setup: PrecisionSetup, contention: Contention, device: str = "cpu"
) -> dict:
    import logging

    logging.getLogger("cctuning").setLevel(logging.ERROR)  # the bf16-weights warning, once per model
    res = {"train": train_step_times(loaded, setup, contention, device)}
    res["nll"] = nll_agreement(loaded, setup.nll_records, device)
    return res
