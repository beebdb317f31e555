"""Pure scoring rules for the six benchmarks: generated text in, per-item metric dicts out.

The official CC-Tuning code releases no scorer, so these rules are ours; docs/evaluation.md
states each one precisely. Every scorer is a plain function of (output, gold[, lang or labels]) with no
model and no state, so the runner can score saved generations again at any time.
Metrics are fractions in [0, 1]; :func:`aggregate` averages them per benchmark and language.
"""

from __future__ import annotations

import functools
import logging
import re
import string
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cctuning.errors import CCError
from cctuning.eval.benchmarks import BENCHMARKS, Item, get_spec

logger = logging.getLogger(__name__)

NLTK_DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "nltk_data"

# ---------------------------------------------------------------------------------------------
# Multiple choice: XNLI, XStoryCloze, MMMLU
# ---------------------------------------------------------------------------------------------

# Letters of cased alphabets (Latin with accents and Vietnamese, Greek, Cyrillic) and digits: a
# label touching one of these is part of a word or number ("Apple", "A4"), not a label. Letters
# of other scripts do not count, so "答案是A" and "정답은 A입니다" still parse as A.
_WORD_CHARS = "0-9A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff\u1e00-\u1eff"
_ARTICLE_AFTER = re.compile(r"\s+[a-z\u00df-\u00ff]")


def _ascii_digits(text: str) -> str:
    """Map every Unicode decimal digit (Arabic-Indic ٢, Devanagari २, Thai ๒ ...) to ASCII."""
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() and not ch.isascii() else ch for ch in text)


@functools.cache
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    if all(label.isdigit() for label in labels):
        # not part of a longer number ("12", "2023") nor of a decimal ("2.5", "1,000")
        return re.compile(rf"(?<![0-9])(?<![0-9][.,])({alternatives})(?![0-9])(?![.,][0-9])")
    if all(label.isalpha() and label.isupper() for label in labels):
        return re.compile(rf"(?<![{_WORD_CHARS}])({alternatives})(?![{_WORD_CHARS}])")
    raise ValueError(f"option labels must be all digits or all capital letters, got {list(labels)}")


def _is_marked(text: str, start: int, end: int) -> bool:
    """True for "(A", "[A", "A)", "A]", "A." and "A:": forms that are a label, never a word."""
    return (start > 0 and text[start - 1] in "([") or (end < len(text) and text[end] in ")].:")


def parse_choice(text: str, labels: Sequence[str]) -> str | None:
    """The first option label that stands alone in ``text``, or None.

    The text is NFKC-normalised first (full-width "（２）" and "Ａ" become "(2)" and "A") and
    non-ASCII decimal digits become ASCII. A digit label counts unless it is part of a longer
    number or a decimal; a capital-letter label counts unless it touches a letter of a cased
    alphabet or a digit. Lower-case letters never count. A bare "A" followed by a lower-case word
    ("A good answer is (B)", "A resposta é C") reads as the article and is used only when no
    other label occurs in the text.
    """
    labels = tuple(labels)
    normalized = _ascii_digits(unicodedata.normalize("NFKC", text))
    article_like: str | None = None
    for match in _label_pattern(labels).finditer(normalized):
        label, start, end = match.group(1), match.start(1), match.end(1)
        if label == "A" and not _is_marked(normalized, start, end) and _ARTICLE_AFTER.match(normalized, end):
            article_like = article_like or label
            continue
        return label
    return article_like


