"""Scoring rules against hand-computed answers, in Latin, Arabic, Devanagari, CJK and Thai script."""

import warnings

import nltk
import pytest

from cctuning.errors import CCError
from cctuning.eval.benchmarks import BENCHMARKS, get_spec, load_benchmark
from cctuning.eval.scoring import (
    ENGLISH_ARTICLES,
    MKQA_ARTICLES,
    NLTK_DATA_DIR,
    aggregate,
    contains,
    normalize_answer,
    parse_choice,
    score_choice,
    score_choice_logprobs,
    score_item,
    score_mkqa,
    score_xlsum,
    score_xquad,
    token_f1,
)

# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------

XNLI_LABELS = ("1", "2", "3")
MMMLU_LABELS = ("A", "B", "C", "D")
# the labels score_item passes to score_choice for each multiple-choice benchmark
XNLI, XSTORYCLOZE, MMMLU = (BENCHMARKS[name].labels for name in ("XNLI", "XStoryCloze", "MMMLU"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", "2"),
        ("(2)", "2"),
        ("Answer: 2", "2"),
        ("2. Neutral", "2"),
        ("(2) Neutral", "2"),
        ("I think the relationship is neutral, so my answer is 2.", "2"),
        ("(1) Entail (2) Neutral", "1"),  # the first label wins
        ("12", None),
        ("2023 was a good year", None),
        ("In 2023 the answer became 3", "3"),
        ("About 2.5 or 1,000 times; answer 1", "1"),
        ("4", None),  # not one of the labels
        ("Neutral", None),  # option text alone does not count
        ("", None),
        ("（２）中立", "2"),  # full-width parentheses and digit (NFKC)
        ("答案是３。", "3"),
        ("②", "2"),
        ("答案是2", "2"),  # CJK characters next to a digit do not hide it
        ("الإجابة هي ٢", "2"),  # Arabic-Indic digit
        ("उत्तर: (३)", "3"),  # Devanagari digit
        ("คำตอบคือ ๑", "1"),  # Thai digit
        ("١٢", None),  # Arabic-Indic twelve
    ],
)
def test_parse_digit_labels(text, expected):
    assert parse_choice(text, XNLI_LABELS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),
        ("(B)", "B"),
        ("B)", "B"),
        ("C.", "C"),
        ("Answer: D", "D"),
        ("The answer is A", "A"),
        ("**D**", "D"),
        ("Apple", None),
        ("ABCD", None),
        ("Vitamin B12", None),
        ("a", None),  # lower case never counts
        ("E", None),
        ("A good answer would be (B).", "B"),  # a bare A before a lower-case word is the article
        ("A resposta é C", "C"),
        ("A to be palpable intraorally.", "A"),  # ... but it is used when no other label follows
        ("A. to be palpable", "A"),
        ("Ａ", "A"),  # full-width
        ("（Ｄ）", "D"),
        ("答案是C", "C"),
        ("정답은 B입니다", "B"),
        ("الإجابة هي (C)", "C"),
        ("उत्तर B है", "B"),
        ("Éa B", "B"),
    ],
)
def test_parse_letter_labels(text, expected):
    assert parse_choice(text, MMMLU_LABELS) == expected


def test_choice_scores():
    assert score_choice("(2) Neutral", "2", XNLI) == {"accuracy": 1.0, "parsed": True, "prediction": "2"}
    assert score_choice("(3) Contradict", "2", XNLI) == {"accuracy": 0.0, "parsed": True, "prediction": "3"}
    assert score_choice("The ending is 3", "1", XSTORYCLOZE) == {
        "accuracy": 0.0,
        "parsed": False,
        "prediction": None,
    }
    assert score_choice("Option 2.", "2", XSTORYCLOZE)["accuracy"] == 1.0
    assert score_choice("I don't know", "A", MMMLU) == {"accuracy": 0.0, "parsed": False, "prediction": None}
    assert score_choice("答案是（Ｃ）", "C", MMMLU)["accuracy"] == 1.0


