"""The transfer study's understood world and data-level cells (studies/transfer/, docs/transfer.md):
no held-out evaluated fact in foreign form anywhere, the Transform Matrix's data holds no evaluation
question, the data-level trainings see exactly ``augment_records`` of the stage-2 records, the
bilingual cells' prompts are the package's, and a small end-to-end run's summary."""

import json

import pytest
import torch

from cctuning.data.augment import augment_records, bilingual_instruction, inference_records
from cctuning.data.encoding import PromptEncoder
from cctuning.data.records import load_records
from cctuning.errors import CCError
from cctuning.loading import load_for_inference
from cctuning.model.ccmodel import CCConfig, CCModel
from studies.transfer.config import CELLS, TRAININGS, TransferConfig
from studies.transfer.matrix_check import main as matrix_check_main
from studies.transfer.matrix_check import seed_check
from studies.transfer.merge import merge
from studies.transfer.probes import prompt_hidden_states
from studies.transfer.reprobe import main as reprobe_main
from studies.transfer.run import run_transfer_task
from studies.transfer.scoring import _prompt_format, prompt_instruction, score_candidates
from studies.transfer.world import (
    CONTEXT_RELATIONS,
    FOREIGN_FUNCTION,
    FOREIGN_LANG,
    build_model,
    build_tokenizer,
    build_world,
    eval_items,
    matrix_records,
    stage1_records,
    stage2_records,
)

ENTITIES = 16


@pytest.fixture(scope="module")
def world():
    return build_world(TransferConfig(world="understood", entities=40, values=5), seed=7)


def _words(row: dict) -> set[str]:
    return set(row["instruction"].split()) | set((row.get("instruction_en") or "").split())


def _all_records(world) -> dict[str, list[dict]]:
    return {
        "stage1": stage1_records(world),
        "stage2": stage2_records(world, english_replay=True, context=True),
        "matrix": matrix_records(world),
    }


# -- the understood world's records -----------------------------------------------------------------
def test_heldout_evaluated_facts_never_in_foreign_form(world):
    """A held-out entity's name (either language) with an evaluated relation's word (either language)
    only in an English record: its English name and the English relation, no foreign word."""
    held = {world.foreign_names[e] for e in world.heldout_entities}
    held |= {world.english_names[e] for e in world.heldout_entities}
    evaluated = set(world.relations) | set(world.foreign_relations)
    foreign = set(world.foreign_names) | set(world.foreign_relations) | set(world.foreign_context_relations)
    foreign |= set(FOREIGN_FUNCTION.values())
    assert world.context_relations == list(CONTEXT_RELATIONS)[:6]  # the default --context-relations
    langs = set()
    for name, rows in _all_records(world).items():
        for row in rows:
            langs.add(row["lang"])
            words = _words(row)
            if words & held and words & evaluated:
                assert row["lang"] == "en" and not words & foreign, (name, row)
    assert langs == {"en", "dict", "cs", FOREIGN_LANG}
    # the code-switched records: every entity, every context relation, both directions
    switched = [r for r in stage1_records(world) if r["lang"] == "cs"]
    assert len(switched) == 40 * 6 * 2


def test_matrix_data_holds_no_evaluation_question(world):
    held = eval_items(world, world.heldout_entities)
    rows = matrix_records(world)
    assert {r["instruction"] for r in rows}.isdisjoint(it["instruction"] for it in held)
    assert {r["instruction_en"] for r in rows}.isdisjoint(it["instruction_en"] for it in held)
    # every row a parallel pair: the training entities' questions and every entity's context questions
    assert all(r["lang"] == FOREIGN_LANG and r["instruction"] != r["instruction_en"] for r in rows)
    assert len(rows) == len(world.train_entities) * 3 + 40 * 6
    # the default world's matrix data is the foreign stage-2 records, as before
    default = build_world(TransferConfig(entities=40, values=5), seed=7)
    assert matrix_records(default) == [r for r in stage2_records(default, True) if r["lang"] == FOREIGN_LANG]