def score_choice(output: str, answer: str, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy of the first parsed label; an output without a label is wrong and ``parsed: False``.

    ``labels`` are the benchmark's (``BenchmarkSpec.labels``, as :func:`score_item` passes them): XNLI
    "1" (entailment), "2" (neutral), "3" (contradiction); XStoryCloze "1" and "2", the two endings;
    MMMLU "A" to "D".
    """
    prediction = parse_choice(output, labels)
    return {
        "accuracy": float(prediction == answer),
        "parsed": prediction is not None,
        "prediction": prediction,
    }


def score_choice_logprobs(label_logprobs: Mapping[str, float], answer: str) -> dict[str, Any]:
    """Likelihood scoring: the label with the highest log-probability (first one on a tie) is the answer."""
    if not label_logprobs:
        raise ValueError("no label log-probabilities to compare")
    prediction = max(label_logprobs, key=lambda label: label_logprobs[label])
    return {"accuracy": float(prediction == answer), "parsed": True, "prediction": prediction}


# ---------------------------------------------------------------------------------------------
# Short answers: XQuAD and MKQA
# ---------------------------------------------------------------------------------------------

# Scripts written without spaces between words: each of their characters is one token.
CHAR_LEVEL_LANGS = frozenset({"zh", "ja", "th"})
_MIXED_TOKEN = re.compile(rf"[{_WORD_CHARS}]+|\S")

ENGLISH_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# The article lists of the official MKQA evaluation (Longpre et al., 2020, apple/ml-mkqa), with a
# word boundary on both sides (the official French and Italian patterns lack the closing one) and,
# for Arabic, the definite article "ال" removed only at the start of a word (the official pattern
# removes every occurrence, also inside words). Languages absent here have no article removal.
MKQA_ARTICLES: dict[str, re.Pattern[str]] = {
    lang: re.compile(pattern)
    for lang, pattern in {
        "en": r"\b(?:a|an|the)\b",
        "es": r"\b(?:un|una|unos|unas|el|la|los|las)\b",
        "vi": r"\b(?:của|là|cái|chiếc|những)\b",
        "de": r"\b(?:ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
        "ar": r"\bال",
        "nl": r"\b(?:de|het|een|des|der|den)\b",
        "sv": r"\b(?:en|ett)\b",
        "da": r"\b(?:en|et)\b",
        "no": r"\b(?:en|et|ei)\b",
        "fr": r"\b(?:le|la|les|du|de|des|un|une)\b",
        "pt": r"\b(?:o|a|os|as|um|uma|uns|umas)\b",
        "it": r"\b(?:il|lo|la|i|gli|le|del|dello|della|dei|degli|delle|un|uno|una)\b",
        "fi": r"\b(?:se|yks|yksi)\b",
        "hu": r"\b(?:a|az|egy)\b",
    }.items()
}


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, lang: str, articles: re.Pattern[str] | None = None) -> list[str]:
    """SQuAD-style answer tokens: NFKC, lower case, punctuation and articles removed, then split.

    Punctuation is ASCII punctuation plus every Unicode "P*" character; it is deleted, not
    replaced by a space (as in SQuAD). ``articles`` matches are replaced by a space. For zh, ja
    and th every character is a token, except that runs of digits and of Latin, Greek or
    Cyrillic letters stay whole ("1968年" → ["1968", "年"]); other languages split on whitespace.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    if articles is not None:
        text = articles.sub(" ", text)
    if lang in CHAR_LEVEL_LANGS:
        return _MIXED_TOKEN.findall(text)
    return text.split()


def token_f1(prediction: list[str], gold: list[str]) -> float:
    """Bag-of-tokens F1 (SQuAD); when either side is empty, 1.0 if both are, else 0.0."""
    if not prediction or not gold:
        return float(prediction == gold)
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: list[str], gold: list[str]) -> bool:
    """Whether the joined gold tokens are a substring of the joined output tokens.

    A match may not continue a number: gold "4" is not found in "14" or "1945", while "1968" is
    found in "1968年" and in Turkish "1968de". An empty gold is contained only in an empty output.
    """
    if not gold:
        return not prediction
    haystack, needle = " ".join(prediction), " ".join(gold)
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        left_ok = not (needle[0].isdigit() and start > 0 and haystack[start - 1].isdigit())
        right_ok = not (needle[-1].isdigit() and end < len(haystack) and haystack[end].isdigit())
        if left_ok and right_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def _qa_metrics(prediction: list[str], gold: list[str]) -> dict[str, float]:
    return {
        "exact_match": float(prediction == gold),
        "f1": token_f1(prediction, gold),
        "contains": float(contains(prediction, gold)),
    }


