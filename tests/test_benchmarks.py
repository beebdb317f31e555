"""The vendored benchmark files load, line up across languages, and bad files are reported precisely."""

import json

import pytest

from cctuning.errors import CCError, DataError
from cctuning.eval.benchmarks import (
    BENCHMARKS,
    RESOURCE_DIR,
    Item,
    available_languages,
    load_benchmark,
    resolve_name,
)

# 20% of the official CC-Tuning prompt files (1000, 1511, 1000, 1190, 1000 and 100 items)
EXPECTED_COUNTS = {"XNLI": 200, "XStoryCloze": 302, "MMMLU": 200, "XQuAD": 238, "MKQA": 200, "XLSum": 20}
ALL_FILES = [(name, lang) for name, spec in BENCHMARKS.items() for lang in spec.languages]


def test_every_benchmark_has_its_ten_languages():
    assert len(ALL_FILES) == 60
    all_langs = {lang for _, lang in ALL_FILES}
    assert len(all_langs) == 22
    for name, spec in BENCHMARKS.items():
        assert available_languages(name) == sorted(spec.languages)
        assert len(spec.languages) == 10 and "en" in spec.languages


@pytest.mark.parametrize(("name", "lang"), ALL_FILES)
def test_every_vendored_file_loads(name, lang):
    spec = BENCHMARKS[name]
    items = load_benchmark(name, lang)
    assert len(items) == EXPECTED_COUNTS[name]
    assert len({item.id for item in items}) == len(items)
    for item in items:
        assert isinstance(item, Item) and item.lang == lang and item.benchmark == name
        assert item.prompt.strip() and item.prompt_en.strip()
        if spec.answer_kind == "choice":
            assert item.answer in spec.labels
        elif spec.answer_kind == "aliases":
            assert isinstance(item.answer, tuple) and item.answer and all(item.answer)
        else:
            assert isinstance(item.answer, str) and item.answer.strip()


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_ids_are_parallel_across_languages(name):
    ids = {lang: [item.id for item in load_benchmark(name, lang)] for lang in BENCHMARKS[name].languages}
    assert all(lang_ids == ids["en"] for lang_ids in ids.values())


def test_english_prompt_is_the_english_item():
    en = load_benchmark("XNLI", "en", limit=3)
    sw = load_benchmark("XNLI", "sw", limit=3)
    assert [item.prompt for item in en] == [item.prompt_en for item in en]
    assert [item.prompt_en for item in sw] == [item.prompt for item in en]
    assert [item.answer for item in sw] == [item.answer for item in en]


def test_limit_takes_the_first_items_in_file_order():
    full = load_benchmark("MKQA", "ja")
    assert load_benchmark("MKQA", "ja", limit=5) == full[:5]
    assert [i.id for i in load_benchmark("MKQA", "zh", limit=5)] == [i.id for i in full[:5]]
    assert load_benchmark("MKQA", "ja", limit=0) == []
    assert load_benchmark("MKQA", "ja", limit=10_000) == full
    with pytest.raises(CCError, match="limit"):
        load_benchmark("MKQA", "ja", limit=-1)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("xnli", "XNLI"),
        ("XStoryCloze", "XStoryCloze"),
        ("xstorycloze", "XStoryCloze"),
        ("mmmlu", "MMMLU"),
        ("XQUAD", "XQuAD"),
        ("Mkqa", "MKQA"),
        ("XL-Sum", "XLSum"),
        ("xl_sum", "XLSum"),
        ("xlsum", "XLSum"),
    ],
)
def test_benchmark_names_are_case_insensitive(given, canonical):
    assert resolve_name(given) == canonical
    assert load_benchmark(given, "en", limit=1)[0].benchmark == canonical


def test_unknown_benchmark_and_language():
    with pytest.raises(CCError, match="unknown benchmark 'xcopa'"):
        load_benchmark("xcopa", "en")
    with pytest.raises(DataError) as info:
        load_benchmark("XNLI", "fr")
    assert info.value.path.endswith("XNLI/fr.jsonl") and "ar, el, en" in str(info.value)


