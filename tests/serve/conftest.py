"""Shared pieces of the ``cctuning serve`` tests: prompts, and sequences run on an engine."""

import threading
import time

from cctuning.serve.sequence import Sampling, Sequence

# eight prompts of different lengths and scripts (a batch of 8), and their English versions
PROMPTS = [
    "Habari ya asubuhi, rafiki yangu? Tafadhali jibu swali hili.",
    "请回答下面的问题。",
    "ما هي عاصمة مصر؟",
    "hi",
    "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Merhaba, nasılsın?",
    "สวัสดีครับ วันนี้อากาศดีมาก",
]
ENGLISH = [
    "Good morning, my friend? Please answer.",
    "Please answer the question below.",
    "What is the capital of Egypt?",
    "hi",
    "Hello, how are you?",
    "Hello, how are you? All is well, thanks.",
    "Hello, how are you?",
    "Hello, the weather is very nice today.",
]


class Recorder:
    """A sequence's sink: every event, in order (called from the engine's thread)."""

    def __init__(self):
        self.events = []
        self.ended = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.kind in ("end", "error"):
            self.ended.set()

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")


def sequence(generator, prompt: str, connection: str, english: str | None = None, **sampling) -> Sequence:
    """A sequence of ``prompt`` rendered as ``cctuning generate`` renders it, with a :class:`Recorder`."""
    encode = generator.encoder.encode_prompt
    return Sequence(
        encode(prompt),
        connection,
        Sampling(**{"max_tokens": 8, **sampling}),
        Recorder(),
        encode(english) if english is not None else None,
    )


def wait(sequences, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for seq in sequences:
        assert seq.sink.ended.wait(max(0.0, deadline - time.monotonic())), "a sequence did not finish"
