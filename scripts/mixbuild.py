"""Build the bundled CC-Tuning training mix from human-translated parallel sources.

Why a bundled mix: CC-Tuning needs records whose instruction is non-English and whose
``instruction_en`` is the same request in English; parallel corpora give exactly that pairing
without machine translation (XCOPA's English side is the one exception, see the README).

:func:`build_mix` turns the parallel sources into records of four task types (``math``,
``choice``, ``continue``, ``translate``), splits them by source item so that no item is on both
sides of the train/held-out split, samples a fixed number of records per language, and refuses
to return anything that contains benchmark text (:class:`ContaminationError`).

Only ``scripts/build_mix.py`` and ``tests/test_mix.py`` use this module; the package itself only
reads the shipped copy (:func:`cctuning.data.mix.load_mix`), so it works on a fresh clone.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cctuning.data.mix import MIX_DIR, SPLITS, mix_files
from cctuning.errors import CCError, DataError
from cctuning.io import write_text

logger = logging.getLogger(__name__)

TASKS = ("math", "choice", "continue", "translate")

# The 21 non-English benchmark languages; the mix covers exactly these (XCOPA's et/ht/it/ta are
# left out: nothing evaluates them and their templates could not be checked).
LANGUAGES = (
    "ar", "bn", "de", "el", "es", "eu", "fr", "hi", "id", "ja", "ko",
    "pt", "ru", "sw", "te", "th", "tr", "ur", "vi", "yo", "zh",
)  # fmt: skip

SOURCE_FILES = {
    "mgsm": "mgsm_parallel.jsonl",
    "xcopa": "xcopa_parallel.jsonl",
    "ntrex": "ntrex_parallel.jsonl",
    "tatoeba": "tatoeba_parallel.jsonl",
    "udhr": "udhr_parallel.jsonl",
}

ENGLISH_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "de": "German", "el": "Greek", "es": "Spanish", "eu": "Basque",
    "fr": "French", "hi": "Hindi", "id": "Indonesian", "ja": "Japanese", "ko": "Korean",
    "pt": "Portuguese", "ru": "Russian", "sw": "Swahili", "te": "Telugu", "th": "Thai", "tr": "Turkish",
    "ur": "Urdu", "vi": "Vietnamese", "yo": "Yoruba", "zh": "Chinese",
}  # fmt: skip

# Task templates, written by this project (not verified by native speakers). "translate" and
# "continue" exist for every language; "math" only where MGSM has the language and the choice
# keys only where XCOPA has it. English is the wording of every ``instruction_en``.
TEMPLATES: dict[str, dict[str, str]] = {
    "en": {
        "translate": "Translate the following text into {language}:",
        "continue": "Write the next sentence of this news article:",
        "math": "Solve the following math problem. Give only the final number as the answer.",
        "premise": "Premise: ",
        "cause": "What was the cause?",
        "effect": "What happened as a result?",
        "choose": "Answer with the more plausible alternative.",
    },
    "ar": {
        "translate": "ترجم النص التالي إلى اللغة العربية:",
        "continue": "اكتب الجملة التالية من هذا المقال الإخباري:",
    },
    "bn": {
        "translate": "নিচের লেখাটি বাংলায় অনুবাদ করুন:",
        "continue": "এই সংবাদ প্রতিবেদনের পরের বাক্যটি লিখুন:",
        "math": "নিচের গণিত সমস্যাটি সমাধান করুন। উত্তরে শুধু চূড়ান্ত সংখ্যাটি লিখুন।",
    },
    "de": {
        "translate": "Übersetze den folgenden Text ins Deutsche:",
        "continue": "Schreibe den nächsten Satz dieses Nachrichtenartikels:",
        "math": "Löse die folgende Rechenaufgabe. Gib als Antwort nur die Zahl des Endergebnisses an.",
    },
    "el": {
        "translate": "Μεταφράστε το παρακάτω κείμενο στα ελληνικά:",
        "continue": "Γράψτε την επόμενη πρόταση αυτού του ειδησεογραφικού άρθρου:",
    },
    "es": {
        "translate": "Traduce el siguiente texto al español:",
        "continue": "Escribe la siguiente oración de este artículo de noticias:",
        "math": "Resuelve el siguiente problema de matemáticas. Da como respuesta solo el número final.",
    },
    "eu": {
        "translate": "Itzuli honako testu hau euskarara:",
        "continue": "Idatzi albiste honen hurrengo esaldia:",
    },
    "fr": {
        "translate": "Traduisez le texte suivant en français :",
        "continue": "Écrivez la phrase suivante de cet article de presse :",
        "math": "Résolvez le problème de mathématiques suivant. Donnez uniquement le nombre final comme réponse.",
    },
    "hi": {
        "translate": "निम्नलिखित पाठ का हिंदी में अनुवाद करें:",
        "continue": "इस समाचार लेख का अगला वाक्य लिखें:",
    },
    "id": {
        "translate": "Terjemahkan teks berikut ke dalam bahasa Indonesia:",
        "continue": "Tuliskan kalimat berikutnya dari artikel berita ini:",
        "premise": "Premis: ",
        "cause": "Apa penyebabnya?",
        "effect": "Apa yang terjadi sebagai akibatnya?",
        "choose": "Jawablah dengan alternatif yang lebih masuk akal.",
    },
    "ja": {
        "translate": "次の文章を日本語に翻訳してください：",
        "continue": "このニュース記事の次の文を書いてください：",
        "math": "次の算数の問題を解いてください。答えとして最終的な数値だけを書いてください。",
    },
    "ko": {
        "translate": "다음 글을 한국어로 번역하세요:",
        "continue": "이 뉴스 기사의 다음 문장을 쓰세요:",
    },
    "pt": {
        "translate": "Traduza o texto a seguir para o português:",
        "continue": "Escreva a próxima frase desta notícia:",
    },
    "ru": {
        "translate": "Переведите следующий текст на русский язык:",
        "continue": "Напишите следующее предложение этой новостной статьи:",
        "math": "Решите следующую математическую задачу. В ответе укажите только итоговое число.",
    },
    "sw": {
        "translate": "Tafsiri maandishi yafuatayo kwa Kiswahili:",
        "continue": "Andika sentensi inayofuata ya makala hii ya habari:",
        "math": "Tatua swali lifuatalo la hesabu. Toa namba ya mwisho pekee kama jibu.",
        "premise": "Dhana: ",
        "cause": "Chanzo kilikuwa nini?",
        "effect": "Nini kilitokea kama matokeo?",
        "choose": "Jibu kwa chaguo linalowezekana zaidi.",
    },
    "te": {
        "translate": "కింది పాఠాన్ని తెలుగులోకి అనువదించండి:",
        "continue": "ఈ వార్తా కథనంలోని తదుపరి వాక్యాన్ని రాయండి:",
        "math": "కింది గణిత సమస్యను పరిష్కరించండి. సమాధానంగా చివరి సంఖ్యను మాత్రమే ఇవ్వండి.",
    },
    "th": {
        "translate": "แปลข้อความต่อไปนี้เป็นภาษาไทย:",
        "continue": "เขียนประโยคถัดไปของบทความข่าวนี้:",
        "math": "จงแก้โจทย์คณิตศาสตร์ต่อไปนี้ ตอบเฉพาะตัวเลขคำตอบสุดท้ายเท่านั้น",
        "premise": "ข้อความตั้งต้น: ",
        "cause": "สาเหตุคืออะไร",
        "effect": "ผลที่เกิดขึ้นคืออะไร",
        "choose": "ตอบด้วยตัวเลือกที่สมเหตุสมผลกว่า",
    },
    "tr": {
        "translate": "Aşağıdaki metni Türkçeye çevirin:",
        "continue": "Bu haber makalesinin bir sonraki cümlesini yazın:",
        "premise": "Öncül: ",
        "cause": "Bunun nedeni neydi?",
        "effect": "Bunun sonucunda ne oldu?",
        "choose": "Daha makul olan seçenekle cevap verin.",
    },
    "ur": {
        "translate": "درج ذیل متن کا اردو میں ترجمہ کریں:",
        "continue": "اس خبر کے مضمون کا اگلا جملہ لکھیں:",
    },
    "vi": {
        "translate": "Hãy dịch đoạn văn sau sang tiếng Việt:",
        "continue": "Hãy viết câu tiếp theo của bài báo này:",
        "premise": "Tiền đề: ",
        "cause": "Nguyên nhân là gì?",
        "effect": "Kết quả là gì?",
        "choose": "Hãy trả lời bằng phương án hợp lý hơn.",
    },
    "yo": {
        "translate": "Túmọ̀ ọ̀rọ̀ tí ó wà nísàlẹ̀ yìí sí èdè Yorùbá:",
        "continue": "Kọ gbólóhùn tí ó kàn nínú ìròyìn yìí:",
    },
    "zh": {
        "translate": "请将以下文本翻译成中文：",
        "continue": "请写出这篇新闻报道的下一句：",
        "math": "请解答下面的数学题。只需给出最终的数字作为答案。",
        "premise": "前提：",
        "cause": "原因是什么？",
        "effect": "结果是什么？",
        "choose": "请用更合理的选项作答。",
    },
}

# Which source feeds which task; the translate task draws on three sources evenly.
TASK_SOURCES = {
    "math": ("mgsm",),
    "choice": ("xcopa",),
    "continue": ("ntrex",),
    "translate": ("ntrex", "tatoeba", "udhr"),
}

MIN_NEEDLE_CHARS = 30  # benchmark text at least this long must not occur inside any record
MIN_LINE_CHARS = 12  # shorter benchmark lines must not equal any line of any record
RECORD_FIELDS = ("instruction", "output", "instruction_en")


class ContaminationError(CCError):
    """Benchmark text was found inside the mix: evaluation would be meaningless, so never ship it."""


@dataclass(frozen=True)
class MixConfig:
    """Knobs of the build; the shipped mix uses the defaults (the README records them)."""

    per_language: int = 240  # records per language, train + held-out
    heldout_fraction: float = 0.1  # of each source's items, and of each language's records
    seed: str = "cc-mix-v1"
    min_continue_chars: int = 10  # skip NTREX pairs whose sentences are fragments ("Oh, nein.")


@dataclass(frozen=True)
class _Candidate:
    """One possible record before sampling; ``item`` is the unit that the split keeps together."""

    id: str
    lang: str
    task: str
    source: str
    item: str
    instruction: str
    instruction_en: str
    output: str

    def as_record(self, split: str) -> dict[str, str]:
        return {
            "id": self.id,
            "lang": self.lang,
            "task": self.task,
            "source": self.source,
            "item": self.item,
            "split": split,
            "instruction": self.instruction,
            "instruction_en": self.instruction_en,
            "output": self.output,
        }


def _digest(*parts: object) -> str:
    """A stable pseudo-random key: unlike ``hash()`` it does not change with PYTHONHASHSEED."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


