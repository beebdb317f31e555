"""The bundled training mix: well-formed, balanced, split by source item, free of benchmark text,
and reproducible from the sources shipped in data/parallel/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from cctuning.data import mix
from cctuning.data.records import load_records
from cctuning.errors import CCError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # the builder lives beside scripts/build_mix.py
import mixbuild  # noqa: E402

SOURCES = REPO / "data" / "parallel"
BENCHMARKS = REPO / "cctuning" / "resources" / "benchmarks"
STRING_FIELDS = ("id", "lang", "task", "source", "item", "split", "instruction", "instruction_en", "output")


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    return mix.load_mix("all")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path]:
    """Two independent builds: one through the CLI with another hash seed, one in this process."""
    cli_out, lib_out = tmp_path_factory.mktemp("cli"), tmp_path_factory.mktemp("lib")
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "build_mix.py"),
        "--sources",
        str(SOURCES),
        "--out",
        str(cli_out),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.Popen(
        cmd + ["--benchmarks", str(BENCHMARKS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    mixbuild.write_mix(mixbuild.build_mix(SOURCES, [BENCHMARKS]), lib_out)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    return cli_out, lib_out


def test_shipped_records_are_complete_strings(shipped):
    assert len(shipped) > 1000
    for rec in shipped:
        for field in STRING_FIELDS:
            assert isinstance(rec[field], str) and rec[field].strip(), (rec.get("id"), field)
        assert rec["lang"] in mixbuild.LANGUAGES and rec["task"] in mixbuild.TASKS
        assert rec["source"] in mixbuild.TASK_SOURCES[rec["task"]]
        assert rec["instruction"] != rec["instruction_en"], rec["id"]
    assert len({r["id"] for r in shipped}) == len(shipped)
    mixbuild.validate_mix(shipped)


def test_split_files_hold_their_split_and_load_as_cc_records():
    for split in mix.SPLITS:
        records = mix.load_mix(split)
        assert records and {r["split"] for r in records} == {split}
        loaded = load_records(mix.mix_files()[split], require_english=True)
        assert len(loaded) == len(records) and loaded[0].instruction_en == records[0]["instruction_en"]
    with pytest.raises(ValueError):
        mix.load_mix("test")


def test_every_language_is_covered_and_balanced(shipped):
    per = Counter((r["split"], r["lang"]) for r in shipped)
    for split in mix.SPLITS:
        counts = {per[(split, lang)] for lang in mixbuild.LANGUAGES}
        assert len(counts) == 1 and counts.pop() > 0, split
    assert {r["lang"] for r in shipped} == set(mixbuild.LANGUAGES)
    tasks = Counter(r["task"] for r in shipped)
    assert set(tasks) == set(mixbuild.TASKS)
    for lang in mixbuild.LANGUAGES:
        cell = Counter(r["task"] for r in shipped if r["lang"] == lang and r["split"] == "train")
        assert len(cell) >= 2 and max(cell.values()) - min(cell.values()) <= 1, (lang, cell)
    held = sum(r["split"] == "heldout" for r in shipped) / len(shipped)
    assert 0.08 <= held <= 0.12


def test_heldout_shares_no_source_item_or_text_with_train(shipped):
    items = {split: {r["item"] for r in shipped if r["split"] == split} for split in mix.SPLITS}
    assert items["train"].isdisjoint(items["heldout"])
    # The item must really be the unit named in the README (idx / split-idx / doc / article).
    for rec in shipped:
        if rec["source"] in ("mgsm", "xcopa", "udhr"):
            assert rec["item"] == f"{rec['source']}:{rec['id'].rsplit('/', 1)[1]}", rec["id"]
    # And no content line of 30+ characters (templates aside) is on both sides, in any field or
    # language. (Shorter lines can coincide: XCOPA's English MT gives "The fire goes out" twice.)
    english = mixbuild.TEMPLATES["en"]["translate"]
    templates = {
        unicodedata.normalize("NFC", t) for by_key in mixbuild.TEMPLATES.values() for t in by_key.values()
    }
    templates |= {english.format(language=name) for name in mixbuild.ENGLISH_NAMES.values()}

    def content(split: str) -> set[str]:
        return {
            line
            for r in shipped
            if r["split"] == split
            for f in mixbuild.RECORD_FIELDS
            for line in r[f].split("\n")
            if len(line) >= 30 and line not in templates
        }

    assert content("train").isdisjoint(content("heldout"))


def test_templates_cover_each_language_and_task():
    for lang in mixbuild.LANGUAGES:
        assert {"translate", "continue"} <= set(mixbuild.TEMPLATES[lang]), lang
        assert lang in mixbuild.ENGLISH_NAMES
    for lang in ("bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"):
        assert "math" in mixbuild.TEMPLATES[lang]
    for lang in ("id", "sw", "th", "tr", "vi", "zh"):
        assert {"premise", "cause", "effect", "choose"} <= set(mixbuild.TEMPLATES[lang])
    assert set(mixbuild.TEMPLATES["en"]) == {
        "translate",
        "continue",
        "math",
        "premise",
        "cause",
        "effect",
        "choose",
    }


def test_allocate_shares_evenly_under_caps():
    assert mixbuild._allocate(10, {"a": 100, "b": 100}) == {"a": 5, "b": 5}
    assert mixbuild._allocate(10, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 4, "c": 4}
    assert mixbuild._allocate(10, {"a": 1, "b": 2}) == {"a": 1, "b": 2}


def _bench_file(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (folder / name / "xx.jsonl").write_text(text, encoding="utf-8")


def test_contamination_check_catches_planted_text_and_ignores_templates(tmp_path):
    questions = [
        "Wie viele Eier legt die Ente von Janet jeden Tag genau?",
        "Wer singt das Lied?",
        "Warum ist der Himmel am Abend rot gefärbt und nicht blau?",
        "Was kostet ein Kilogramm Äpfel auf dem Markt?",
    ]
    rows = [
        {"id": i, "prompt": f"Bitte beantworte die folgende Frage.\n\nFrage: {q}\n\nAntwort:", "answer": "x"}
        for i, q in enumerate(questions)
    ]
    _bench_file(tmp_path, "Toy", rows)
    clean = {
        "id": "t/0",
        "instruction": "Bitte beantworte die folgende Frage.\nEin ganz anderer Satz, der nirgends vorkommt.",
        "instruction_en": "Please answer.",
        "output": "Nein.",
    }
    mixbuild.check_contamination([clean], [tmp_path])  # the shared template line is not a leak
    planted = {**clean, "id": "t/1", "output": "Vorher " + questions[2].upper() + " nachher"}
    with pytest.raises(mixbuild.ContaminationError, match="t/1"):
        mixbuild.check_contamination([clean, planted], [tmp_path])
    story = (
        "Liv jumped as she was startled by a loud pop.She realized the light bulb in her kitchen burnt out."
    )
    rows[3]["prompt_en"] = story  # sentences run together without a space, as in XStoryCloze
    _bench_file(tmp_path, "Toy", rows)
    planted = {**clean, "id": "t/3", "output": "Then she realized the light bulb in her kitchen burnt out."}
    with pytest.raises(mixbuild.ContaminationError, match="t/3"):
        mixbuild.check_contamination([planted], [tmp_path])
    short = {**clean, "id": "t/2", "instruction_en": "Translate:\n" + questions[1]}
    with pytest.raises(mixbuild.ContaminationError, match="t/2"):
        mixbuild.check_contamination([short], [tmp_path])
    with pytest.raises(CCError):
        mixbuild.check_contamination([clean], [tmp_path / "missing"])


def test_shipped_mix_holds_no_benchmark_text(shipped):
    assert mixbuild.find_contamination(shipped, [BENCHMARKS]) == []


def test_build_is_deterministic_and_the_shipped_files_are_fresh(builds):
    cli_out, lib_out = builds
    for split, shipped_path in mix.mix_files().items():
        cli = (cli_out / f"{split}.jsonl").read_bytes()
        assert cli == (lib_out / f"{split}.jsonl").read_bytes(), f"two builds of {split} differ"
        assert cli == shipped_path.read_bytes(), f"shipped {split}.jsonl is stale: run scripts/build_mix.py"
    table = mixbuild.composition_markdown(mix.load_mix("all"))
    readme = (mix.MIX_DIR / "README.md").read_text(encoding="utf-8")
    assert f"<!-- composition:begin -->\n{table}<!-- composition:end -->" in readme
    for name in os.listdir(cli_out / "licenses"):
        assert (mix.MIX_DIR / "licenses" / name).read_bytes() == (cli_out / "licenses" / name).read_bytes()


def test_loading_the_mix_never_touches_the_sources():
    code = (
        "import sys\n"
        f"sources = {str(SOURCES)!r}\n"
        "def hook(event, args):\n"
        "    if event == 'open' and str(args[0]).startswith(sources):\n"
        "        raise RuntimeError(f'opened {args[0]}')\n"
        "sys.addaudithook(hook)\n"
        "from cctuning.data.mix import load_mix\n"
        "assert len(load_mix('all')) > 1000\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
