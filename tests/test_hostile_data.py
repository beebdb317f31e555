"""Hostile data, property-based: every file either loads exactly its valid records or stops at the
first bad one with one line naming file, line and field; every loadable record encodes and trains.

The oracle is built beside the generated file: each line is generated *as* valid or invalid (and
for which fields), so the expected records, the first bad line and the skip count are known
without asking the loader. Runs are derandomised (same examples every run, no example database).
"""

import functools
import json
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cctuning.cli import main
from cctuning.data.collator import CCCollator
from cctuning.data.encoding import (
    IGNORE_INDEX,
    PLAIN_HEAD,
    PLAIN_TAIL,
    PromptEncoder,
    PromptFormat,
    encode_records,
)
from cctuning.data.records import LoadReport, load_records
from cctuning.errors import CCError, DataError
from cctuning.model import CCConfig, CCModel
from cctuning.testing import tiny_model, tiny_tokenizer
from tests.conftest import flags, make_records, write_jsonl

PROPERTY = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
FIELDS = ("instruction", "output", "instruction_en", "lang")
LONE_SURROGATE = "bad \ud800 text"  # what the JSON escape "\ud800" decodes to

# -- strategies -----------------------------------------------------------------------------------------
good_text = st.one_of(
    st.text(min_size=1, max_size=40),
    st.builds(
        lambda c, n: c * n, st.characters(exclude_categories=["Cs"]), st.integers(2000, 20000)
    ),  # very long
    st.sampled_from(
        ["<|im_end|>", "{{ bos_token }}", "a\u2028b\u2029c\x85", "e\u0301\u200d\ufeff", "🙂" * 30]
    ),
).filter(lambda s: s.strip())
bad_value = st.one_of(
    st.sampled_from(["", " ", "\t\r\n", "\u3000\u00a0", LONE_SURROGATE]),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


@dataclass
class Line:
    """One generated line and what the loader must make of it."""

    raw: bytes
    record: dict | None = None  # the fields a valid record must load with (None: blank or invalid)
    bad_fields: set = field(default_factory=set)  # invalid: the fields at fault (empty: the whole line)
    blank: bool = False

    @property
    def invalid(self) -> bool:
        return self.record is None and not self.blank


def _is_good(value, required: bool) -> bool:
    if value is None and not required:
        return True
    return isinstance(value, str) and bool(value.strip()) and value != LONE_SURROGATE


@st.composite
def record_line(draw, require_english: bool, ensure_ascii: bool) -> Line:
    required = {"instruction", "output"} | ({"instruction_en"} if require_english else set())
    rec, bad = {}, set()
    for name in FIELDS:
        choice = draw(st.sampled_from(["good"] * 6 + ["missing", "bad"]))
        if choice == "missing":
            if name in required:
                bad.add(name)
            continue
        value = draw(good_text) if choice == "good" else draw(bad_value)
        rec[name] = value
        if not _is_good(value, name in required):
            bad.add(name)
    extras = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=6).filter(lambda k: k not in FIELDS), json_value, max_size=2
        )
    )
    items = list(rec.items()) + list(extras.items())
    items = draw(st.permutations(items))
    text = json.dumps(dict(items), ensure_ascii=ensure_ascii or LONE_SURROGATE in rec.values())
    if bad:
        return Line(text.encode(), bad_fields=bad)
    expected = {name: rec.get(name) for name in FIELDS}
    if not isinstance(expected["instruction_en"], str):
        expected["instruction_en"] = None
    return Line(text.encode(), record=expected)


@st.composite
def broken_line(draw) -> Line:
    kind = draw(
        st.sampled_from(["truncated", "not an object", "utf8", "duplicate", "deep", "huge int", "junk"])
    )
    good = make_records(1)[0]
    if kind == "truncated":
        return Line(json.dumps(good).encode()[: draw(st.integers(1, 20))])
    if kind == "not an object":
        return Line(
            json.dumps(
                draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text()))
            ).encode()
        )
    if kind == "utf8":
        junk = draw(
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
        )
        return Line(b'{"instruction": "a' + junk + b'", "output": "b", "instruction_en": "c"}')
    if kind == "duplicate":
        key = draw(st.sampled_from(list(FIELDS) + ["extra"]))
        good["extra"] = 1
        return Line((json.dumps(good)[:-1] + f', {json.dumps(key)}: "again"}}').encode(), bad_fields={key})
    if kind == "deep":
        return Line(b"[" * 100_000 + b"]" * 100_000)
    if kind == "huge int":
        return Line(('{"instruction": "a", "output": ' + "9" * 5000 + "}").encode())
    return Line(draw(st.binary(min_size=1, max_size=20)).replace(b"\n", b"").replace(b"\r", b"") + b"}")


