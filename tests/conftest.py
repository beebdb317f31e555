import json
import os
from pathlib import Path

import pytest
import torch

from cctuning.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

# CCTUNING_TEST_THREADS lets several test runs share the 2 cores without oversubscribing them
torch.set_num_threads(int(os.environ.get("CCTUNING_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama folder with tokenizer, like a user's base model."""
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", tokenizer=tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_records(n: int = 12) -> list[dict]:
    langs = ["sw", "zh", "ar", "hi"]
    texts = {
        "sw": ("Habari ya asubuhi {i}?", "Nzuri sana {i}."),
        "zh": ("请回答问题 {i}。", "今天天气很好 {i}。"),
        "ar": ("ما هي عاصمة مصر {i}؟", "القاهرة هي العاصمة {i}."),
        "hi": ("नमस्ते {i}, आप कैसे हैं?", "मैं ठीक हूँ {i}।"),
    }
    out = []
    for i in range(n):
        lang = langs[i % len(langs)]
        q, a = texts[lang]
        out.append(
            {
                "instruction": q.format(i=i),
                "output": a.format(i=i),
                "instruction_en": f"Answer the question number {i}.",
                "lang": lang,
            }
        )
    return out


def flags(**options) -> list[str]:
    """Command-line flags from keyword arguments: ``flags(max_steps=4, english_grad=True)`` gives
    ``["--max-steps", "4", "--english-grad"]``; values are passed through ``str``."""
    out: list[str] = []
    for name, value in options.items():
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_records())
