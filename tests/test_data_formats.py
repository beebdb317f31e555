"""`--data` beyond JSONL: parquet, arrow, csv, `datasets` folders (a Dataset, a DatasetDict with
--split), the formats official / messages / prompt-completion, column mapping. A sample of the
bundled mix, converted to each, must give exactly the training features of its JSONL file; each bad
case is a one-line error naming the file, the row and the field."""

import json
import shutil
import sys

import pytest

from cctuning.cli import main
from cctuning.data.formats import DataOptions, parse_columns
from cctuning.data.mix import sample_mix
from cctuning.data.records import LoadReport, load_records
from cctuning.errors import CCError, DataError
from cctuning.model.transform import MATRIX_REPORT_NAME
from cctuning.testing import tiny_tokenizer
from cctuning.training import TrainConfig
from cctuning.training.options import build_train_config
from cctuning.training.run import prepare
from tests.conftest import FAST, flags, write_jsonl

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")

FIELDS = ("instruction", "output", "instruction_en", "lang")
MAX_LENGTH = 512  # the tiny model's context


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Records of the bundled mix (with its extra fields), two per language, those short enough for
    the tiny model's context: no truncation hides a difference in the features compared."""
    tok = tiny_tokenizer()
    sample = sample_mix("train", 2, None, 0)
    return [r for r in sample if len(tok(r["instruction"] + r["output"])["input_ids"]) < MAX_LENGTH - 112]


def _quiet_bars():
    datasets.disable_progress_bars()


def to_parquet(records: list[dict], path):
    _quiet_bars()
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def messages_of(r: dict, system: str | None = None, english: str = "messages_en") -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
    out = {"messages": turns, "lang": r["lang"]}
    if english == "messages_en":
        out["messages_en"] = [{"role": "user", "content": r["instruction_en"]}]
    else:
        out["instruction_en"] = r["instruction_en"]
    return out


def prompt_completion_of(r: dict) -> dict:
    return {
        "prompt": r["instruction"],
        "completion": r["output"],
        "prompt_en": r["instruction_en"],
        "lang": r["lang"],
    }


def train_features(base_dir, data, **options) -> list[dict]:
    """The tokenised training features `cctuning train` would train on (method cc)."""
    cfg = TrainConfig(model=str(base_dir), data=str(data), output="unused", max_length=MAX_LENGTH, **options)
    _, _, dataset, _, stats = prepare(cfg)
    assert stats.response_cut_examples == stats.instruction_cut_examples == 0
    return dataset.features


@pytest.fixture(scope="module")
def reference(rows, base_dir, tmp_path_factory):
    """The JSONL file of the sample and its features."""
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "train.jsonl", rows)
    return path, train_features(base_dir, path)


# -- the same features from every source and format ------------------------------------------------
def _parquet(rows, tmp):
    return to_parquet(rows, tmp / "train.parquet"), {}


def _csv(rows, tmp):
    _quiet_bars()
    datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in rows]).to_csv(str(tmp / "train.csv"))
    return tmp / "train.csv", {}


def _arrow_file(rows, tmp):  # Arrow IPC file format (pyarrow's own), not the stream save_to_disk writes
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp / "train.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return tmp / "train.arrow", {}


def _arrow_stream(rows, tmp):  # the shard of a save_to_disk folder, on its own
    _quiet_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "saved"))
    shard = next((tmp / "saved").glob("*.arrow"))
    return shutil.copy(shard, tmp / "shard.arrow"), {}


def _saved_dataset(rows, tmp):
    _quiet_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "dataset"))
    return tmp / "dataset", {}


def _dataset_dict(rows, tmp):
    _quiet_bars()
    dd = datasets.DatasetDict(
        {"heldout": datasets.Dataset.from_list(rows[:3]), "train": datasets.Dataset.from_list(rows)}
    )
    dd.save_to_disk(str(tmp / "dd"))
    return tmp / "dd", {"split": "train"}


def _dataset_dict_one_split(rows, tmp):
    _quiet_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp / "dd1"))
    return tmp / "dd1", {}  # one split: no --split needed


def _messages_jsonl(rows, tmp):
    return write_jsonl(tmp / "messages.jsonl", [messages_of(r) for r in rows]), {}


def _messages_instruction_en(rows, tmp):
    return write_jsonl(tmp / "m.jsonl", [messages_of(r, english="instruction_en") for r in rows]), {}


def _messages_parquet(rows, tmp):
    return to_parquet([messages_of(r) for r in rows], tmp / "messages.parquet"), {"data_format": "messages"}


