"""The six CC-Tuning benchmarks: what each one's answers look like, and a validating loader.

The prompts ship inside the package (``cctuning/resources/benchmarks/<Benchmark>/<lang>.jsonl``,
see the README there for sources and licences), so evaluation never needs a network or a shared
folder. Each line is ``{"id", "prompt", "answer", "prompt_en"}``; every line is checked, and the
first bad one raises :class:`~cctuning.errors.DataError` naming ``file:line`` and the field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cctuning.errors import CCError, DataError

logger = logging.getLogger(__name__)

AnswerKind = Literal["choice", "span", "aliases", "summary"]

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "benchmarks"
FIELDS = ("id", "prompt", "answer", "prompt_en")


@dataclass(frozen=True)
class BenchmarkSpec:
    """How a benchmark's gold answers look and which per-item metrics its scorer returns.

    ``labels`` are the option labels of a multiple-choice benchmark (empty otherwise);
    ``metrics`` are the numeric keys of the scorer's per-item dict, the ones :func:`aggregate`
    averages; ``languages`` are those vendored with the package.
    """

    name: str
    answer_kind: AnswerKind
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    languages: tuple[str, ...]


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "XNLI",
            "choice",
            ("1", "2", "3"),
            ("accuracy",),
            ("ar", "el", "en", "hi", "ru", "sw", "th", "tr", "ur", "zh"),
        ),
        BenchmarkSpec(
            "XStoryCloze",
            "choice",
            ("1", "2"),
            ("accuracy",),
            ("ar", "en", "es", "eu", "hi", "id", "ru", "sw", "te", "zh"),
        ),
        BenchmarkSpec(
            "MMMLU",
            "choice",
            ("A", "B", "C", "D"),
            ("accuracy",),
            ("ar", "bn", "en", "es", "hi", "id", "ko", "pt", "sw", "yo"),
        ),
        BenchmarkSpec(
            "XQuAD",
            "span",
            (),
            ("exact_match", "f1", "contains"),
            ("ar", "de", "el", "en", "hi", "ru", "th", "tr", "vi", "zh"),
        ),
        BenchmarkSpec(
            "MKQA",
            "aliases",
            (),
            ("exact_match", "f1", "contains"),
            ("ar", "de", "en", "ja", "ko", "pt", "ru", "tr", "vi", "zh"),
        ),
        BenchmarkSpec(
            "XLSum", "summary", (), ("rougeL",), ("ar", "en", "fr", "hi", "id", "ru", "sw", "tr", "ur", "vi")
        ),
    )
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_BY_KEY = {_key(name): name for name in BENCHMARKS}


def resolve_name(name: str) -> str:
    """The canonical benchmark name, so that ``xnli``, ``XL-Sum`` and ``xlsum`` all work."""
    canonical = _BY_KEY.get(_key(name))
    if canonical is None:
        raise CCError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)}")
    return canonical


def get_spec(name: str) -> BenchmarkSpec:
    return BENCHMARKS[resolve_name(name)]


@dataclass(frozen=True)
class Item:
    """One evaluation prompt. ``answer`` is a tuple of aliases for MKQA, a string otherwise."""

    id: int | str
    prompt: str
    answer: str | tuple[str, ...]
    prompt_en: str
    lang: str
    benchmark: str


def _benchmark_dir(name: str, data_dir: str | Path | None) -> Path:
    return (Path(data_dir) if data_dir is not None else RESOURCE_DIR) / name


def available_languages(name: str, data_dir: str | Path | None = None) -> list[str]:
    """Languages that have a ``<lang>.jsonl`` file for this benchmark, sorted."""
    folder = _benchmark_dir(resolve_name(name), data_dir)
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.jsonl") if path.is_file())


def _check_answer(spec: BenchmarkSpec, answer: object, where: tuple[str, int]) -> str | tuple[str, ...]:
    path, line = where
    if spec.answer_kind == "aliases":
        if not isinstance(answer, list) or not all(isinstance(alias, str) for alias in answer):
            raise DataError(path, line, "answer", "must be a list of strings (the accepted aliases)")
        return tuple(answer)
    if not isinstance(answer, str):
        raise DataError(path, line, "answer", f"must be a string, got {type(answer).__name__}")
    if spec.answer_kind == "choice" and answer not in spec.labels:
        raise DataError(path, line, "answer", f"'{answer}' is not one of the labels {list(spec.labels)}")
    if not answer.strip():
        raise DataError(path, line, "answer", "empty")
    return answer


def _parse_line(spec: BenchmarkSpec, lang: str, text: str, where: tuple[str, int]) -> Item:
    path, line = where
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, line, None, f"malformed JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise DataError(path, line, None, f"an item must be a JSON object, got {type(value).__name__}")
    for field in FIELDS:
        if field not in value:
            raise DataError(path, line, field, "missing")
    item_id = value["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, int | str):
        raise DataError(path, line, "id", f"must be an integer or a string, got {type(item_id).__name__}")
    for field in ("prompt", "prompt_en"):
        if not isinstance(value[field], str):
            raise DataError(path, line, field, f"must be a string, got {type(value[field]).__name__}")
        if not value[field].strip():
            raise DataError(path, line, field, "empty")
    return Item(
        id=item_id,
        prompt=value["prompt"],
        answer=_check_answer(spec, value["answer"], where),
        prompt_en=value["prompt_en"],
        lang=lang,
        benchmark=spec.name,
    )


def load_benchmark(
    name: str, lang: str, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Item]:
    """All items of one benchmark in one language, in file order, validated.

    ``data_dir`` holds ``<Benchmark>/<lang>.jsonl`` folders (default: the vendored copy).
    ``limit`` keeps the first N items; the files list ids in the same order in every language,
    so a limit selects the same questions everywhere. The whole file is validated either way.
    """
    spec = get_spec(name)
    if limit is not None and limit < 0:
        raise CCError(f"limit must be >= 0, got {limit}")
    path = _benchmark_dir(spec.name, data_dir) / f"{lang}.jsonl"
    if not path.is_file():
        known = available_languages(spec.name, data_dir)
        raise DataError(
            str(path), None, None, f"no such file (languages with data: {', '.join(known) or 'none'})"
        )
    items = read_items(path, spec.name, lang)
    return items if limit is None else items[:limit]


def is_benchmark_name(name: str) -> bool:
    """Whether ``name`` names a bundled benchmark (any spelling :func:`resolve_name` takes)."""
    return _key(name) in _BY_KEY


def answer_records(
    name: str, langs: list[str] | None = None, data_dir: str | Path | None = None, limit: int | None = None
) -> list[dict]:
    """A generative benchmark's items as training-format records for ``eval --nll``: instruction =
    the prompt, output = the gold answer (MKQA: its first alias; XL-Sum: the summary),
    instruction_en = the English prompt, lang. Scoring the gold answer's likelihood separates models
    where generated answers score near 0 (XQuAD and MKQA at 135M)."""
    spec = get_spec(name)
    if spec.answer_kind == "choice":
        raise CCError(f"{spec.name} is multiple choice: score it with --scoring likelihood, not --nll")
    records = []
    for lang in langs or available_languages(spec.name, data_dir):
        for item in load_benchmark(spec.name, lang, data_dir, limit):
            answer = item.answer[0] if isinstance(item.answer, tuple) else item.answer
            records.append(
                {"instruction": item.prompt, "output": answer, "instruction_en": item.prompt_en, "lang": lang}
            )
    return records


def read_items(path: str | Path, name: str, lang: str) -> list[Item]:
    """All items of one benchmark file (any path), in file order, validated as :func:`load_benchmark` does."""
    spec = get_spec(name)
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), raw[: err.start].count(b"\n") + 1, None, "invalid UTF-8") from None
    items: list[Item] = []
    seen: dict[int | str, int] = {}
    # split on "\n" only: str.splitlines() would also split inside strings holding U+2028 and friends
    for number, line_text in enumerate(text.split("\n"), start=1):
        line_text = line_text.removesuffix("\r")
        if not line_text.strip():
            continue
        item = _parse_line(spec, lang, line_text, (str(path), number))
        if item.id in seen:
            raise DataError(
                str(path), number, "id", f"duplicate id {item.id!r} (first on line {seen[item.id]})"
            )
        seen[item.id] = number
        items.append(item)
    if not items:
        raise DataError(str(path), None, None, "no items")
    logger.debug("loaded %d %s items for %s from %s", len(items), spec.name, lang, path)
    return items
