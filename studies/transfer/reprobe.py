"""``python -m studies.transfer.reprobe DIR [DIR ...] --out FILE``: the entity probes of finished
understood-world runs, recomputed from their saved model folders (``DIR/seed-S/{stage1,sft,cc}``,
with the CC model's Transform Matrix), so runs made before a probe was added can be read with it.
Writes FILE (JSON: per run, seed and model, :func:`~studies.transfer.probes.entity_probes`'s output,
and the mean over every seed given of each model's best foreign layer, MLP outputs and hidden
states) and prints a table. FILE must not exist: nothing is written over."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cctuning.io import write_json
from cctuning.loading import load_for_inference
from studies.transfer.diagnostic_cli import parse_diagnostic_args
from studies.transfer.probes import entity_probes
from studies.transfer.world import World

MODELS = ("stage1", "sft", "cc")


def seed_probes(folder: Path) -> dict:
    """``{model: entity_probes(...)}`` for one seed's folder of a finished run."""
    world = World(**json.loads((folder / "world.json").read_text(encoding="utf-8")))
    out = {}
    for name in MODELS:
        model, tokenizer, _ = load_for_inference(str(folder / name), device="cpu")  # with its matrix
        out[name] = entity_probes(model, tokenizer, world, model.transform if name == "cc" else None)
    return out


def reprobe(roots: list[Path]) -> dict:
    runs = []
    for root in roots:
        seeds = json.loads((root / "summary.json").read_text(encoding="utf-8"))["seeds"]
        runs.append({"run": str(root), "seeds": {s: seed_probes(root / f"seed-{s}") for s in seeds}})
    best = {}
    for name in MODELS:
        for key in ("best_foreign", "best_foreign_hidden"):
            values = [r["seeds"][s][name][key] for r in runs for s in r["seeds"]]
            best[f"{name}_{key}"] = {"mean": sum(values) / len(values), "per_seed": values}
    return {"runs": runs, "best": best}


def main(argv: list[str] | None = None) -> int:
    args = parse_diagnostic_args(
        "python -m studies.transfer.reprobe",
        __doc__,
        "output folders of finished --world understood runs",
        argv,
    )
    result = reprobe([Path(r) for r in args.runs])
    write_json(args.out, result)
    print("| model | best layer, MLP outputs f_l[p] | best layer, hidden states at p |\n|---|---:|---:|")
    for name in MODELS:
        mlp, hidden = result["best"][f"{name}_best_foreign"], result["best"][f"{name}_best_foreign_hidden"]
        print(f"| {name} | {100 * mlp['mean']:.1f} | {100 * hidden['mean']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
