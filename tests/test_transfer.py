"""The synthetic transfer task (studies/transfer/, docs/transfer.md): its data generator, its
statistics, its scoring path and, end to end, the English oracle's margin over SFT."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cctuning.errors import CCError
from cctuning.stats import wilson_interval
from studies.transfer.__main__ import main
from studies.transfer.config import CELLS, TransferConfig, check_train_options
from studies.transfer.run import run_transfer_task
from studies.transfer.scoring import majority_baseline, probe_accuracy, score_candidates
from studies.transfer.summary import summary_markdown
from studies.transfer.world import (
    FOREIGN_FUNCTION,
    FOREIGN_LANG,
    build_model,
    build_tokenizer,
    build_world,
    eval_items,
    stage1_records,
    stage2_records,
)


@pytest.fixture(scope="module")
def world():
    return build_world(TransferConfig(entities=40, relations=3, values=5), seed=7)


def _words(text: str) -> set[str]:
    return set(text.split())


# -- the data generator ------------------------------------------------------------------------
@pytest.mark.parametrize("replay", [False, True])
def test_heldout_facts_never_in_stage2_foreign_data(world, replay):
    held_names = {world.foreign_names[e] for e in world.heldout_entities}
    held_names |= {world.english_names[e] for e in world.heldout_entities}
    rows = stage2_records(world, english_replay=replay)
    foreign = [r for r in rows if r["lang"] == FOREIGN_LANG]
    for row in foreign:
        assert not (_words(row["instruction"]) | _words(row["instruction_en"])) & held_names
    # the foreign records ask exactly every fact of the training entities, once
    asked = {(row["instruction_en"].split()[5], row["instruction_en"].split()[3]) for row in foreign}
    expected = {(world.english_names[e], rel) for e in world.train_entities for rel in world.relations}
    assert asked == expected and len(foreign) == len(expected)
    # the English rehearsal is English only: no foreign word, instruction_en is the instruction itself
    english = [r for r in rows if r["lang"] != FOREIGN_LANG]
    assert len(english) == (40 * 3 if replay else 0)
    foreign_words = set(world.foreign_names) | set(world.foreign_relations) | set(FOREIGN_FUNCTION.values())
    for row in english:
        assert row["lang"] == "en" and row["instruction_en"] == row["instruction"]
        assert not _words(row["instruction"]) & foreign_words
    assert set(world.train_entities).isdisjoint(world.heldout_entities)
    assert sorted(world.train_entities + world.heldout_entities) == list(range(40))
    assert len(world.heldout_entities) == 20


def test_dictionary_covers_exactly_the_declared_part(world):
    rows = [r for r in stage1_records(world) if r["lang"] == "dict"]
    to_english = {
        r["instruction"].split()[-2]: r["output"] for r in rows if "english word" in r["instruction"]
    }
    to_foreign = {
        r["instruction"].split()[-2]: r["output"] for r in rows if "foreign word" in r["instruction"]
    }
    assert {en: fo for fo, en in to_english.items()} == to_foreign  # both directions, the same pairs
    declared = {world.english_names[e]: world.foreign_names[e] for e in world.dictionary_entities}
    declared.update(FOREIGN_FUNCTION)
    declared.update(zip(world.relations, world.foreign_relations))
    assert to_foreign == declared
    # half of each split (dictionary_fraction 0.5, stratified)
    dictionary = set(world.dictionary_entities)
    assert len(dictionary & set(world.train_entities)) == 10
    assert len(dictionary & set(world.heldout_entities)) == 10
    items = eval_items(world, world.heldout_entities)
    assert sum(it["in_dictionary"] for it in items) == 10 * len(world.relations)


def test_answers_are_consistent(world):
    english = {}
    for row in stage1_records(world):
        if row["lang"] == "en":
            words = row["instruction"].split()
            key = (words[5], words[3])
            assert key not in english
            english[key] = row["output"]
    assert len(english) == 40 * 3  # every fact once in English
    for row in stage2_records(world, english_replay=True):
        if row["lang"] == "en":
            words = row["instruction"].split()
            assert english[words[5], words[3]] == row["output"]
            continue
        words = row["instruction_en"].split()
        assert english[words[5], words[3]] == row["output"]
        # the foreign question names the same entity and relation as its English translation
        fo = row["instruction"].split()
        assert world.foreign_names.index(fo[0]) == world.english_names.index(words[5])
        assert world.foreign_relations.index(fo[2]) == world.relations.index(words[3])
    for item in eval_items(world, world.heldout_entities):
        words = item["instruction_en"].split()
        assert english[words[5], words[3]] == item["answer"]
        assert item["answer"] in item["candidates"] and len(item["candidates"]) == 5
        assert item["candidates"] == world.answers[words[3]]


def test_languages_share_only_answers_and_punctuation(world):
    english_side = {w for r in stage1_records(world) if r["lang"] == "en" for w in r["instruction"].split()}
    foreign_side = {w for r in stage2_records(world) for w in r["instruction"].split()}
    assert all(r["lang"] == FOREIGN_LANG for r in stage2_records(world))
    assert english_side & foreign_side == {"?"}
    assert not set(world.english_names) & set(world.foreign_names)


def test_world_is_reproducible_and_seeded():
    cfg = TransferConfig(entities=30)
    assert build_world(cfg, 3) == build_world(cfg, 3)
    other = build_world(cfg, 4)
    assert other.english_names != build_world(cfg, 3).english_names


def test_tokenizer_is_word_level_without_unknowns(world):
    tok = build_tokenizer(world)
    for row in stage1_records(world) + stage2_records(world, english_replay=True):
        for text in (row["instruction"], row.get("instruction_en") or "", row["output"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert len(ids) == len(text.split())  # one token per word


def test_majority_baseline_by_hand(world):
    items = eval_items(world, world.heldout_entities)
    result = majority_baseline(world, items)
    hits = 0
    for item in items:
        r = world.relations.index(item["relation"])
        train_answers = [world.answer(e, r) for e in world.train_entities]
        top = max(train_answers.count(a) for a in item["candidates"])
        majority = next(a for a in item["candidates"] if train_answers.count(a) == top)  # first on ties
        hits += majority == item["answer"]
    assert result["correct"] == hits and result["n"] == len(items)


def test_probe_reads_a_linear_code_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c", "d"]
    items = [{"answer": classes[i % 4], "candidates": classes} for i in range(80)]
    codes = torch.randn(4, 16, generator=gen)
    x = torch.stack([codes[i % 4] for i in range(80)]) + 0.1 * torch.randn(80, 16, generator=gen)
    assert probe_accuracy(x[:40], items[:40], x[40:], items[40:]) == 1.0
    noise = torch.randn(80, 16, generator=gen)
    assert probe_accuracy(noise[:40], items[:40], noise[40:], items[40:]) < 0.6


def test_train_options_are_checked():
    assert check_train_options({"layer-choice": "fixed:-1", "tau": "0.5"}, None) == {
        "layer_choice": "fixed:-1",
        "tau": 0.5,
    }
    with pytest.raises(CCError, match="not a `cctuning train` option"):
        check_train_options({"nonsense": 1}, None)
    with pytest.raises(CCError, match="set by the transfer task"):
        check_train_options({"lr": 1}, None)
    with pytest.raises(CCError, match="expected one of"):
        check_train_options({"template": "weird"}, None)


# -- scoring: the package's evaluation path against the training forward ------------------------
def test_candidate_scores_match_the_training_forward(world):
    from cctuning.data.collator import CCCollator
    from cctuning.data.encoding import PromptEncoder, PromptFormat
    from cctuning.model.ccmodel import CCConfig, CCModel

    tok = build_tokenizer(world)
    torch.manual_seed(0)
    model = CCModel(build_model(TransferConfig(hidden_size=32, layers=3), len(tok), 0), CCConfig(method="cc"))
    fmt = model.cc_config.prompt_format
    fmt = PromptFormat.from_dict(fmt) if isinstance(fmt, dict) else fmt
    encoder = PromptEncoder(tok, fmt)
    assert encoder.mode == "plain"
    items = eval_items(world, world.heldout_entities[:3])
    model.eval()
    for connection in ("none", "english"):
        scored = score_candidates(model, tok, items, connection, batch_size=7)
        for item, result in zip(items, scored):
            expected = []
            for cand in item["candidates"]:
                ex = encoder.encode_example(item["instruction"], cand, item["instruction_en"])
                # p is the ':' ending the plain prompt, the same token in both languages
                assert tok.convert_ids_to_tokens(ex.input_ids[ex.position]) == ":"
                batch = CCCollator(tok.pad_token_id)([ex.features()])
                if connection == "none":
                    batch = {k: v for k, v in batch.items() if not k.startswith("en_")}
                with torch.no_grad():
                    loss = model(**batch).loss  # mean over the response tokens: answer and </s>
                expected.append(float(loss) * 2)
            assert result["nll"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
            best = min(range(len(expected)), key=expected.__getitem__)
            assert result["prediction"] == item["candidates"][best]
            assert result["correct"] == (item["candidates"][best] == item["answer"])
            assert (result["layer"] is None) == (connection == "none")


# -- end to end ----------------------------------------------------------------------------------
def _check_summary(summary: dict, seeds: list[int], items_per_seed: int) -> None:
    assert summary["seeds"] == seeds
    for name in (cell.name for cell in CELLS):
        cell = summary[f"{name}_accuracy"]
        assert cell["per_seed"] == [r["cells"][name]["accuracy"] for r in summary["per_seed"]]
        assert cell["mean"] == pytest.approx(sum(cell["per_seed"]) / len(seeds))
        pooled = cell["pooled"]
        assert pooled["n"] == items_per_seed * len(seeds)
        assert pooled["ci_low"] <= pooled["accuracy"] <= pooled["ci_high"]
        assert (pooled["ci_low"], pooled["ci_high"]) == pytest.approx(
            wilson_interval(pooled["correct"], pooled["n"])
        )


def test_oracle_beats_sft_end_to_end(tmp_path, capsys):
    """A small version of the task: the English oracle must beat SFT on held-out foreign questions
    by a margin whose paired bootstrap interval excludes zero, while SFT stays near chance."""
    flags = ["--seed", "0", "--entities", "32", "--stage1-epochs", "60", "--bootstrap-reps", "400"]
    assert main(["--output", str(tmp_path / "run"), *flags]) == 0  # the command line, as a user runs it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # what it printed last (the Trainer prints its metrics before): summary.md's table, then where the
    # summary is
    printed = capsys.readouterr().out
    assert printed.endswith(summary_markdown(summary) + f"\nsummary: {tmp_path / 'run'}/summary.json\n")
    assert (tmp_path / "run" / "summary.md").read_text() in printed
    _check_summary(summary, [0], items_per_seed=48)
    run = summary["per_seed"][0]
    # stage 1 learned the English facts (at these settings seeds 0-4 reach 65-98%)
    assert summary["stage1_english_accuracy"]["mean"] >= 0.6
    oracle, sft = summary["cc_oracle_accuracy"]["mean"], summary["sft_accuracy"]["mean"]
    assert sft <= 0.4  # the held-out answers are out of reach without the English side (chance 1/6)
    margin = run["margins_over_sft"]["cc_oracle"]
    assert margin["margin"] == pytest.approx(oracle - sft)
    # seeds 1-4 at these settings give margins of 19-46 points, each with an interval above zero
    assert margin["margin"] >= 0.15 and margin["ci_low"] > 0
    assert summary["settings"] == asdict(
        TransferConfig(
            output=str(tmp_path / "run"), seed_list=[0], entities=32, stage1_epochs=60, bootstrap_reps=400
        )
    )
    assert (tmp_path / "run" / "summary.md").read_text().count("\n| ") >= 4
    # the per-item predictions agree with the cell's accuracy
    rows = [json.loads(line) for line in (tmp_path / "run" / "seed-0" / "predictions.jsonl").open()]
    assert sum(r["cc_oracle"]["prediction"] == r["answer"] for r in rows) / len(rows) == oracle


def test_refuses_a_foreign_output_folder(tmp_path):
    (tmp_path / "seed-0").mkdir()
    (tmp_path / "seed-0" / "precious.txt").write_text("keep me")
    with pytest.raises(CCError, match="not written by the transfer task"):
        run_transfer_task(TransferConfig(output=str(tmp_path), seed_list=[0]))
    assert (tmp_path / "seed-0" / "precious.txt").read_text() == "keep me"


# -- the command line ------------------------------------------------------------------------------
PROG_ERROR = "python -m studies.transfer: error: "


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output", "o", "--nonsense"], "unrecognized arguments: --nonsense"),
        (["--output", "o", "--entities", "many"], "--entities"),
        (["--output", "o", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--output", "o", "--relations", "9"], "--relations must be 1..6, got 9"),
        (["--output", "o", "--train-option", "lr=1"], "--train-option lr: set by the transfer task itself"),
        (["--output", "o", "--train-option", "tau"], "--train-option 'tau': expected KEY=VALUE"),
        (["--output", "o", "--fusion", "nope"], "--fusion: expected one of"),
        (["--seed", "1"], "--output is required"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own errors (unknown flag) exit from the parser
        status = stop.code
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith(PROG_ERROR) and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing ran


def test_a_run_error_is_one_line(tmp_path, capsys):
    (tmp_path / "seed-3").mkdir()
    (tmp_path / "seed-3" / "precious.txt").write_text("keep me")
    assert main(["--output", str(tmp_path), "--seed", "3"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == ""
        and err
        == f"{PROG_ERROR}{tmp_path / 'seed-3'} exists and was not written by the "
        "transfer task; choose another --output\n"
    )
    assert (tmp_path / "seed-3" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_runs_as_a_module_from_the_repository_root(tmp_path):
    """``python -m studies.transfer`` from the repository root (not installed: the root is on the path)."""
    proc = subprocess.run(
        [sys.executable, "-m", "studies.transfer", "--output", str(tmp_path / "o"), "--values", "1"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"{PROG_ERROR}--values must be 2..10, got 1\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_default_task_oracle_margin_over_seeds(tmp_path):
    """The default settings (3 seeds): the oracle's margin over SFT has a t-interval above zero."""
    summary = run_transfer_task(TransferConfig(output=str(tmp_path)))
    _check_summary(summary, [0, 1, 2], items_per_seed=72)
    assert summary["margins_over_sft"]["cc_oracle"]["ci_low"] > 0