@functools.cache
def _template(lang: str, key: str) -> str:
    try:
        text = TEMPLATES[lang][key]
    except KeyError:
        raise CCError(f"mix: no '{key}' template for language '{lang}'") from None
    return unicodedata.normalize("NFC", text)


@functools.cache
def _english(key: str, lang: str = "") -> str:
    return _template("en", key).format(language=ENGLISH_NAMES.get(lang, lang))


def _clean(text: object) -> str:
    """Source text with line ends unified and outer whitespace removed; empty means 'skip it'."""
    if not isinstance(text, str):
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def source_path(source_dir: str | Path, name: str) -> Path:
    """The file of source ``name`` under ``source_dir``: ``X.jsonl``, or ``X.jsonl.gz`` as shipped in
    ``data/parallel/``."""
    plain = Path(source_dir) / SOURCE_FILES[name]
    packed = plain.with_name(plain.name + ".gz")
    return packed if packed.is_file() and not plain.is_file() else plain


def _read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    """Every row of one source file (plain or gzip); a missing field names the file and line."""
    if not path.is_file():
        raise DataError(str(path), None, None, "source file missing (see cctuning/resources/mix/README.md)")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(str(path), number, None, f"malformed JSON: {err.msg}") from None
            for name in required:
                if name not in row:
                    raise DataError(str(path), number, name, "missing")
            rows.append(row)
    return rows