def test_option_labels_and_likelihood_scoring():
    # the labels the runner compares (the spec's); a benchmark without labels is never likelihood-scored
    assert get_spec("xnli").labels == ("1", "2", "3")
    assert get_spec("XStoryCloze").labels == ("1", "2")
    assert get_spec("MMMLU").labels == ("A", "B", "C", "D")
    assert get_spec("XQuAD").answer_kind != "choice" and get_spec("XQuAD").labels == ()
    logprobs = {"A": -3.0, "B": -0.5, "C": -2.0, "D": -9.0}
    assert score_choice_logprobs(logprobs, "B") == {"accuracy": 1.0, "parsed": True, "prediction": "B"}
    assert score_choice_logprobs(logprobs, "C")["accuracy"] == 0.0
    assert score_choice_logprobs({"1": -1.0, "2": -1.0}, "1")["prediction"] == "1"  # tie: first label


# --------------------------------------------------------------------------------------------
# XQuAD
# --------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The Pittsburgh Steelers!", "en", ENGLISH_ARTICLES) == ["pittsburgh", "steelers"]
    assert normalize_answer("«Der Hund» — ¿qué?", "de") == ["der", "hund", "qué"]
    assert normalize_answer("Mary-Louise Parker", "en") == ["marylouise", "parker"]
    assert normalize_answer("匹兹堡钢人队，1968年 xbox 360", "zh") == [
        "匹", "兹", "堡", "钢", "人", "队", "1968", "年", "xbox", "360"
    ]  # fmt: skip
    assert normalize_answer("สี่", "th") == ["ส", "ี", "่"]
    assert normalize_answer("ＸＢＯＸ　３６０", "en") == ["xbox", "360"]  # full-width letters and space
    assert normalize_answer("الولايات المتحدة، بالولايات", "ar", MKQA_ARTICLES["ar"]) == [
        "ولايات", "متحدة", "بالولايات"
    ]  # fmt: skip


def test_token_f1_and_contains():
    assert token_f1(["a", "b", "c"], ["b", "c", "d", "e"]) == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert token_f1([], []) == 1.0 and token_f1([], ["x"]) == 0.0 and token_f1(["x"], []) == 0.0
    assert contains(["in", "1968"], ["1968"]) and not contains(["in", "1945"], ["4"])
    assert not contains(["14"], ["4"]) and contains(["4", "times"], ["4"])
    assert contains(["1968de"], ["1968"])  # a Turkish suffix after a number is no digit
    assert contains(["fourteen"], ["four"])  # plain substring for words, documented
    assert contains([], []) and not contains(["x"], [])


def test_xquad_english():
    # "the" is removed: prediction [answer, is, four] against [four]: P = 1/3, R = 1, F1 = 0.5
    assert score_xquad("The answer is four.", "four", "en") == {
        "exact_match": 0.0,
        "f1": 0.5,
        "contains": 1.0,
    }
    assert score_xquad("The Pittsburgh Steelers.", "Pittsburgh Steelers", "en")["exact_match"] == 1.0
    assert score_xquad("", "four", "en") == {"exact_match": 0.0, "f1": 0.0, "contains": 0.0}


def test_xquad_articles_only_for_english():
    # [der, hund] against [hund]: P = 1/2, R = 1, F1 = 2/3
    assert score_xquad("der Hund", "Hund", "de") == pytest.approx(
        {"exact_match": 0.0, "f1": 2 / 3, "contains": 1.0}
    )