@st.composite
def jsonl_file(draw, require_english: bool):
    ensure_ascii = draw(st.booleans())
    lines = draw(
        st.lists(
            st.one_of(
                record_line(require_english, ensure_ascii),
                record_line(require_english, ensure_ascii),
                broken_line(),
                st.sampled_from([b"", b"   ", b"\t"]).map(lambda raw: Line(raw, blank=True)),
            ),
            min_size=1,
            max_size=8,
        )
    )
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    indent = draw(st.sampled_from([b"", b"  ", b"\t"]))
    body = newline.join((indent + ln.raw if ln.record is not None else ln.raw) for ln in lines)
    return lines, bom + body + draw(st.sampled_from([b"", newline]))


def _records_as_dicts(records) -> list[dict]:
    return [
        {
            "instruction": r.instruction,
            "output": r.output,
            "instruction_en": r.instruction_en,
            "lang": r.lang,
            "line": r.line,
        }
        for r in records
    ]


def _expected(lines: list[Line]) -> list[dict]:
    return [
        {**ln.record, "line": number} for number, ln in enumerate(lines, start=1) if ln.record is not None
    ]


def _check_error(err: DataError, path, lines: list[Line]) -> None:
    number, first = next((n, ln) for n, ln in enumerate(lines, start=1) if ln.invalid)
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}:{number}: "), (text, number)
    assert err.line == number
    if first.bad_fields:
        assert err.field in first.bad_fields, (err.field, first.bad_fields)
        assert f"field '{err.field}'" in text


# -- the loader ---------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.data(), require_english=st.booleans())
def test_jsonl_loads_exactly_the_valid_records_or_names_the_first_bad_line(
    tmp_path_factory, data, require_english
):
    lines, raw = data.draw(jsonl_file(require_english))
    path = tmp_path_factory.mktemp("h") / "data.jsonl"
    path.write_bytes(raw)
    expected = _expected(lines)
    # strict: everything loads, or the first bad line is named
    event(f"{sum(ln.invalid for ln in lines)} invalid lines, {len(expected)} valid")
    try:
        got = load_records(path, require_english=require_english)
    except DataError as err:
        if any(ln.invalid for ln in lines):
            _check_error(err, path, lines)
        else:
            assert not expected and "no valid records" in str(err)
    else:
        assert not any(ln.invalid for ln in lines)
        assert _records_as_dicts(got) == expected
    # --skip-invalid: exactly the valid records, and every skipped one counted
    report = LoadReport()
    try:
        got = load_records(path, require_english=require_english, skip_invalid=True, report=report)
    except DataError as err:
        assert not expected and "no valid records" in str(err) and "\n" not in str(err)
    else:
        assert _records_as_dicts(got) == expected
        assert report.skipped == sum(ln.invalid for ln in lines) and report.loaded == len(expected)


@PROPERTY
@given(data=st.data())
def test_json_array_loads_exactly_the_valid_records_or_names_the_first_bad_one(tmp_path_factory, data):
    ensure_ascii = data.draw(st.booleans())
    lines = data.draw(st.lists(record_line(True, ensure_ascii), min_size=1, max_size=6))
    newline = data.draw(st.sampled_from(["\n", "\r\n"]))
    text = "[" + newline + ("," + newline).join(ln.raw.decode() for ln in lines) + newline + "]" + newline
    path = tmp_path_factory.mktemp("h") / "data.json"
    path.write_bytes(data.draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + text.encode())
    numbered = [Line(b"", blank=True)] + lines  # the array opens on line 1, records start on line 2
    try:
        got = load_records(path)
    except DataError as err:
        assert any(ln.invalid for ln in lines)
        _check_error(err, path, numbered)
    else:
        assert _records_as_dicts(got) == _expected(numbered)


# -- templating and training -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tokenizer():
    return tiny_tokenizer()


@functools.lru_cache(maxsize=1)
def _model() -> CCModel:
    return CCModel.from_base(tiny_model("llama", tokenizer=_tokenizer()), CCConfig()).train()


def _decode(ids: list[int]) -> str:
    return _tokenizer().decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


example = st.tuples(good_text, good_text, good_text)