def _mgsm(rows: Iterable[dict]) -> Iterator[_Candidate]:
    for row in rows:
        lang, problem, problem_en = row["lang"], _clean(row["instruction"]), _clean(row["instruction_en"])
        answer = _clean(str(row["output"]))
        if lang not in LANGUAGES or not (problem and problem_en and answer):
            continue
        yield _Candidate(
            id=f"math/mgsm/{lang}/{row['idx']}",
            lang=lang,
            task="math",
            source="mgsm",
            item=f"mgsm:{row['idx']}",
            instruction=f"{_template(lang, 'math')}\n{problem}",
            instruction_en=f"{_english('math')}\n{problem_en}",
            output=answer,
        )


def _choice_prompt(lang: str, question: str, premise: str, first: str, second: str) -> str:
    """Premise, question, numbered alternatives, request; ``lang`` 'en' gives the English counterpart."""
    get = functools.partial(_template, lang)
    return f"{get('premise')}{premise}\n{get(question)}\n1. {first}\n2. {second}\n{get('choose')}"


def _xcopa(rows: Iterable[dict]) -> Iterator[_Candidate]:
    for row in rows:
        lang, question = row["lang"], row["question"]
        texts = [_clean(row[k]) for k in ("premise", "choice1", "choice2")]
        texts_en = [_clean(row[f"{k}_en_mt"]) for k in ("premise", "choice1", "choice2")]
        if lang not in LANGUAGES or question not in ("cause", "effect") or row["label"] not in (0, 1):
            continue
        if not all(texts + texts_en):
            continue
        key = f"{row['split']}-{row['idx']}"
        yield _Candidate(
            id=f"choice/xcopa/{lang}/{key}",
            lang=lang,
            task="choice",
            source="xcopa",
            item=f"xcopa:{key}",
            instruction=_choice_prompt(lang, question, *texts),
            instruction_en=_choice_prompt("en", question, *texts_en),
            output=texts[1 + row["label"]],
        )