def score_xquad(output: str, answer: str, lang: str) -> dict[str, float]:
    """XQuAD: exact match, token F1 and containment against the one gold span.

    Normalisation as :func:`normalize_answer`, with the English articles removed for ``en`` only
    (the official XQuAD evaluation is the SQuAD v1.1 script).
    """
    articles = ENGLISH_ARTICLES if lang == "en" else None
    return _qa_metrics(normalize_answer(output, lang, articles), normalize_answer(answer, lang, articles))


# MKQA's binary answers are the English strings "yes" / "no" in every language; an output that
# opens with the target language's (or English) yes / no word answers them.
_YES_NO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": (("yes",), ("no",)),
    "ar": (("نعم",), ("لا",)),
    "de": (("ja",), ("nein",)),
    "ja": (("はい",), ("いいえ",)),
    "ko": (("네", "예"), ("아니요", "아니오", "아니")),
    "pt": (("sim",), ("não",)),
    "ru": (("да",), ("нет",)),
    "tr": (("evet",), ("hayır",)),
    "vi": (("có", "vâng"), ("không",)),
    "zh": (("是", "对", "能", "可以", "会", "有"), ("不", "否", "没")),
}


def _polarity(tokens: list[str], lang: str) -> str | None:
    """Return "yes" / "no" when the normalised output opens with a yes / no word, else None."""
    if not tokens:
        return None
    native_yes, native_no = _YES_NO.get(lang, ((), ()))
    if tokens[0] in native_no + ("no",):
        return "no"
    if tokens[0] in native_yes + ("yes",):
        return "yes"
    if lang in CHAR_LEVEL_LANGS:  # words of several characters: はい, いいえ, 可以, 没有 ...
        opening = "".join(tokens[:4])
        if any(opening.startswith(word) for word in native_no):  # first: "不是" must not read as "是"
            return "no"
        if any(opening.startswith(word) for word in native_yes):
            return "yes"
    return None


def score_mkqa(output: str, answers: Sequence[str], lang: str) -> dict[str, Any]:
    """MKQA: the best exact match, token F1 and containment over the accepted aliases.

    Normalisation as :func:`normalize_answer` with the MKQA article list of ``lang``. Aliases that
    normalise to nothing are dropped. With no alias left (an empty list, or ``[""]``, MKQA's "No
    Answer"), the item is unanswerable: every metric is 1.0 if the output is empty after
    normalisation and 0.0 otherwise, and ``answerable`` is False. A "yes" / "no" alias is matched
    only by an output that opens with that language's (or the English) yes / no word ("Sim, ...",
    "不是"): all three metrics are 1.0 then and 0.0 otherwise.
    """
    articles = MKQA_ARTICLES.get(lang)
    prediction = normalize_answer(output, lang, articles)
    golds = [tokens for tokens in (normalize_answer(alias, lang, articles) for alias in answers) if tokens]
    if not golds:
        empty = float(not prediction)
        return {"exact_match": empty, "f1": empty, "contains": empty, "answerable": False}
    polarity = _polarity(prediction, lang)
    best = {"exact_match": 0.0, "f1": 0.0, "contains": 0.0}
    for gold in golds:
        if gold in (["yes"], ["no"]):
            # by polarity only: as substrings, "no" and "yes" hide in "know" and "yesterday"
            scores = dict.fromkeys(best, float(polarity == gold[0]))
        else:
            scores = _qa_metrics(prediction, gold)
        best = {name: max(best[name], scores[name]) for name in best}
    return {**best, "answerable": True}


# ---------------------------------------------------------------------------------------------
# Summaries: XL-Sum
# ---------------------------------------------------------------------------------------------

# Language code -> the language name of the multilingual-rouge package (the XL-Sum authors'
# ROUGE, Hasan et al., 2021). A name turns on that language's stemmer; None means the package's
# language-independent tokenizer without stemming (it has no stemmer for these languages).
ROUGE_LANGUAGES: dict[str, str | None] = {
    "en": "english",
    "ar": "arabic",
    "fr": "french",
    "hi": "hindi",
    "ru": "russian",
    "tr": "turkish",
    "id": None,
    "sw": None,
    "ur": None,
    "vi": None,
}


