"""``make demo``: a short CC-Tuning and SFT training side by side on a tiny model (offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cctuning.cli import main as cli_main
from cctuning.testing import tiny_model, tiny_tokenizer

RECORDS = [
    ("Habari ya asubuhi, rafiki yangu?", "Nzuri sana, asante.", "Good morning, my friend?", "sw"),
    ("请回答下面的问题。今天天气很好吗？", "今天天气很好。", "Please answer: is the weather good today?", "zh"),
    ("ما هي عاصمة مصر؟", "القاهرة هي العاصمة.", "What is the capital of Egypt?", "ar"),
    ("नमस्ते, आप कैसे हैं?", "मैं ठीक हूँ।", "Hello, how are you?", "hi"),
]


def main(root: str = "runs/demo") -> int:
    out = Path(root)
    base = out / "base"
    if not (base / "config.json").is_file():
        tok = tiny_tokenizer()
        tiny_model("llama", tokenizer=tok).save_pretrained(base)
        tok.save_pretrained(base)
    data = out / "train.jsonl"
    rows = [dict(instruction=q, output=a, instruction_en=e, lang=lang) for q, a, e, lang in RECORDS] * 8
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    losses = {}
    for method in ("sft", "cc"):
        args = ["train", "--model", str(base), "--data", str(data), "--output", str(out / method),
                "--method", method, "--max-steps", "20", "--batch-size", "4", "--lr", "3e-3", "--logging-steps", "5"]
        code = cli_main(args)
        if code:
            return code
        losses[method] = json.loads((out / method / "train_results.json").read_text())["train_loss"]
    print("\nmethod  mean train loss")
    for method, loss in losses.items():
        print(f"{method:6}  {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