def _prompt_completion(rows, tmp):
    return write_jsonl(tmp / "pc.jsonl", [prompt_completion_of(r) for r in rows]), {}


def _conversational_prompt_completion(rows, tmp):
    records = [
        {
            "prompt": [{"role": "user", "content": r["instruction"]}],
            "completion": [{"role": "assistant", "content": r["output"]}],
            "prompt_en": [{"role": "user", "content": r["instruction_en"]}],
            "lang": r["lang"],
        }
        for r in rows
    ]
    return to_parquet(records, tmp / "pc.parquet"), {"data_format": "prompt-completion"}


def _mapped_columns(rows, tmp):
    renamed = [
        {"question": r["instruction"], "answer": r["output"], "question_en": r["instruction_en"]}
        for r in rows
    ]
    for new, r in zip(renamed, rows):
        new["language"] = r["lang"]
    columns = "instruction=question,output=answer,instruction_en=question_en,lang=language"
    return to_parquet(renamed, tmp / "renamed.parquet"), {"columns": columns}


def _mapped_messages_dict(rows, tmp):
    records = [{"conversation": messages_of(r)["messages"], "english": r["instruction_en"]} for r in rows]
    return write_jsonl(tmp / "conv.jsonl", records), {
        "columns": {"messages": "conversation", "instruction_en": "english"}
    }


SOURCES = [
    _parquet,
    _csv,
    _arrow_file,
    _arrow_stream,
    _saved_dataset,
    _dataset_dict,
    _dataset_dict_one_split,
    _messages_jsonl,
    _messages_instruction_en,
    _messages_parquet,
    _prompt_completion,
    _conversational_prompt_completion,
    _mapped_columns,
    _mapped_messages_dict,
]


@pytest.mark.parametrize("source", SOURCES, ids=lambda f: f.__name__.strip("_"))
def test_every_source_and_format_gives_the_features_of_the_jsonl_file(
    source, rows, reference, base_dir, tmp_path
):
    _, expected = reference
    data, options = source(rows, tmp_path)
    assert train_features(base_dir, data, **options) == expected


def test_the_comparison_sees_a_changed_record(rows, reference, base_dir, tmp_path):
    """The features compared above are those of the records: one changed response changes them."""
    _, expected = reference
    changed = [dict(r) for r in rows]
    changed[5]["output"] += " (changed)"
    got = train_features(base_dir, to_parquet(changed, tmp_path / "changed.parquet"))
    assert got != expected and got[:5] == expected[:5] and got[6:] == expected[6:]


def test_a_system_turn_is_the_run_system_prompt(rows, base_dir, tmp_path):
    data = write_jsonl(tmp_path / "sys.jsonl", [messages_of(r, system="Be brief.") for r in rows])
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    assert train_features(base_dir, data) == train_features(base_dir, plain, system_prompt="Be brief.")
    with pytest.raises(CCError, match=r"sys.jsonl:1: field 'messages': the system turn 'Be brief.' differs"):
        train_features(base_dir, data, system_prompt="Something else.")


def test_table_rows_are_named_by_their_index(rows, tmp_path):
    recs = load_records(to_parquet(rows, tmp_path / "t.parquet"))
    assert [r.row for r in recs] == list(range(len(rows)))
    assert recs[17].where == f"{tmp_path / 't.parquet'}: row 17" and recs[17].line is None
    assert [(r.instruction, r.output, r.instruction_en, r.lang) for r in recs] == [
        tuple(r[k] for k in FIELDS) for r in rows
    ]


def test_a_yaml_mapping_or_string_for_columns(tmp_path):
    (tmp_path / "a.yaml").write_text("columns:\n  instruction: q\n  output: a\nformat: messages\n")
    (tmp_path / "b.yaml").write_text("columns: instruction=q, output=a\ndata_format: prompt-completion\n")
    a, b = build_train_config(tmp_path / "a.yaml", {}), build_train_config(tmp_path / "b.yaml", {})
    assert parse_columns(a.columns) == parse_columns(b.columns) == (("instruction", "q"), ("output", "a"))
    assert (a.data_format, b.data_format) == ("messages", "prompt-completion")
    assert build_train_config(tmp_path / "a.yaml", {"data_format": "official"}).data_format == "official"