def test_context_sentences_name_every_heldout_entity_in_foreign(world):
    held_foreign = {world.foreign_names[e] for e in world.heldout_entities}
    context = set(world.foreign_context_relations)
    for name, rows in _all_records(world).items():
        named = {
            w
            for r in rows
            if r["lang"] == FOREIGN_LANG and set(r["instruction"].split()) & context
            for w in r["instruction"].split()
        }
        assert held_foreign <= named, name
    # without the stage-2 rehearsal no held-out foreign name is in stage 2
    rows = stage2_records(world, english_replay=True, context=False)
    assert not {w for r in rows for w in _words(r)} & held_foreign


def _assert_word_for_word(world, rows: list[dict]) -> None:
    """Every instruction tokenises to one known token a word under the world's tokenizer."""
    tok = build_tokenizer(world)
    for row in rows:
        ids = tok(row["instruction"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == len(row["instruction"].split()), row


def test_default_world_is_unchanged_by_the_understood_options():
    default = build_world(TransferConfig(entities=30), 3)
    assert default.context_relations == [] and default.context_facts == {}
    understood = build_world(TransferConfig(entities=30, world="understood"), 3)
    assert len(understood.context_relations) == 6 and len(understood.context_facts) == 30 * 6
    _assert_word_for_word(understood, stage1_records(understood) + stage2_records(understood, True, True))


def test_more_context_relations_only_add_to_the_world():
    """--context-relations 12 draws the six-relation world's names, evaluated facts and splits
    unchanged, then twelve context relations (the first six the same words; their facts are drawn
    entity by entity, so they differ); every record still tokenises word for word, and no name is a
    context word."""
    six = build_world(TransferConfig(entities=40, world="understood"), 5)
    twelve = build_world(TransferConfig(entities=40, world="understood", context_relations=12), 5)
    for key in ("english_names", "foreign_names", "facts", "train_entities", "heldout_entities"):
        assert getattr(six, key) == getattr(twelve, key), key
    assert twelve.context_relations[:6] == six.context_relations and len(twelve.context_relations) == 12
    assert twelve.foreign_context_relations[:6] == six.foreign_context_relations
    assert set(twelve.context_facts) == {(e, c) for e in range(40) for c in range(12)}
    words = {w for rel in twelve.context_relations for w in [rel, *twelve.answers[rel]]}
    assert not words & (set(twelve.english_names) | set(twelve.foreign_names))
    assert len(twelve.vocabulary()) == len(set(twelve.vocabulary()))
    _assert_word_for_word(twelve, stage1_records(twelve))
    with pytest.raises(CCError, match="context-relations must be 1..12"):
        TransferConfig(world="understood", context_relations=13, output="x").check()


# -- the data-level cells ----------------------------------------------------------------------------
def test_bilingual_prompts_are_the_packages(world):
    items = eval_items(world, world.heldout_entities[:4])
    for item in items:
        given = prompt_instruction(item, "bilingual-prompt")
        assert given == bilingual_instruction(item["instruction"], item["instruction_en"])
        assert given.startswith(item["instruction_en"]) and given.endswith(item["instruction"])
        assert prompt_instruction(item, "bilingual-prompt", withhold_english=True) == item["instruction"]
        assert prompt_instruction(item, "none") == item["instruction"]
        assert prompt_instruction(item, "english-prompt") == item["instruction"]
    cells = {c.name: c for c in CELLS}
    assert cells["bilingual_prompt"].method == cells["bilingual_prompt_withheld"].method == "bilingual_prompt"
    assert (
        not cells["bilingual_prompt"].withhold_english and cells["bilingual_prompt_withheld"].withhold_english
    )
    assert TRAININGS["english_prompt"].same_steps_as == "sft"


def test_scoring_uses_the_saved_augment(world):
    """A bilingual-prompt model's scores are those of the bilingual prompt (English given) or of the
    foreign question alone (withheld), through the same item_nll path."""
    tok = build_tokenizer(world)
    torch.manual_seed(0)
    model = CCModel(
        build_model(TransferConfig(hidden_size=32, layers=2), len(tok), 0), CCConfig(method="sft")
    )
    items = eval_items(world, world.heldout_entities[:3])
    plain = score_candidates(model, tok, items, "none", 8)
    bilingual = [
        {**it, "instruction": bilingual_instruction(it["instruction"], it["instruction_en"])} for it in items
    ]
    by_hand = score_candidates(model, tok, bilingual, "none", 8)
    model.cc_config.augment = "bilingual-prompt"
    given = score_candidates(model, tok, items, "none", 8)
    withheld = score_candidates(model, tok, items, "none", 8, withhold_english=True)

    def flat(rows):
        return [x for r in rows for x in r["nll"]]

    assert flat(given) == pytest.approx(flat(by_hand))
    assert flat(withheld) == pytest.approx(flat(plain))
    assert flat(given) != pytest.approx(flat(plain))


# -- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def understood_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("understood")
    cfg = TransferConfig(
        output=str(out),
        world="understood",
        seed_list=[0],
        entities=ENTITIES,
        stage1_epochs=15,
        stage2_epochs=3,
        bootstrap_reps=100,
    )
    return out, run_transfer_task(cfg)


def test_understood_summary_structure(understood_run):
    out, summary = understood_run
    assert summary["world"] == "understood"
    for cell in CELLS:
        acc = summary[f"{cell.name}_accuracy"]
        assert acc["pooled"]["n"] == ENTITIES // 2 * 3 and acc["method"] == cell.method
        if cell.name != "sft":
            assert summary["margins_over_sft"][cell.name]["per_seed"][0]["n"] == ENTITIES // 2 * 3
    probes = summary["entity_probe"]
    assert set(probes) == {"stage1", "cc", "sft"} and probes["stage1"]["classes"] == ENTITIES // 2
    hidden = {"foreign_hidden", "english_hidden"}
    for model, keys in (("stage1", {"foreign", "english"}), ("cc", {"foreign", "english", "transformed"})):
        rows = probes[model]["per_layer"]
        assert len(rows) == 4 and all(set(r) == keys | hidden | {"layer"} for r in rows)
        assert probes[model]["best_foreign"]["mean"] == max(r["foreign"] for r in rows)
        assert probes[model]["best_foreign_hidden"]["mean"] == max(r["foreign_hidden"] for r in rows)
    checks = summary["checks"]
    assert checks["entity_probe_at_least_80"] == (checks["entity_probe_cc_best_foreign"] >= 0.8)
    assert checks["entity_probe_hidden_at_least_80"] == (checks["entity_probe_cc_best_foreign_hidden"] >= 0.8)
    assert checks["sft_at_most_40"] == (summary["sft_accuracy"]["mean"] <= 0.4)
    assert "Entity probe" in (out / "summary.md").read_text()


def test_data_level_trainings_see_augment_records(understood_run):
    out, summary = understood_run
    seed = out / "seed-0"
    records = load_records(seed / "stage2.jsonl")
    trainings = summary["stage2_trainings"]
    assert trainings["english_prompt"]["steps"] == trainings["sft"]["steps"]  # the same optimizer steps
    for name, spec in TRAININGS.items():
        results = json.loads((seed / name / "train_results.json").read_text())
        assert results["config"]["augment"] == spec.augment and results["config"]["method"] == spec.method
        assert results["config"]["data"] == str(seed / "stage2.jsonl")
        expected = augment_records(records, spec.augment)
        assert results["examples"] == len(expected) == trainings[name]["examples"][0]
        saved = json.loads((seed / name / "cctuning_config.json").read_text())
        assert saved["augment"] == spec.augment  # what scoring reads to build the prompts
    english = augment_records(records, "english-prompt")
    foreign = [r for r in records if r.lang == FOREIGN_LANG]
    assert len(english) == len(records) + len(foreign)
    bilingual = augment_records(records, "bilingual-prompt")
    assert [r.instruction for r in bilingual if r.lang == FOREIGN_LANG] == [
        bilingual_instruction(r.instruction, r.instruction_en) for r in foreign
    ]
    # the package's own inference prompts for these records are the same as the study's
    prompted, fallbacks = inference_records(foreign, "bilingual-prompt", "test")
    assert fallbacks == 0
    assert [r.instruction for r in prompted] == [
        prompt_instruction(
            {"instruction": r.instruction, "instruction_en": r.instruction_en}, "bilingual-prompt"
        )
        for r in foreign
    ]
    # the matrix was fitted on no evaluation question
    held = {json.loads(line)["instruction"] for line in (seed / "heldout.jsonl").open()}
    assert not held & {json.loads(line)["instruction"] for line in (seed / "matrix.jsonl").open()}


def test_compare_reproduces_the_margins_over_sft(understood_run):
    from studies.transfer.compare import compare  # deferred: only this test needs the post-hoc tool

    out, summary = understood_run
    result = compare(out, "cc_oracle", ["sft", "bilingual_prompt"], reps=100)
    assert result["over"]["sft"]["per_seed"] == summary["margins_over_sft"]["cc_oracle"]["per_seed"]
    oracle = summary["cc_oracle_accuracy"]["mean"]
    assert result["over"]["bilingual_prompt"]["mean"] == pytest.approx(
        oracle - summary["bilingual_prompt_accuracy"]["mean"]
    )


def test_hidden_state_probe_reads_the_unpadded_hidden_states(understood_run):
    """The batched, left-padded hidden states at p equal each prompt's own forward, unpadded."""
    out, _ = understood_run
    model, tok, _ = load_for_inference(str(out / "seed-0" / "cc"))
    texts = [r.instruction for r in load_records(out / "seed-0" / "stage2.jsonl")[:5]]
    texts.append(texts[0] + " " + texts[1])  # a longer prompt, so the batch is padded
    encoder = PromptEncoder(tok, _prompt_format(model))
    with torch.no_grad():
        batched = prompt_hidden_states(model, encoder, texts, 4, tok.pad_token_id)
        for i, text in enumerate(texts):
            enc = encoder.encode_prompt(text)
            states = model.arch.decoder(
                input_ids=torch.tensor([enc.ids]), output_hidden_states=True, use_cache=False
            ).hidden_states
            expected = torch.stack([h[0, enc.position] for h in states[1:]])
            torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=1e-4)


def test_merge_pools_one_seed_runs_and_refuses_mixed_settings(understood_run, tmp_path):
    """studies.transfer.merge: two one-seed runs give the summary of both seeds (pooled counts add,
    the mean over seeds is the mean of the two); different settings or a repeated seed are refused."""
    out, summary = understood_run
    second = json.loads((out / "summary.json").read_text())
    for run in second["per_seed"]:
        run["seed"] = 7
    other = tmp_path / "seed7"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(second))
    merged = merge([out, other], tmp_path / "merged")
    assert merged["seeds"] == [0, 7]
    one = summary["sft_accuracy"]
    assert merged["sft_accuracy"]["pooled"]["n"] == 2 * one["pooled"]["n"]
    assert merged["sft_accuracy"]["mean"] == pytest.approx(one["mean"])
    with pytest.raises(ValueError, match="repeated seeds"):
        merge([out, out], tmp_path / "again")
    second["settings"]["hidden_size"] = 256
    (other / "summary.json").write_text(json.dumps(second))
    with pytest.raises(ValueError, match="hidden_size"):
        merge([out, other], tmp_path / "mixed")


def test_matrix_check_reproduces_the_runs_transform_cell(understood_run):
    """studies.transfer.matrix_check's ``as_run`` refit gives the run's own cc_transform accuracy;
    the in-sample fit adds exactly the held-out evaluation pairs."""
    out, summary = understood_run
    check = seed_check(out / "seed-0", 0)
    assert check["as_run"]["accuracy"] == pytest.approx(summary["cc_transform_accuracy"]["mean"])
    held = sum(1 for _ in (out / "seed-0" / "heldout.jsonl").open())
    assert check["with_heldout_pairs"]["pairs"] == check["as_run"]["pairs"] + held
    assert check["per_layer"]["fit"]["per_layer"] and not check["as_run"]["fit"]["per_layer"]


@pytest.mark.parametrize("module", [reprobe_main, matrix_check_main])
def test_diagnostics_refuse_bad_folders_and_existing_outputs_in_one_line(module, tmp_path, capsys):
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    for argv, said in (
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "new.json")], "not a finished run"),
        ([str(tmp_path), "--out", str(existing)], "exists; give a new file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            module(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and said in err and len(err.strip().splitlines()) == 1
    assert existing.read_text() == "{}" and not (tmp_path / "new.json").exists()