def _use_vendored_nltk_data() -> None:
    """Put the vendored NLTK stopwords first on NLTK's path: the Snowball stemmers need them and
    nothing may be downloaded at run time; first, so every machine stems with the same lists."""
    import nltk  # deferred: nltk takes ~7 s to import (measured on 2 busy cores), for XL-Sum only

    path = str(NLTK_DATA_DIR)
    if path not in nltk.data.path:
        nltk.data.path.insert(0, path)


@functools.cache
def _rouge_scorer(lang: str):
    if lang not in ROUGE_LANGUAGES:
        raise CCError(
            f"no ROUGE-L set-up for language '{lang}'; supported: {', '.join(sorted(ROUGE_LANGUAGES))}"
        )
    _use_vendored_nltk_data()
    from multilingual_rouge import rouge_scorer  # deferred: imports nltk (see _use_vendored_nltk_data)

    name = ROUGE_LANGUAGES[lang]
    logger.debug("ROUGE-L for %s: language %s, stemming %s", lang, name, name is not None)
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=name is not None, lang=name)


def score_xlsum(output: str, reference: str, lang: str) -> dict[str, float]:
    """XL-Sum: ROUGE-L F-measure with the multilingual tokenizer and stemmer of ``lang``."""
    return {"rougeL": float(_rouge_scorer(lang).score(reference, output)["rougeL"].fmeasure)}


# ---------------------------------------------------------------------------------------------
# Dispatch and aggregation
# ---------------------------------------------------------------------------------------------


def score_item(item: Item, output: str) -> dict[str, Any]:
    """Score one generated ``output`` for ``item`` with its benchmark's rule."""
    spec = get_spec(item.benchmark)
    if spec.answer_kind == "choice":
        return score_choice(output, str(item.answer), spec.labels)
    if spec.name == "XQuAD":
        return score_xquad(output, str(item.answer), item.lang)
    if spec.name == "MKQA":
        return score_mkqa(output, list(item.answer), item.lang)
    return score_xlsum(output, str(item.answer), item.lang)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _macro(
    per_language: Mapping[str, Mapping[str, float]], metrics: Sequence[str], langs: Sequence[str]
) -> dict[str, float] | None:
    """Mean over ``langs`` of each language's mean: every language weighs the same."""
    if not langs:
        return None
    return {metric: _mean(per_language[lang][metric] for lang in langs) for metric in metrics}


def aggregate(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per benchmark and language, the mean of each metric; then macro averages over languages.

    Each result is a mapping with ``benchmark``, ``lang`` and ``metrics`` (a scorer's dict).
    Returns ``{benchmark: {"per_language": {lang: {metric: mean, "n": count[, "unparsed": k]}},
    "average": {...}, "average_without_en": {...} or None}}``; the averages weight every language
    equally, and ``unparsed`` (multiple choice only) counts outputs with no label.
    """
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        grouped[get_spec(result["benchmark"]).name][result["lang"]].append(result["metrics"])
    summary: dict[str, dict[str, Any]] = {}
    for name in sorted(grouped):
        spec = BENCHMARKS[name]
        per_language: dict[str, dict[str, float]] = {}
        for lang in sorted(grouped[name]):
            items = grouped[name][lang]
            missing = [metric for metric in spec.metrics if any(metric not in m for m in items)]
            if missing:
                raise ValueError(f"{name}/{lang}: some results lack the metrics {missing}")
            row: dict[str, float] = {metric: _mean(m[metric] for m in items) for metric in spec.metrics}
            row["n"] = len(items)
            if spec.answer_kind == "choice":
                row["unparsed"] = sum(1 for m in items if not m.get("parsed", True))
            per_language[lang] = row
        summary[name] = {
            "per_language": per_language,
            "average": _macro(per_language, spec.metrics, list(per_language)),
            "average_without_en": _macro(
                per_language, spec.metrics, [lang for lang in per_language if lang != "en"]
            ),
        }
    return summary