def test_xquad_chinese_character_f1_by_hand():
    # gold 新英格兰爱国者队 = 8 characters; output 是新英格兰队 = 6; common 新英格兰队 = 5
    # P = 5/6, R = 5/8, F1 = 2PR / (P + R) = 5/7
    scores = score_xquad("是新英格兰队", "新英格兰爱国者队", "zh")
    assert scores == pytest.approx({"exact_match": 0.0, "f1": 5 / 7, "contains": 0.0})
    assert score_xquad("新英格兰爱国者队。", "新英格兰爱国者队", "zh")["exact_match"] == 1.0
    assert score_xquad("他们是新英格兰爱国者队", "新英格兰爱国者队", "zh")["contains"] == 1.0


def test_xquad_thai_characters_by_hand():
    # gold สี่ = 3 code points; output สี่ครั้ง = 8; common 3: P = 3/8, R = 1, F1 = 6/11
    assert score_xquad("สี่ครั้ง", "สี่", "th") == pytest.approx(
        {"exact_match": 0.0, "f1": 6 / 11, "contains": 1.0}
    )


def test_xquad_arabic_and_hindi():
    assert score_xquad("أربعة.", "أربعة", "ar")["exact_match"] == 1.0
    # Arabic comma removed: [أربعة, تقريبا] against [أربعة]: F1 = 2/3
    assert score_xquad("أربعة، تقريبا", "أربعة", "ar") == pytest.approx(
        {"exact_match": 0.0, "f1": 2 / 3, "contains": 1.0}
    )
    # the danda is punctuation: [चार, बार] against [चार]
    assert score_xquad("चार बार।", "चार", "hi") == pytest.approx(
        {"exact_match": 0.0, "f1": 2 / 3, "contains": 1.0}
    )
    assert score_xquad("पिट्सबर्ग स्टीलर्स", "पिट्सबर्ग स्टीलर्स", "hi")["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------
# MKQA
# --------------------------------------------------------------------------------------------

ACTORS = ["Mary-Louise Parker", "Morgan Freeman", "Helen Mirren"]


def test_mkqa_best_over_aliases():
    assert score_mkqa("Morgan Freeman", ACTORS, "en") == {
        "exact_match": 1.0, "f1": 1.0, "contains": 1.0, "answerable": True
    }  # fmt: skip
    # [helen, mirren, and, bruce, willis] against [helen, mirren]: P = 2/5, R = 1, F1 = 4/7
    scores = score_mkqa("Helen Mirren and Bruce Willis", ACTORS, "en")
    assert scores == pytest.approx({"exact_match": 0.0, "f1": 4 / 7, "contains": 1.0, "answerable": True})
    # [mary, louise, parker] against [marylouise, parker]: P = 1/3, R = 1/2, F1 = 0.4
    assert score_mkqa("Mary Louise Parker", ACTORS, "en")["f1"] == pytest.approx(0.4)
    assert score_mkqa("Bruce Willis", ACTORS, "en")["f1"] == 0.0


@pytest.mark.parametrize(
    ("output", "answers", "lang", "exact"),
    [
        ("Dixie Cups", ["The Dixie Cups"], "en", 1.0),
        ("Pate", ["Der Pate"], "de", 1.0),
        ("rei leão", ["O Rei Leão"], "pt", 1.0),
        ("ولايات متحدة", ["الولايات المتحدة"], "ar", 1.0),
        ("Die Dixie Cups", ["The Dixie Cups"], "de", 0.0),  # German articles, English "the" stays
        ("メアリー・ルイーズ・パーカー", ["メアリー＝ルイーズ・パーカー"], "ja", 1.0),
        ("모건 프리먼", ["모건 프리먼"], "ko", 1.0),
        ("Морган Фримен.", ["Морган Фримен"], "ru", 1.0),
    ],
)
def test_mkqa_language_normalisation(output, answers, lang, exact):
    assert score_mkqa(output, answers, lang)["exact_match"] == exact


def test_mkqa_character_level_with_numbers():
    # [1968] against [1968, 年]: P = 1, R = 1/2, F1 = 2/3
    assert score_mkqa("1968", ["1968年"], "zh") == pytest.approx(
        {"exact_match": 0.0, "f1": 2 / 3, "contains": 0.0, "answerable": True}
    )
    assert score_mkqa("1968年。", ["1968"], "ja")["contains"] == 1.0
    assert score_mkqa("1945年", ["4"], "zh")["contains"] == 0.0
    assert score_mkqa("It was in 14 BC", ["4"], "en")["contains"] == 0.0


@pytest.mark.parametrize(
    ("output", "answers", "lang", "expected"),
    [
        ("Sim, funciona.", ["yes"], "pt", 1.0),
        ("Não.", ["yes"], "pt", 0.0),
        ("是的，可以。", ["yes"], "zh", 1.0),
        ("不是", ["yes"], "zh", 0.0),
        ("不能", ["no"], "zh", 1.0),
        ("はい、動きます。", ["yes"], "ja", 1.0),
        ("아니요", ["no"], "ko", 1.0),
        ("Evet", ["yes"], "tr", 1.0),
        ("نعم", ["yes"], "ar", 1.0),
        ("Yes, it does.", ["yes"], "de", 1.0),  # English is accepted in every language
        ("No, 没有。", ["no"], "zh", 1.0),
        ("nothing", ["no"], "zh", 0.0),  # a Latin run is one token, not the letters n, o
        ("yesterday", ["yes"], "en", 0.0),
        ("I know", ["no"], "en", 0.0),  # "no" inside "know" is no answer
        ("The answer is yes", ["yes"], "en", 0.0),  # only the opening word counts
        ("Yes", ["The Cloverfield Paradox", "yes"], "en", 1.0),
        ("The Cloverfield Paradox.", ["The Cloverfield Paradox", "yes"], "en", 1.0),
    ],
)
def test_mkqa_yes_no(output, answers, lang, expected):
    scores = score_mkqa(output, answers, lang)
    assert scores["exact_match"] == scores["contains"] == expected


def test_mkqa_unanswerable_and_empty():
    assert score_mkqa("", [], "en") == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0, "answerable": False}
    assert score_mkqa("Paris", [""], "en") == {
        "exact_match": 0.0,
        "f1": 0.0,
        "contains": 0.0,
        "answerable": False,
    }
    assert score_mkqa("...", ["", "  "], "en")["exact_match"] == 1.0  # nothing left after normalisation
    assert score_mkqa("", ["Paris"], "fr") == {
        "exact_match": 0.0,
        "f1": 0.0,
        "contains": 0.0,
        "answerable": True,
    }
    assert score_mkqa("Paris", ["", "Paris"], "fr")["exact_match"] == 1.0  # empty aliases are dropped