# -- errors --------------------------------------------------------------------------------------------
def test_a_missing_field_names_the_parquet_file_row_and_field(rows, tmp_path):
    bad = [dict(r) for r in rows]
    bad[17]["instruction_en"] = None
    path = to_parquet(bad, tmp_path / "train.parquet")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == f"{path}: row 17: field 'instruction_en': missing"
    assert (info.value.row, info.value.field, info.value.line) == (17, "instruction_en", None)
    report = LoadReport()
    assert len(load_records(path, skip_invalid=True, report=report)) == len(rows) - 1
    assert report.skipped == 1 and "row 17" in report.first_errors[0]


def test_errors_use_the_data_own_column_names(rows, tmp_path):
    renamed = [{"q": r["instruction"], "a": r["output"], "q_en": r["instruction_en"]} for r in rows]
    renamed[3]["a"] = "   "
    path = to_parquet(renamed, tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"r.parquet: row 3: field 'a': empty$"):
        load_records(path, options=DataOptions.of(columns="instruction=q,output=a,instruction_en=q_en"))


def test_an_empty_csv_cell_is_a_missing_field(rows, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("instruction,output,instruction_en\nA,B,C\nA,,C\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t.csv: row 1: field 'output': missing$"):
        load_records(path)
    (tmp_path / "n.csv").write_text("instruction,output,instruction_en\n42,NA,1.5\n", encoding="utf-8")
    rec = load_records(tmp_path / "n.csv")[0]  # CSV cells are text, never numbers or NaN
    assert (rec.instruction, rec.output, rec.instruction_en) == ("42", "NA", "1.5")


MULTI_TURN = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "d"},
]


