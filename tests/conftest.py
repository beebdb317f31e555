import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cctuning.cli import main
from cctuning.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

# CCTUNING_TEST_THREADS lets several test runs share the cores without oversubscribing them; under
# pytest-xdist (`make test` runs one worker a core) each worker takes one thread
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("CCTUNING_TEST_THREADS", "2" if _WORKERS == 1 else "1")))


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


# a short `cctuning train` run: 3 steps of 4 examples, logged every step
FAST = flags(max_steps=3, batch_size=4, lr="1e-3", logging_steps=1, warmup_ratio=0)


def train(*extra: str, **options) -> int:
    """``cctuning train`` with ``flags(**options)`` and then the flags ``extra``; its exit code."""
    return main(["train", *flags(**options), *extra])


# the weights of a trained full (not LoRA) CC-Tuning folder
WEIGHTS = ("model.safetensors", "decision_maker.safetensors")


def assert_same_weights(a: Path, b: Path, names: tuple[str, ...] = WEIGHTS) -> None:
    """The safetensors files ``names`` of folders ``a`` and ``b`` hold the same tensors (float tolerance)."""
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=1e-5)


# the run of ResumeCheck: 4 steps, a checkpoint every 2
RESUME_OPTIONS = dict(max_steps="4", batch_size="2", lr="1e-3", save_steps="2", save_total_limit="5")


class ResumeCheck:
    """Full run, partial run, resume, compare weights. One ``cctuning train`` command line (``model``,
    ``data``, :data:`RESUME_OPTIONS` updated with ``options``; no ``--output``) runs uninterrupted into
    ``full``; what an interrupted run leaves is made in ``part`` (:meth:`keep_only`,
    :meth:`copy_checkpoint`, or by the test); :meth:`resume` continues it from its last checkpoint and
    checks that it ends with the full run's weights."""

    def __init__(self, tmp_path: Path, model: Path, data: Path, **options):
        self.command = ["train", *flags(model=model, data=data, **{**RESUME_OPTIONS, **options})]
        self.full, self.part = tmp_path / "full", tmp_path / "part"

    def run(self, output: Path, *extra: str) -> None:
        assert main([*self.command, "--output", str(output), *extra]) == 0

    def run_full(self) -> None:
        self.run(self.full)

    def keep_only(self, checkpoint: str) -> None:
        """A whole run into ``part``, then everything but ``checkpoint`` deleted: a run killed right after
        saving it."""
        self.run(self.part)
        for item in self.part.iterdir():
            if item.name != checkpoint:
                shutil.rmtree(item) if item.is_dir() else item.unlink()

    def copy_checkpoint(self, checkpoint: str) -> None:
        """``part`` holding only a copy of the full run's ``checkpoint``."""
        self.part.mkdir()
        shutil.copytree(self.full / checkpoint, self.part / checkpoint)

    def resume(self, weights: tuple[str, ...] = WEIGHTS) -> None:
        """Resume ``part`` from its last checkpoint; it must end with the weights of ``full``."""
        self.run(self.part, "--resume", "last")
        assert_same_weights(self.full, self.part, weights)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_records())


def connected_model(tokenizer, arch="llama", seed=0, base=None):
    """A CC model whose connection visibly changes the output (strong Decision Maker, non-trivial
    Transform Matrix), on the CPU: every random number is drawn there, so moving it to another device
    keeps the same weights. ``base``: the base model to wrap (default: a tiny random ``arch``)."""
    from cctuning.inference import TransformMatrix
    from cctuning.model import CCConfig, CCModel

    torch.manual_seed(seed)
    base = tiny_model(arch, tokenizer=tokenizer, seed=seed) if base is None else base
    cc = CCModel.from_base(base, CCConfig()).eval()
    d = cc.arch.hidden_size
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
    cc.set_transform(TransformMatrix(torch.eye(d) * 20 + torch.randn(d, d)))
    return cc


def short_train_args(model, data, output, batch_size, steps=3, **extra) -> list[str]:
    """``cctuning train`` arguments of the multi-process tests: a few steps at a high rate, no
    warm-up, a log line every step (``extra``: more flags, e.g. ``save_steps=2``)."""
    return [
        "train",
        *flags(
            model=model, data=data, output=output, max_steps=str(steps), batch_size=str(batch_size),
            lr="1e-2", warmup_ratio="0", logging_steps="1", **extra,
        ),
    ]  # fmt: skip