def _translate(lang: str, source: str, unit: str, item: str, text: str, text_en: str) -> _Candidate:
    """English text → its human translation; the request is worded in the target language."""
    return _Candidate(
        id=f"translate/{source}/{lang}/{unit}",
        lang=lang,
        task="translate",
        source=source,
        item=item,
        instruction=f"{_template(lang, 'translate')}\n{text_en}",
        instruction_en=f"{_english('translate', lang)}\n{text_en}",
        output=text,
    )


def _ntrex(rows: Iterable[dict], min_chars: int) -> Iterator[_Candidate]:
    docs: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        if row["lang"] in LANGUAGES:
            docs[(row["lang"], row["doc_id"])][int(row["idx"])] = row
    for (lang, doc_id), sentences in sorted(docs.items()):
        item = f"ntrex:{doc_id}"
        for idx in sorted(sentences):
            row = sentences[idx]
            text, text_en = _clean(row["text"]), _clean(row["text_en"])
            if text and text_en:
                yield _translate(lang, "ntrex", str(idx), item, text, text_en)
            prev = sentences.get(idx - 1)
            if prev is None:
                continue
            prev_text, prev_en = _clean(prev["text"]), _clean(prev["text_en"])
            if min(len(prev_text), len(prev_en), len(text)) < min_chars:
                continue
            yield _Candidate(
                id=f"continue/ntrex/{lang}/{idx}",
                lang=lang,
                task="continue",
                source="ntrex",
                item=item,
                instruction=f"{_template(lang, 'continue')}\n{prev_text}",
                instruction_en=f"{_english('continue')}\n{prev_en}",
                output=text,
            )


def _tatoeba(rows: Iterable[dict]) -> Iterator[_Candidate]:
    for row in rows:
        lang, text, text_en = row["lang"], _clean(row["text"]), _clean(row["text_en"])
        if lang not in LANGUAGES or not (text and text_en):
            continue
        # Tatoeba's idx is per language (the English sides differ), so the item is the English
        # sentence itself: the same sentence never lands on both sides through two languages.
        item = "tatoeba:" + _digest(_norm(text_en))[:16]
        yield _translate(lang, "tatoeba", str(row["idx"]), item, text, text_en)


def _udhr(rows: Iterable[dict]) -> Iterator[_Candidate]:
    for row in rows:
        lang, text, text_en = row["lang"], _clean(row["text"]), _clean(row["text_en"])
        if lang in LANGUAGES and text and text_en:
            article = int(row["article"])
            yield _translate(lang, "udhr", str(article), f"udhr:{article}", text, text_en)


