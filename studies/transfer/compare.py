"""``python -m studies.transfer.compare DIR [--cell C] [--over A B ...]``: paired margins between
any two cells of a finished run, from its per-item predictions (``DIR/seed-S/predictions.jsonl``),
with the intervals of summary.json's margins over SFT: per seed a paired bootstrap over items
(seeded by the seed), over seeds a 95% t-interval. Writes ``DIR/comparisons.json`` and prints a
table; the default compares the English oracle with the data-level cells."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cctuning.stats import mean_interval, paired_bootstrap_mean

DEFAULT_OVER = ("bilingual_prompt", "english_prompt", "sft")


def _hits(rows: list[dict], cell: str) -> list[bool]:
    return [row[cell]["prediction"] == row["answer"] for row in rows]


def compare(root: Path, cell: str, over: list[str], reps: int) -> dict:
    """``cell``'s paired margin over each cell of ``over``: per seed and over seeds."""
    summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    out: dict = {"cell": cell, "seeds": summary["seeds"], "bootstrap_reps": reps, "over": {}}
    for other in over:
        per_seed = []
        for seed in summary["seeds"]:
            path = root / f"seed-{seed}" / "predictions.jsonl"
            rows = [json.loads(line) for line in path.open(encoding="utf-8")]
            per_seed.append(paired_bootstrap_mean(_hits(rows, cell), _hits(rows, other), reps, seed))
        out["over"][other] = {
            **mean_interval([p["margin"] for p in per_seed], -1.0, 1.0),
            "per_seed": per_seed,
        }
    return out


def markdown(result: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:+.1f}"

    lines = [
        f"| {result['cell']} minus | mean over seeds [95% t] | per seed [paired bootstrap 95%] |",
        "|---|---|---|",
    ]
    for other, m in result["over"].items():
        seeds = ", ".join(
            f"{pct(p['margin'])} [{pct(p['ci_low'])}, {pct(p['ci_high'])}]" for p in m["per_seed"]
        )
        lines.append(f"| {other} | {pct(m['mean'])} [{pct(m['ci_low'])}, {pct(m['ci_high'])}] | {seeds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.transfer.compare", description=__doc__)
    parser.add_argument("output", help="the output folder of a finished `python -m studies.transfer` run")
    parser.add_argument("--cell", default="cc_oracle", help="the cell whose margins are taken")
    parser.add_argument("--over", nargs="+", default=list(DEFAULT_OVER), help="the cells it is compared with")
    parser.add_argument("--bootstrap-reps", type=int, default=1000)
    args = parser.parse_args(argv)
    root = Path(args.output)
    result = compare(root, args.cell, args.over, args.bootstrap_reps)
    (root / "comparisons.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
