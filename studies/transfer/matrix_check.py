"""``python -m studies.transfer.matrix_check DIR [DIR ...] --out FILE``: why the Transform Matrix does
or does not transfer in a finished run. For each seed's connected model (``DIR/seed-S/cc``), the
held-out accuracy under ``transform`` with matrices fitted in four ways:

* ``as_run``: on the run's ``matrix.jsonl`` exactly as the run fitted it (reproduces the run's
  ``cc_transform`` cell: a consistency check);
* ``per_layer``: the same pairs, one matrix per layer (``fit-matrix --per-layer``);
* ``ridge``: the same pairs with ridge λ = 1 (a smoother map);
* ``with_heldout_pairs``: the same pairs plus the held-out evaluation questions themselves (foreign
  with their English), fitted on all of them: an in-sample upper bound a user never has. If even
  this stays at SFT's level, the foreign activations at p do not hold what the connection needs;
  if it transfers, a linear map can produce it and what fails is the generalisation to pairs
  never seen.

Writes FILE (JSON; must not exist) and prints a table (mean over every seed given)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from cctuning.data.records import load_records
from cctuning.inference.matrix import fit_transform_matrix
from cctuning.io import write_json, write_jsonl
from cctuning.loading import load_for_inference
from studies.transfer.diagnostic_cli import parse_diagnostic_args
from studies.transfer.scoring import correct, score_candidates
from studies.transfer.world import FOREIGN_LANG

FITS = {  # name: (include the held-out pairs, fit options)
    "as_run": (False, {"heldout_fraction": 0.1}),
    "per_layer": (False, {"heldout_fraction": 0.1, "per_layer": True}),
    "ridge": (False, {"heldout_fraction": 0.1, "ridge": 1.0}),
    "with_heldout_pairs": (True, {"heldout_fraction": 0.0}),
}


def _pair_records(folder: Path, held: list[dict]) -> dict[bool, list]:
    """The matrix's foreign pairs, read once: ``{False: the run's matrix.jsonl, True: the same plus the
    held-out evaluation questions}`` (through :func:`load_records`, as the run read them)."""
    rows = [json.loads(line) for line in (folder / "matrix.jsonl").open(encoding="utf-8")]
    rows += [
        {"instruction": it["instruction"], "output": it["answer"], "instruction_en": it["instruction_en"],
         "lang": FOREIGN_LANG}
        for it in held
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        write_jsonl(path, rows)
        records = [r for r in load_records(path, require_english=True) if r.lang == FOREIGN_LANG]
    return {True: records, False: records[: len(records) - len(held)]}


def seed_check(folder: Path, seed: int, ridge: float = 0.0) -> dict:
    """``{fit: {accuracy, pairs, the fit's report}}`` for one seed's folder."""
    held = [json.loads(line) for line in (folder / "heldout.jsonl").open(encoding="utf-8")]
    model, tok, _ = load_for_inference(str(folder / "cc"), load_transform=False, device="cpu")
    pairs = _pair_records(folder, held)
    out = {}
    for name, (with_held, options) in FITS.items():
        records = pairs[with_held]
        matrix, fit = fit_transform_matrix(
            model, tok, records, samples=len(records), seed=seed, **{"ridge": ridge, **options}
        )
        model.set_transform(matrix)
        rows = score_candidates(model, tok, held, "transform", 64)
        out[name] = {"accuracy": sum(correct(rows)) / len(rows), "pairs": len(records), "fit": fit.to_dict()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_diagnostic_args(
        "python -m studies.transfer.matrix_check",
        __doc__,
        "output folders of finished runs (model folders kept)",
        argv,
    )
    result: dict = {"runs": []}
    for root in map(Path, args.runs):
        summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
        ridge = summary["settings"]["matrix_ridge"]
        seeds = {s: seed_check(root / f"seed-{s}", s, ridge) for s in summary["seeds"]}
        cells = {run["seed"]: run for run in summary["per_seed"]}
        result["runs"].append(
            {
                "run": str(root),
                "seeds": seeds,
                "run_cc_transform": {s: cells[s]["cells"]["cc_transform"]["accuracy"] for s in seeds},
            }
        )
    write_json(args.out, result)
    values = [seeds for run in result["runs"] for seeds in run["seeds"].values()]
    print("| fit | accuracy, mean over seeds | per seed |\n|---|---:|---|")
    for name in FITS:
        accs = [v[name]["accuracy"] for v in values]
        print(f"| {name} | {100 * sum(accs) / len(accs):.1f} | {', '.join(f'{100 * a:.1f}' for a in accs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