def load_candidates(source_dir: str | Path, config: MixConfig | None = None) -> list[_Candidate]:
    """Every record the sources allow, sorted by id; reads the five files under ``source_dir``
    (``data/parallel/`` in the repository)."""
    config = config or MixConfig()
    source_dir = Path(source_dir)
    required = {
        "mgsm": ("lang", "idx", "instruction", "instruction_en", "output"),
        "xcopa": ("lang", "split", "idx", "question", "label", "premise", "choice1", "choice2")
        + ("premise_en_mt", "choice1_en_mt", "choice2_en_mt"),
        "ntrex": ("lang", "idx", "doc_id", "text", "text_en"),
        "tatoeba": ("lang", "idx", "text", "text_en"),
        "udhr": ("lang", "article", "text", "text_en"),
    }
    rows = {name: _read_jsonl(source_path(source_dir, name), required[name]) for name in SOURCE_FILES}
    candidates = [
        *_mgsm(rows["mgsm"]),
        *_xcopa(rows["xcopa"]),
        *_ntrex(rows["ntrex"], config.min_continue_chars),
        *_tatoeba(rows["tatoeba"]),
        *_udhr(rows["udhr"]),
    ]
    candidates.sort(key=lambda c: c.id)
    duplicates = [c.id for a, c in zip(candidates, candidates[1:]) if a.id == c.id]
    if duplicates:
        raise CCError(f"mix: duplicate source rows, e.g. {duplicates[0]}")
    logger.info("mix: %d candidate records from %s", len(candidates), source_dir)
    return candidates


def assign_splits(candidates: Iterable[_Candidate], config: MixConfig) -> dict[str, str]:
    """Map each source item to 'train' or 'heldout'.

    Per source, items are ranked by a seeded hash and the first ``heldout_fraction`` (at least one)
    are held out. The rule looks only at item keys, so it is the same for every language: a held-out
    MGSM problem, XCOPA item, NTREX document, Tatoeba English sentence or UDHR article is held out
    in all languages and no part of it is in train.
    """
    items: dict[str, set[str]] = defaultdict(set)
    for cand in candidates:
        items[cand.source].add(cand.item)
    split: dict[str, str] = {}
    for source in sorted(items):
        ranked = sorted(items[source], key=lambda item: (_digest(config.seed, "split", item), item))
        n_held = max(1, round(len(ranked) * config.heldout_fraction))
        for rank, item in enumerate(ranked):
            split[item] = "heldout" if rank < n_held else "train"
    return split


def _allocate(total: int, caps: dict[str, int]) -> dict[str, int]:
    """Share ``total`` evenly over the keys, round-robin in sorted order, never above a key's cap."""
    counts = dict.fromkeys(sorted(caps), 0)
    left = total
    while left > 0:
        progressed = False
        for key in counts:
            if left > 0 and counts[key] < caps[key]:
                counts[key] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return counts


def select(candidates: Sequence[_Candidate], split_of: dict[str, str], config: MixConfig) -> list[dict]:
    """Pick ``per_language`` records per language: even over its tasks, then over each task's sources.

    Each split is filled on its own (train gets ``1 - heldout_fraction`` of the quota), so every
    language has the same number of records on each side. Within a (language, task, source) cell
    the records are ranked by a seeded hash of their id, which makes the choice independent of the
    order of the input and stable when other cells change.
    """
    cells: dict[tuple[str, str, str, str], list[_Candidate]] = defaultdict(list)
    for cand in candidates:
        cells[(split_of[cand.item], cand.lang, cand.task, cand.source)].append(cand)
    n_held = round(config.per_language * config.heldout_fraction)
    quota = {"train": config.per_language - n_held, "heldout": n_held}
    chosen: list[dict] = []
    for split in SPLITS:
        for lang in LANGUAGES:
            task_caps = {
                task: sum(len(cells.get((split, lang, task, src), ())) for src in TASK_SOURCES[task])
                for task in TASKS
            }
            task_counts = _allocate(quota[split], task_caps)
            if sum(task_counts.values()) < quota[split]:
                logger.warning("mix: %s/%s has only %d records", lang, split, sum(task_counts.values()))
            for task in TASKS:
                src_caps = {src: len(cells.get((split, lang, task, src), ())) for src in TASK_SOURCES[task]}
                for src, n in _allocate(task_counts[task], src_caps).items():
                    pool = cells.get((split, lang, task, src), [])
                    ranked = sorted(pool, key=lambda c: (_digest(config.seed, "pick", c.id), c.id))
                    chosen.extend(c.as_record(split) for c in ranked[:n])
    chosen.sort(key=lambda r: (_digest(config.seed, "order", r["id"]), r["id"]))
    return chosen


# ---------------------------------------------------------------------------------------------
# Benchmark contamination check
# ---------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?:\(\w{1,2}\)|\w{1,2}[.)]|[^\s:：]{1,20}\s?[:：])\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?])(?=[A-Z])|(?<=[。！？।۔؟])")