@PROPERTY
@given(
    ex=example,
    mode=st.sampled_from(["chat", "plain"]),
    max_length=st.integers(8, 400),
    offset=st.integers(0, 2),
    system=st.one_of(st.none(), st.text(min_size=1, max_size=30).filter(str.strip), good_text),
)
def test_any_text_encodes_with_the_prompt_intact_or_fails_in_one_line(ex, mode, max_length, offset, system):
    tok = _tokenizer()
    instruction, output, english = ex
    enc = PromptEncoder(tok, PromptFormat(mode, system, offset), max_length)
    try:
        got = enc.encode_example(instruction, output, english)
    except CCError as err:
        event("refused")
        assert "\n" not in str(err) and ("--max-length" in str(err) or "position_offset" in str(err)), str(
            err
        )
        return
    event("encoded whole" if got.response_cut == got.instruction_cut == 0 else "encoded, truncated")
    k = got.position + 1 + offset  # prompt length
    assert len(got.input_ids) <= max_length and len(got.en_input_ids) <= max_length
    assert (
        got.labels[:k] == [IGNORE_INDEX] * k and got.labels[k:] == got.input_ids[k:] and len(got.labels) > k
    )
    assert got.en_position == len(got.en_input_ids) - 1 - offset >= 0
    if got.response_cut == got.instruction_cut == 0:  # nothing cut: the text round-trips exactly
        if mode == "chat":
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": instruction}
            ]
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": output}], tokenize=False)
        else:
            prompt = (
                tok.bos_token + (f"{system}\n\n" if system else "") + PLAIN_HEAD + instruction + PLAIN_TAIL
            )
            full = prompt + output + tok.eos_token
        assert _decode(got.input_ids[:k]) == prompt
        assert _decode(got.input_ids) == full
    if got.en_instruction_cut == 0 and mode == "chat" and not system:
        assert _decode(got.en_input_ids) == tok.apply_chat_template(
            [{"role": "user", "content": english}], add_generation_prompt=True, tokenize=False
        )


@settings(PROPERTY, max_examples=25)
@given(batch=st.lists(example, min_size=1, max_size=3), side=st.sampled_from(["left", "right"]))
def test_any_loadable_records_train_one_step_with_a_finite_loss(batch, side):
    model = _model()
    model.zero_grad()
    enc = PromptEncoder(_tokenizer(), max_length=64)
    features = [enc.encode_example(i, o, e).features() for i, o, e in batch]
    loss = model(**CCCollator(_tokenizer().pad_token_id, side)(features)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(model.decision_maker.proj.weight.grad).all()


def test_an_encoding_error_names_the_records_file_line_and_field(tmp_path):
    rows = make_records(3)
    rows[2]["instruction"] = "Habari ya asubuhi, rafiki yangu? " * 4
    rows[2]["instruction_en"] = "x"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # a connection position 20 tokens back fits the long prompt but not the short English one
    enc = PromptEncoder(_tokenizer(), PromptFormat(position_offset=20))
    for row in rows[:2]:
        row["instruction"] = row["instruction_en"] = rows[2]["instruction"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    try:
        encode_records(load_records(path), enc, with_english=True)
    except DataError as err:
        assert (err.line, err.field) == (3, "instruction_en") and "position_offset" in str(err)
    else:
        raise AssertionError("expected a DataError")


# -- through the command line -------------------------------------------------------------------------
HOSTILE_FILE = (
    b"\xef\xbb\xbf"
    + json.dumps(
        {
            "instruction": "Habari " * 400,
            "output": "\u2028ok\u0085",
            "instruction_en": "Hi",
            "lang": "sw",
            "extra": [1, {"x": None}],
        },
        ensure_ascii=False,
    ).encode()
    + b"\r\n"
    + b"\r\n"
    + b'  {"instruction": "\\u8bf7\\u56de\\u7b54", "output": "\xe5\xa5\xbd", "instruction_en": "Answer"}\r\n'
    + b'{"instruction": "a", "output": "b", "instruction_en": "c", "output": "d"}\r\n'
    + b'{"instruction": "\xff", "output": "b", "instruction_en": "c"}\r\n'
    + b'{"instruction": "a", "output": 7, "instruction_en": "c"}\r\n'
    + b'{"instruction": "\\ud800", "output": "b", "instruction_en": "c"}\r\n'
    + b"\xef\xbb\xbf"
    + json.dumps(make_records(1)[0]).encode()
    + b"\r\n"
)


def test_a_hostile_file_through_the_cli_stops_in_one_line_or_trains_with_skipped_records_counted(
    base_dir, tmp_path, capsys
):
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(HOSTILE_FILE)
    args = [
        "train",
        *flags(
            model=base_dir, data=data, output=tmp_path / "o", max_steps="1", batch_size="3", max_length="128"
        ),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"cctuning: error: {data}:4: field 'output': duplicate key"
    assert "Traceback" not in err
    assert main(args + ["--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "(4 invalid records skipped)" in captured.out and "Traceback" not in captured.err
    results = json.loads((tmp_path / "o" / "train_results.json").read_text())
    assert (results["records"], results["skipped_records"]) == (3, 4)
    assert results["truncation"]["instruction_cut_examples"] == 1  # the long one was cut, not dropped