def test_default_data_dir_is_inside_the_package():
    assert RESOURCE_DIR.parts[-3:] == ("cctuning", "resources", "benchmarks")
    assert (RESOURCE_DIR / "README.md").is_file()


GOOD = {"id": 1, "prompt": "Premise: ...\n(1) Entail", "answer": "2", "prompt_en": "Premise: ..."}


def write_bench(root, name, lang, lines):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lang}.jsonl"
    text = "\n".join(
        line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def test_custom_data_dir(tmp_path):
    write_bench(tmp_path, "XNLI", "xx", [GOOD, {**GOOD, "id": 2, "answer": "3"}])
    items = load_benchmark("xnli", "xx", data_dir=str(tmp_path))
    assert [(i.id, i.answer, i.lang) for i in items] == [(1, "2", "xx"), (2, "3", "xx")]
    assert available_languages("XNLI", data_dir=tmp_path) == ["xx"]
    assert available_languages("MKQA", data_dir=tmp_path) == []


def error_for(tmp_path, lines, name="XNLI") -> DataError:
    path = write_bench(tmp_path, name, "xx", lines)
    with pytest.raises(DataError) as info:
        load_benchmark(name, "xx", data_dir=tmp_path)
    assert info.value.path == str(path)
    return info.value


def test_malformed_json_names_file_and_line(tmp_path):
    err = error_for(tmp_path, [GOOD, '{"id": 2, "prompt": "x", "answer": "1", "prompt_en": "x"', GOOD])
    assert err.line == 2 and err.field is None
    assert str(err).startswith(f"{err.path}:2: malformed JSON")


def test_missing_field_names_file_line_and_field(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "prompt_en"}
    err = error_for(tmp_path, [GOOD, "", {**missing, "id": 2}])
    assert (err.line, err.field) == (3, "prompt_en")  # the blank line 2 is skipped but counted
    assert str(err) == f"{err.path}:3: field 'prompt_en': missing"


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ({**GOOD, "answer": "4"}, "answer", "not one of the labels"),
        ({**GOOD, "answer": 2}, "answer", "must be a string"),
        ({**GOOD, "prompt": "  "}, "prompt", "empty"),
        ({**GOOD, "prompt_en": None}, "prompt_en", "must be a string"),
        ({**GOOD, "id": True}, "id", "integer or a string"),
        ({**GOOD, "id": 1}, "id", "duplicate id 1"),
        ([1, 2], None, "must be a JSON object"),
    ],
)
def test_invalid_values_are_reported(tmp_path, bad, field, message):
    err = error_for(tmp_path, [GOOD, bad])
    assert (err.line, err.field) == (2, field)
    assert message in str(err)


def test_mkqa_answer_must_be_a_list_of_strings(tmp_path):
    good = {**GOOD, "answer": ["Paris", "Paris, France"]}
    err = error_for(tmp_path, [good, {**good, "id": 2, "answer": "Paris"}], name="MKQA")
    assert (err.line, err.field) == (2, "answer") and "list of strings" in str(err)
    write_bench(tmp_path, "MKQA", "yy", [good])
    assert load_benchmark("MKQA", "yy", data_dir=tmp_path)[0].answer == ("Paris", "Paris, France")


def test_invalid_utf8_and_empty_file(tmp_path):
    path = write_bench(tmp_path, "XNLI", "xx", [GOOD])
    path.write_bytes(path.read_bytes() + b'{"id": 2, "prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: invalid UTF-8"):
        load_benchmark("XNLI", "xx", data_dir=tmp_path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no items"):
        load_benchmark("XNLI", "xx", data_dir=tmp_path)


def test_line_separator_characters_inside_strings_do_not_split_lines(tmp_path):
    write_bench(tmp_path, "XNLI", "xx", [{**GOOD, "prompt": "a\u2028b\u0085c"}, {**GOOD, "id": 2}])
    items = load_benchmark("XNLI", "xx", data_dir=tmp_path)
    assert [i.id for i in items] == [1, 2] and items[0].prompt == "a\u2028b\u0085c"
