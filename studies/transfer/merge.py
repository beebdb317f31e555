"""``python -m studies.transfer.merge OUT DIR [DIR ...]``: one summary from runs of the same settings
with different seeds (each ``DIR`` a finished ``python -m studies.transfer --seed S --output DIR``),
through the study's own :func:`~studies.transfer.summary.summarize` over the runs' ``per_seed``
records; its wall-clock is the sum of the runs'. Writes ``OUT/summary.json`` and ``OUT/summary.md``
(OUT must not hold a summary yet) and prints the markdown."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cctuning.io import write_json, write_text
from studies.transfer.config import TransferConfig
from studies.transfer.summary import SUMMARY_NAME, summarize, summary_markdown

# settings that may differ between the merged runs (everything else must be equal)
PER_RUN = {"output", "seeds", "seed_list", "threads"}


def merge(folders: list[Path], out: Path) -> dict:
    parts = [json.loads((f / SUMMARY_NAME).read_text(encoding="utf-8")) for f in folders]
    first = {k: v for k, v in parts[0]["settings"].items() if k not in PER_RUN}
    for folder, part in zip(folders[1:], parts[1:]):
        other = {k: v for k, v in part["settings"].items() if k not in PER_RUN}
        if other != first:
            differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ValueError(f"{folder}: settings differ from {folders[0]}'s: {', '.join(differ)}")
    runs = [r for p in parts for r in p["per_seed"]]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated seeds {seeds}")
    settings = dict(parts[0]["settings"], output=str(out), seed_list=seeds)
    return summarize(TransferConfig(**settings), runs, sum(p["seconds"]["total"] for p in parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.transfer.merge", description=__doc__)
    parser.add_argument("out", help="the folder to write the merged summary to")
    parser.add_argument(
        "runs", nargs="+", help="finished one-seed (or several-seed) runs of the same settings"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / SUMMARY_NAME).exists():
        parser.exit(2, f"{parser.prog}: error: {out / SUMMARY_NAME} exists; give a new folder\n")
    try:
        summary = merge([Path(r) for r in args.runs], out)
    except (OSError, ValueError, KeyError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SUMMARY_NAME, summary)
    write_text(out / "summary.md", summary_markdown(summary))
    print(summary_markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
