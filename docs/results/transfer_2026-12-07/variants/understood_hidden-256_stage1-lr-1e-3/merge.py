"""Merge three one-seed runs of the same settings into one summary with the study's own summarize()."""
import json
import sys
from pathlib import Path

from cctuning.io import write_json, write_text
from studies.transfer.config import TransferConfig
from studies.transfer.summary import summarize, summary_markdown

out = Path(sys.argv[1])
folders = [Path(p) for p in sys.argv[2:]]
parts = [json.loads((f / "summary.json").read_text()) for f in folders]
runs = [r for p in parts for r in p["per_seed"]]
settings = dict(parts[0]["settings"], output=str(out), seed_list=[r["seed"] for r in runs])
summary = summarize(TransferConfig(**settings), runs, sum(p["seconds"]["total"] for p in parts))
out.mkdir(parents=True, exist_ok=True)
write_json(out / "summary.json", summary)
write_text(out / "summary.md", summary_markdown(summary))
print(summary_markdown(summary))