def test_multi_turn_conversations_are_refused_with_the_reason(tmp_path):
    one = {"messages": MULTI_TURN[:2], "instruction_en": "x"}
    path = write_jsonl(tmp_path / "m.jsonl", [one, {"messages": MULTI_TURN, "instruction_en": "x"}])
    with pytest.raises(DataError) as info:
        load_records(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: field 'messages': a multi-turn conversation (2 user and 2 assistant")
    assert "one connection position per prompt" in text and "\n" not in text
    table = to_parquet([one] * 4 + [{"messages": MULTI_TURN, "instruction_en": "x"}], tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.parquet: row 4: field 'messages': a multi-turn"):
        load_records(table)


BAD_MESSAGES = [
    ({"messages": [{"role": "user", "content": "a"}], "instruction_en": "x"}, "no assistant turn"),
    (
        {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
        "in this order",
    ),
    ({"messages": [{"role": "tool", "content": "a"}]}, "unsupported role 'tool'"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 1 (user): content must be a string"),
    ({"messages": "hello"}, "must be a list of messages"),
    ({"messages": MULTI_TURN[:2]}, "field 'messages_en': missing"),
    ({"messages": MULTI_TURN[:2], "messages_en": MULTI_TURN[:1], "instruction_en": "x"}, "once"),
]


@pytest.mark.parametrize("record,message", BAD_MESSAGES)
def test_bad_conversations_name_the_line_and_what_is_wrong(tmp_path, record, message):
    path = write_jsonl(tmp_path / "m.jsonl", [record])
    with pytest.raises(DataError, match=r"m.jsonl:1: field '\w+': ") as info:
        load_records(path, options=DataOptions.of("messages"))
    assert message in str(info.value)


def test_a_dataset_dict_with_several_splits_needs_split(rows, tmp_path):
    data, _ = _dataset_dict(rows, tmp_path)
    with pytest.raises(DataError) as info:
        load_records(data)
    assert str(info.value) == f"{data}: a DatasetDict with the splits heldout, train: choose one with --split"
    with pytest.raises(DataError, match=r"no split 'test' \(splits: heldout, train\)"):
        load_records(data, options=DataOptions.of(split="test"))
    held = load_records(data, options=DataOptions.of(split="heldout"))
    assert len(held) == 3 and held[0].path == str(data / "heldout")


def test_split_is_refused_where_there_are_no_splits(rows, tmp_path):
    for data in (to_parquet(rows, tmp_path / "t.parquet"), write_jsonl(tmp_path / "t.jsonl", rows)):
        with pytest.raises(DataError, match="--split train: only a DatasetDict folder has splits"):
            load_records(data, options=DataOptions.of(split="train"))
    data, _ = _saved_dataset(rows, tmp_path)
    with pytest.raises(DataError, match="holds one Dataset, not a DatasetDict"):
        load_records(data, options=DataOptions.of(split="train"))


def test_a_column_mapping_must_name_columns_the_data_has(rows, tmp_path):
    table = to_parquet(rows, tmp_path / "t.parquet")
    with pytest.raises(DataError) as info:
        load_records(table, options=DataOptions.of(columns="instruction=question"))
    assert str(info.value).startswith(
        f"{table}: --columns maps instruction to 'question', which is not a column ("
    )
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t.jsonl: --columns lang=language: no record has that column"):
        load_records(jsonl, options=DataOptions.of(columns="lang=language"))
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'question': missing"):
        load_records(jsonl, options=DataOptions.of(columns="instruction=question"))


@pytest.mark.parametrize(
    "columns,message",
    [
        ("nonsense=question", "unknown field 'nonsense'"),
        ("instruction", "'instruction' is not FIELD=COLUMN"),
        ("instruction=a,instruction=b", "field 'instruction' is mapped twice"),
        ("instruction=a,output=a", "column 'a' is mapped to two fields"),
        ({"instruction": 3}, "needs a field name and a column name"),
    ],
)
def test_bad_column_mappings_are_one_line_errors(columns, message):
    with pytest.raises(CCError, match=message):
        DataOptions.of(columns=columns)


def test_a_table_without_the_format_columns_says_which_it_has(rows, tmp_path):
    table = to_parquet(
        [{"question": r["instruction"], "answer": r["output"]} for r in rows], tmp_path / "q.parquet"
    )
    with pytest.raises(DataError) as info:
        load_records(table)
    assert str(info.value).startswith(f"{table}: field 'instruction': missing: the official format needs")
    assert "the columns are question, answer" in str(info.value)


@pytest.mark.parametrize(
    "name,content", [("bad.parquet", b"not a parquet file"), ("bad.arrow", b"\x00" * 64)]
)
def test_an_unreadable_table_is_one_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}: cannot read as ") and "\n" not in str(info.value)


def test_an_unreadable_csv_and_dataset_folder_are_one_line(rows, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"instruction,output,instruction_en\n\xff\xfe,b,c\n")
    with pytest.raises(DataError, match=r"bad.csv: cannot read as csv: "):
        load_records(bad)
    data, _ = _saved_dataset(rows, tmp_path)
    for shard in data.glob("*.arrow"):
        shard.write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"dataset: cannot read the dataset: "):
        load_records(data)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file nor a folder written by"):
        load_records(tmp_path / "folder")


def test_without_datasets_a_table_names_the_extra(rows, tmp_path, monkeypatch):
    table = to_parquet(rows, tmp_path / "t.parquet")
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(CCError, match=r"pip install cctuning\[data\]"):
        load_records(table)
    assert len(load_records(jsonl)) == len(rows)  # the core does not need it


def test_system_turns_must_agree_within_a_file(rows, tmp_path):
    records = [messages_of(r, system="A") for r in rows[:3]] + [messages_of(rows[3], system="B")]
    path = to_parquet(records, tmp_path / "s.parquet")
    with pytest.raises(
        DataError, match=r"s.parquet: row 3: field 'messages': its system turn \('B'\) differs"
    ):
        load_records(path)


# -- the commands -------------------------------------------------------------------------------------
def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_train_fit_matrix_and_eval_nll_read_a_dataset_dict_of_conversations(rows, base_dir, tmp_path, capsys):
    _quiet_bars()
    conv = [messages_of(r) for r in rows]
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(conv), "heldout": datasets.Dataset.from_list(conv[:6])}
    ).save_to_disk(str(dd))
    out = tmp_path / "run"
    common = ["--format", "messages", "--columns", "messages=messages"]
    code = main(
        [
            "train",
            *flags(model=base_dir, data=dd, output=out, max_length=128),
            *FAST,
            *common,
            "--split",
            "train",
        ]
    )
    assert code == 0, capsys.readouterr().err
    code = main(
        ["fit-matrix", "--model", str(out), "--data", str(dd), "--split", "train", "--samples", "12", *common]
    )
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / MATRIX_REPORT_NAME).read_text(encoding="utf-8"))
    assert (meta["data"], meta["data_options"]["split"]) == (str(dd), "train")
    nll = ["eval", "--model", str(out), "--connection", "transform", "--max-length", "128"]
    code = main([*nll, "--nll", str(dd), "--split", "heldout", *common, "--output", str(tmp_path / "e1")])
    assert code == 0, capsys.readouterr().err
    # the same records as JSONL give the same NLL, item by item
    held = write_jsonl(tmp_path / "held.jsonl", rows[:6])
    assert main([*nll, "--nll", str(held), "--output", str(tmp_path / "e2")]) == 0
    a = [json.loads(x) for x in (tmp_path / "e1" / "nll_items.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "e2" / "nll_items.jsonl").read_text().splitlines()]
    assert [x["row"] for x in a] == list(range(6)) and [x["line"] for x in b] == list(range(1, 7))
    assert [x["nll_sum"] for x in a] == pytest.approx([x["nll_sum"] for x in b], rel=1e-5)
    # a DatasetDict without --split, and an unknown --format, are one-line errors
    capsys.readouterr()
    assert main([*nll, "--nll", str(dd), "--output", str(tmp_path / "e3")]) == 2
    assert "a DatasetDict with the splits train, heldout: choose one with --split" in _one_error(capsys)
    assert main(["eval", "--model", str(out), "--format", "messages"]) == 2
    assert "give --nll" in _one_error(capsys)


def test_train_reports_a_bad_row_in_one_line(rows, base_dir, tmp_path, capsys):
    bad = [prompt_completion_of(r) for r in rows]
    bad[17]["prompt_en"] = None
    data = to_parquet(bad, tmp_path / "pc.parquet")
    code = main(["train", *flags(model=base_dir, data=data, output=tmp_path / "o"), *FAST])
    assert code == 2
    assert _one_error(capsys) == f"cctuning: error: {data}: row 17: field 'prompt_en': missing"
    assert not (tmp_path / "o").exists()


def test_experiment_config_takes_the_data_options(tmp_path):
    from cctuning.lab.experiment import data_options, load_config

    path = tmp_path / "exp.yaml"
    base = "model: m\ncells:\n  - {name: cc}\n"
    path.write_text(
        base
        + "data: d\nheldout_data: h\ndata_format: messages\ncolumns: {instruction_en: en}\nheldout_split: test\n"
    )
    cfg = load_config(path)
    assert data_options(cfg, heldout=False) == DataOptions("messages", (("instruction_en", "en"),), None)
    assert data_options(cfg, heldout=True).split == "test"
    path.write_text(base + "train: {data_format: messages}\n")
    with pytest.raises(CCError, match="train: option 'data_format': set the data at the top level"):
        load_config(path)
    path.write_text(base + "data: d\ncolumns: bogus=x\n")
    with pytest.raises(CCError, match=r"exp.yaml: --columns: unknown field 'bogus'"):
        load_config(path)


@pytest.mark.slow
def test_experiment_trains_and_evaluates_on_user_tables(rows, base_dir, tmp_path):
    from cctuning.lab.experiment import load_config, run_experiment

    _quiet_bars()
    dd = tmp_path / "dd"
    pc = [prompt_completion_of(r) for r in rows]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pc), "test": datasets.Dataset.from_list(pc[:4])}
    ).save_to_disk(str(dd))
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
model: {base_dir}
output: {tmp_path / "exp"}
seeds: [1]
data: {dd}
split: train
heldout_data: {dd}
heldout_split: test
data_format: prompt-completion
matrix_samples: 8
train: {{max_steps: 1, batch_size: 2, lr: 1.0e-3, max_length: 96}}
cells:
  - {{name: cc, method: cc, connection: transform}}
