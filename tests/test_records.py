import json

import pytest

from cctuning.data.records import LoadReport, load_records
from cctuning.errors import DataError
from tests.conftest import make_records, write_jsonl


def test_jsonl_and_json_array_give_same_records_with_lines(tmp_path):
    rows = make_records(3)
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    arr = tmp_path / "a.json"
    arr.write_text(
        "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8"
    )
    a, b = load_records(jl), load_records(arr)
    assert [r.instruction for r in a] == [r["instruction"] for r in rows] == [r.instruction for r in b]
    assert [r.line for r in a] == [1, 2, 3]
    assert [r.line for r in b] == [2, 3, 4]
    assert a[0].lang == "sw" and a[0].instruction_en == rows[0]["instruction_en"]


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    rows = make_records(2)
    text = "\ufeff" + "\r\n".join(json.dumps(r) for r in rows) + "\r\n\r\n"
    path = tmp_path / "bom.jsonl"
    path.write_bytes(text.encode("utf-8"))
    recs = load_records(path)
    assert len(recs) == 2 and recs[1].line == 2


BAD = [
    ('{"instruction": "a", "output": "b", "instruction_en": "c"', 2, None, "malformed JSON"),
    ('{"output": "b", "instruction_en": "c"}', 2, "instruction", "missing"),
    ('{"instruction": "  ", "output": "b", "instruction_en": "c"}', 2, "instruction", "empty"),
    ('{"instruction": "a", "output": 5, "instruction_en": "c"}', 2, "output", "must be a string"),
    ('{"instruction": "a", "output": "b"}', 2, "instruction_en", "missing"),
    ('{"instruction": "a", "output": "b", "instruction_en": "c", "lang": 3}', 2, "lang", "must be a string"),
    ('["a", "b"]', 2, None, "JSON object"),
    (
        '{"instruction": "a", "instruction": "x", "output": "b", "instruction_en": "c"}',
        2,
        "instruction",
        "duplicate",
    ),
]


@pytest.mark.parametrize("line,lineno,field,msg", BAD)
def test_bad_record_names_file_line_and_field(tmp_path, line, lineno, field, msg):
    path = write_jsonl(tmp_path / "bad.jsonl", [make_records(1)[0], line, make_records(1)[0]])
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert (err.line, err.field) == (lineno, field)
    assert msg in str(err) and str(path) in str(err) and "\n" not in str(err)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    good = json.dumps(make_records(1)[0]).encode()
    path.write_bytes(good + b"\n" + b'{"instruction": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: invalid UTF-8"):
        load_records(path)


def test_sft_does_not_need_english(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    assert load_records(path, require_english=False)[0].instruction_en is None
    with pytest.raises(DataError, match="instruction_en"):
        load_records(path, require_english=True)


def test_skip_invalid_counts_every_skipped_record(tmp_path):
    rows = make_records(3)
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [rows[0], '{"instruction": 1}', rows[1], '{"output": "x"}', rows[2]]
    )
    report = LoadReport()
    recs = load_records(path, skip_invalid=True, report=report)
    assert [r.line for r in recs] == [1, 3, 5]
    assert (report.loaded, report.skipped) == (3, 2)


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "output": "b", "instruction_en": "c"},\n{"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        load_records(path)