# --------------------------------------------------------------------------------------------
# XL-Sum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("राहुल गांधी ने रायबरेली से चुनाव जीता।", "hi"),
        ("ذهب الولد إلى المدرسة صباحا.", "ar"),
        ("فرانسیسی حکام نے وضاحت کی ہے", "ur"),
        ("Супербыстрый мобильный интернет пятого поколения", "ru"),
    ],
)
def test_xlsum_identical_non_latin_text_scores_one(text, lang):
    assert score_xlsum(text, text, lang) == {"rougeL": 1.0}


def test_xlsum_partial_overlap_by_hand():
    # Hindi: 5 tokens each, LCS राहुल गांधी चुनाव = 3: P = R = 3/5
    assert score_xlsum("राहुल गांधी चुनाव हार गए", "राहुल गांधी ने चुनाव जीता", "hi")["rougeL"] == pytest.approx(0.6)
    # Arabic: 4 tokens each, LCS 3
    assert score_xlsum("ذهب الولد إلى البيت", "ذهب الولد إلى المدرسة", "ar")["rougeL"] == pytest.approx(0.75)
    # English with stemming: [the, cat, were, run] against [the, cat, run]: P = 1, R = 3/4, F = 6/7
    assert score_xlsum("the cat runs", "The cats were running", "en")["rougeL"] == pytest.approx(6 / 7)
    # Turkish stemmer: kitaplar -> kitap
    assert score_xlsum("kitap", "kitaplar", "tr")["rougeL"] == 1.0