def _norm(text: str) -> str:
    """Compare text ignoring Unicode form, case and whitespace runs."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _benchmark_files(benchmark_dirs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for folder in benchmark_dirs:
        folder = Path(folder)
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    return files


def _read_benchmark(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def benchmark_needles(benchmark_dirs: Sequence[str | Path]) -> tuple[dict[str, str], dict[str, str]]:
    """Benchmark text that must not occur in the mix: ``(long, short)`` maps of text → origin.

    Each prompt and English prompt is cut into lines; lines found in more than half of one file's
    items are the benchmark's own template ("Please answer ...") and are skipped. A line's leading
    label ("Premise:", "(A)") is dropped; the line and each of its sentences become needles. Those
    of at least ``MIN_NEEDLE_CHARS`` must not occur anywhere in a record, shorter ones (down to
    ``MIN_LINE_CHARS``, e.g. a short MKQA question) must not equal a whole line of a record.
    Answers of at least ``MIN_NEEDLE_CHARS`` (XLSum summaries) are needles too. The result is
    cached per set of files (path, size, mtime), since a build and its checks ask more than once.
    """
    files = _benchmark_files(benchmark_dirs)
    if not files:
        raise CCError(
            f"mix: no benchmark files under {', '.join(map(str, benchmark_dirs))}; cannot check leaks"
        )
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _needles(stamp)


@functools.lru_cache(maxsize=4)
def _needles(stamp: tuple[tuple[str, int, int], ...]) -> tuple[dict[str, str], dict[str, str]]:
    files = [Path(path) for path, _, _ in stamp]
    long: dict[str, str] = {}
    short: dict[str, str] = {}
    for path in files:
        items = _read_benchmark(path)
        item_lines: list[tuple[str, list[str]]] = []
        line_freq: Counter[str] = Counter()
        for item in items:
            origin = f"{path.parent.name}/{path.name}#{item.get('id')}"
            lines: list[str] = []  # NFKC, whitespace collapsed, case kept (sentence splitting needs it)
            for field in ("prompt", "prompt_en"):
                if isinstance(item.get(field), str):
                    lines += [
                        " ".join(unicodedata.normalize("NFKC", line).split())
                        for line in item[field].split("\n")
                    ]
            lines = [line for line in lines if line]
            line_freq.update({_norm(line) for line in lines})
            answers = item.get("answer")
            for answer in answers if isinstance(answers, list) else [answers]:
                if isinstance(answer, str) and len(_norm(answer)) >= MIN_NEEDLE_CHARS:
                    long.setdefault(_norm(answer), origin)
            item_lines.append((origin, lines))
        template_at = len(items) / 2
        for origin, lines in item_lines:
            for line in lines:
                if len(items) >= 4 and line_freq[_norm(line)] > template_at:
                    continue
                body = _LABEL.sub("", line, count=1)
                for piece in dict.fromkeys(_norm(t) for t in (line, body, *_SENTENCE_END.split(body))):
                    if len(piece) >= MIN_NEEDLE_CHARS:
                        long.setdefault(piece, origin)
                    elif len(piece) >= MIN_LINE_CHARS:
                        short.setdefault(piece, origin)
    logger.info(
        "mix: %d long and %d short benchmark needles from %d files", len(long), len(short), len(files)
    )
    return long, short


def find_contamination(
    records: Iterable[dict], benchmark_dirs: Sequence[str | Path], limit: int = 10
) -> list[tuple[str, str, str]]:
    """Up to ``limit`` hits ``(record id, benchmark origin, text)`` of benchmark text inside records."""
    long, short = benchmark_needles(benchmark_dirs)
    owner: dict[str, str] = {}  # normalised field text → id of the first record holding it
    line_owner: dict[str, str] = {}
    for rec in records:
        for field in RECORD_FIELDS:
            owner.setdefault(_norm(rec[field]), rec.get("id", "?"))
            for line in rec[field].split("\n"):
                line_owner.setdefault(_norm(line), rec.get("id", "?"))
                line_owner.setdefault(_LABEL.sub("", _norm(line), count=1), rec.get("id", "?"))
    hits = [(line_owner[text], short[text], text) for text in sorted(set(line_owner) & set(short))]
    # One pass over the concatenated record texts, looking up every window of MIN_NEEDLE_CHARS
    # characters among the needles' prefixes: linear in the mix size, not in mix × needles.
    by_prefix: dict[str, list[str]] = defaultdict(list)
    for needle in long:
        by_prefix[needle[:MIN_NEEDLE_CHARS]].append(needle)
    texts = sorted(owner)
    starts = []
    pos = 0
    for text in texts:
        starts.append(pos)
        pos += len(text) + 1
    hay = "\n".join(texts)
    width = MIN_NEEDLE_CHARS
    for i in range(len(hay) - width + 1):
        bucket = by_prefix.get(hay[i : i + width])
        if bucket is None:
            continue
        for needle in bucket:
            if hay.startswith(needle, i):
                text_no = bisect.bisect_right(starts, i) - 1
                hits.append((owner[texts[text_no]], long[needle], needle))
        if len(hits) >= limit:
            break
    return hits[:limit]


def check_contamination(records: Iterable[dict], benchmark_dirs: Sequence[str | Path]) -> None:
    """Raise :class:`ContaminationError` when any benchmark text occurs inside the records."""
    hits = find_contamination(records, benchmark_dirs)
    if hits:
        shown = "; ".join(f"{rid} contains {origin}: {text[:80]!r}" for rid, origin, text in hits[:5])
        raise ContaminationError(f"mix: benchmark text found in the mix (first {len(hits)} hits): {shown}")


# ---------------------------------------------------------------------------------------------
# Build and write
# ---------------------------------------------------------------------------------------------


def build_mix(
    source_dir: str | Path, benchmark_dirs: Sequence[str | Path], config: MixConfig | None = None
) -> list[dict]:
    """All records of the mix (both splits, in file order), checked against the benchmarks."""
    config = config or MixConfig()
    candidates = load_candidates(source_dir, config)
    split_of = assign_splits(candidates, config)
    records = select(candidates, split_of, config)
    validate_mix(records)
    check_contamination(records, benchmark_dirs)
    return records


def validate_mix(records: Sequence[dict]) -> None:
    """Every record well-formed, ids unique, and no source item on both sides of the split."""
    seen: set[str] = set()
    sides: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        for field in ("id", "lang", "task", "source", "item", "split", *RECORD_FIELDS):
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise CCError(f"mix: record {rec.get('id')!r}: field '{field}' missing or empty")
        if rec["id"] in seen:
            raise CCError(f"mix: duplicate record id {rec['id']}")
        seen.add(rec["id"])
        sides[rec["item"]].add(rec["split"])
    straddling = sorted(item for item, s in sides.items() if len(s) > 1)
    if straddling:
        raise CCError(f"mix: source items on both sides of the split, e.g. {straddling[0]}")


def write_mix(records: Sequence[dict], out_dir: str | Path = MIX_DIR) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (one record a line, UTF-8, no ASCII escapes)."""
    paths = mix_files(out_dir)
    for split, path in paths.items():
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records if r["split"] == split]
        write_text(path, "".join(lines))
    return paths