""")
    report = run_experiment(load_config(path), progress=False)
    items = (tmp_path / "exp" / "eval" / "cc" / "seed1" / "nll" / "nll_items.jsonl").read_text().splitlines()
    assert [json.loads(x)["row"] for x in items] == [0, 1, 2, 3]
    assert report["cells"]["cc"]["nll"]["all"]["mean"] > 0
    assert not (tmp_path / "exp" / "data").exists()  # no mix sample was drawn


def test_generate_reads_conversations_and_refuses_a_foreign_system_turn(rows, base_dir, tmp_path, capsys):
    plain = write_jsonl(tmp_path / "p.jsonl", [messages_of(r) for r in rows[:2]])
    out = tmp_path / "gens.jsonl"
    code = main(
        [
            "generate",
            "--model",
            str(base_dir),
            "--input",
            str(plain),
            "--max-new-tokens",
            "2",
            "--output",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert [json.loads(x)["instruction"] for x in out.read_text().splitlines()] == [
        r["instruction"] for r in rows[:2]
    ]
    system = write_jsonl(tmp_path / "s.jsonl", [messages_of(r, system="Be brief.") for r in rows[:2]])
    assert main(["generate", "--model", str(base_dir), "--input", str(system), "--max-new-tokens", "2"]) == 2
    assert (
        "s.jsonl:1: field 'messages': the system turn 'Be brief.' differs from the model's system prompt"
        in _one_error(capsys)
    )