def test_xlsum_every_language_offline_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lang in BENCHMARKS["XLSum"].languages:
            item = load_benchmark("XLSum", lang, limit=1)[0]
            assert score_xlsum(item.answer, item.answer, lang)["rougeL"] == pytest.approx(1.0)
            first_half = " ".join(item.answer.split()[: len(item.answer.split()) // 2])
            assert 0.3 < score_xlsum(first_half, item.answer, lang)["rougeL"] < 0.9
            assert score_xlsum("", item.answer, lang) == {"rougeL": 0.0}


def test_xlsum_uses_the_vendored_stopwords():
    score_xlsum("Le chat mange", "Le chat mange", "fr")
    assert nltk.data.path[0] == str(NLTK_DATA_DIR)
    pointer = nltk.data.find("corpora/stopwords.zip")
    assert pointer.zipfile.filename == str(NLTK_DATA_DIR / "corpora" / "stopwords.zip")


def test_xlsum_unknown_language():
    with pytest.raises(CCError, match="no ROUGE-L set-up for language 'ja'"):
        score_xlsum("x", "x", "ja")


# --------------------------------------------------------------------------------------------
# dispatch and aggregation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_vendored_gold_scores_perfectly_against_itself(name):
    spec = BENCHMARKS[name]
    for lang in spec.languages:
        for item in load_benchmark(name, lang):
            output = item.answer[0] if isinstance(item.answer, tuple) else item.answer
            scores = score_item(item, output)
            assert all(scores[metric] == pytest.approx(1.0) for metric in spec.metrics), (lang, item.id)


def test_score_item_dispatches():
    item = load_benchmark("XNLI", "zh", limit=1)[0]
    assert score_item(item, "（" + item.answer + "）")["accuracy"] == 1.0
    wrong = "1" if item.answer != "1" else "3"
    assert score_item(item, wrong) == {"accuracy": 0.0, "parsed": True, "prediction": wrong}


def result(benchmark, lang, metrics):
    return {"benchmark": benchmark, "lang": lang, "metrics": metrics}


def test_aggregate_by_hand():
    results = [
        result("XNLI", "en", score_choice("(2)", "2", XNLI)),
        result("XNLI", "en", score_choice("no idea", "2", XNLI)),
        result("xnli", "ar", score_choice("1", "1", XNLI)),
        result("XNLI", "sw", score_choice("3", "1", XNLI)),
        result("XQuAD", "en", score_xquad("The answer is four.", "four", "en")),
        result("XQuAD", "en", score_xquad("four", "four", "en")),
    ]
    summary = aggregate(results)
    assert set(summary) == {"XNLI", "XQuAD"}
    xnli = summary["XNLI"]
    assert xnli["per_language"] == {
        "ar": {"accuracy": 1.0, "n": 1, "unparsed": 0},
        "en": {"accuracy": 0.5, "n": 2, "unparsed": 1},
        "sw": {"accuracy": 0.0, "n": 1, "unparsed": 0},
    }
    assert xnli["average"] == {"accuracy": pytest.approx(0.5)}  # (1 + 0.5 + 0) / 3
    assert xnli["average_without_en"] == {"accuracy": pytest.approx(0.5)}  # (1 + 0) / 2
    xquad = summary["XQuAD"]
    assert xquad["per_language"]["en"] == {"exact_match": 0.5, "f1": 0.75, "contains": 1.0, "n": 2}
    assert xquad["average"] == {"exact_match": 0.5, "f1": 0.75, "contains": 1.0}
    assert xquad["average_without_en"] is None


def test_aggregate_rejects_missing_metrics():
    with pytest.raises(ValueError, match="lack the metrics"):
        aggregate([result("MKQA", "en", {"exact_match": 1.0})])
    assert aggregate([]) == {}