def composition_markdown(records: Sequence[dict]) -> str:
    """Tables of records per language × task (per split) and per source, for the README."""
    counts: Counter[tuple[str, str, str]] = Counter((r["split"], r["lang"], r["task"]) for r in records)
    out: list[str] = []
    for split in SPLITS:
        out += [f"**{split}** ({sum(1 for r in records if r['split'] == split)} records)", ""]
        out += ["| lang | " + " | ".join(TASKS) + " | total |", "| --- |" + " ---: |" * (len(TASKS) + 1)]
        for lang in LANGUAGES:
            row = [counts[(split, lang, task)] for task in TASKS]
            out.append(f"| {lang} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
        totals = [sum(counts[(split, lang, task)] for lang in LANGUAGES) for task in TASKS]
        out += ["| **all** | " + " | ".join(str(n) for n in totals) + f" | {sum(totals)} |", ""]
    by_source: Counter[tuple[str, str, str]] = Counter((r["task"], r["source"], r["split"]) for r in records)
    out += ["| task | source | train | heldout |", "| --- | --- | ---: | ---: |"]
    for task, source in sorted({(t, s) for t, s, _ in by_source}):
        out.append(
            f"| {task} | {source} | {by_source[(task, source, 'train')]} | {by_source[(task, source, 'heldout')]} |"
        )
    return "\n".join(out) + "\n"
