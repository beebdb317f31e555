"""`cctuning report`'s diagnostics: every plotted number equals one computed here another way.

The plot functions return what they drew, read back from the figure's artists; the tests compare
that with hand computations (forward hooks written here, numpy statistics, hand-made training logs,
``paired_difference`` called directly).
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from cctuning.data.encoding import PromptEncoder
from cctuning.errors import CCError
from cctuning.eval.nll import NLL_ITEMS_NAME, NLL_NAME, evaluate_nll, load_items, paired_difference, summarize
from cctuning.inference import TransformMatrix
from cctuning.lab import diagnostics
from cctuning.lab.plots import plot_connection_gain, plot_norms, plot_training_choices
from cctuning.lab.report import add_arguments, build_report, build_report_from_args
from cctuning.model import CCConfig, CCModel
from cctuning.testing import tiny_model
from tests.conftest import make_records, write_jsonl

CLOSE = dict(rel=1e-4, abs=1e-6)


def hand_stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": v.mean(),
        "std": v.std(ddof=1),
        "p10": np.percentile(v, 10),
        "median": np.percentile(v, 50),
        "p90": np.percentile(v, 90),
    }


def hand_pass(model, tokenizer, text, inject_layer):
    """``f_l[p]`` (L, d) and ``h_k[p]`` (d,) of one unpadded prompt, with hooks written here."""
    enc = PromptEncoder(tokenizer, model.cc_config.prompt_format).encode_prompt(text)
    store = {}
    arch = model.arch
    handles = [
        m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o))
        for i, m in enumerate(arch.ffn)
    ]
    handles.append(
        arch.layers[inject_layer].register_forward_hook(lambda mod, a, o: store.__setitem__("h", o))
    )
    with torch.no_grad():
        model.base(input_ids=torch.tensor([enc.ids]))
    for h in handles:
        h.remove()
    h = store["h"][0] if isinstance(store["h"], tuple) else store["h"]
    acts = torch.stack([store[i][0, enc.position] for i in range(arch.num_layers)])
    return acts.float(), h[0, enc.position].float()


def make_cc(tokenizer, **config):
    torch.manual_seed(0)
    cc = CCModel.from_base(
        tiny_model("llama", tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"}, **config)
    ).eval()
    d = cc.arch.hidden_size
    cc.set_transform(TransformMatrix(torch.eye(d) * 3 + torch.randn(d, d)))
    return cc


def assert_stats(got: dict, values) -> None:
    want = hand_stats(values)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, **CLOSE), key


# -- 1. injected vector vs residual -----------------------------------------------------------------
def test_connection_norms_equal_hooks_and_the_plot_draws_them(tokenizer, tmp_path):
    cc = make_cc(tokenizer)
    rows = make_records(7)
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    m = diagnostics.connection_norms(cc, tokenizer, data, samples=100, batch_size=3)  # padded batches
    assert list(m["connections"]) == ["english", "transform"]
    assert m["samples"] == 7 and m["inject_layer"] == 0 and m["fusion"] == "add"
    assert m["languages"] == {"ar": 2, "hi": 1, "sw": 2, "zh": 2}
    own = [hand_pass(cc, tokenizer, r["instruction"], 0) for r in rows]
    eng = [hand_pass(cc, tokenizer, r["instruction_en"], 0)[0] for r in rows]
    residual = [float(h.norm()) for _, h in own]
    assert_stats(m["residual"], residual)
    vectors = {"english": eng, "transform": [acts @ cc.transform.matrix for acts, _ in own]}
    L = cc.arch.num_layers
    for name, vecs in vectors.items():
        entry = m["connections"][name]
        assert len(entry["vector"]) == L and "added" not in entry  # add: the vector is what is added
        for layer in range(L):
            norms = [float(v[layer].norm()) for v in vecs]
            assert_stats(entry["vector"][layer], norms)
            assert_stats(entry["ratio"][layer], [a / b for a, b in zip(norms, residual)])
    json.dumps(m)  # JSON-serialisable as it is

    shown = plot_norms(m, tmp_path / "norms.png")
    top, bottom = shown.values()
    assert top["yscale"] == "log" and bottom["yscale"] == "log"
    assert top["lines"]["‖h_0[p]‖ residual"]["y"] == pytest.approx([np.mean(residual)] * L, **CLOSE)
    assert 1.0 in bottom["hlines"]
    for name, vecs in vectors.items():
        assert top["lines"][f"‖c‖ {name}"]["x"] == list(range(L))
        assert top["lines"][f"‖c‖ {name}"]["y"] == pytest.approx(
            [np.mean([float(v[k].norm()) for v in vecs]) for k in range(L)], **CLOSE
        )
        ratios = [np.median([float(v[k].norm()) / r for v, r in zip(vecs, residual)]) for k in range(L)]
        assert bottom["lines"][name]["y"] == pytest.approx(ratios, **CLOSE)
    assert (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"


def test_connection_norms_after_another_layer_with_gated_and_scaled_fusion(tokenizer):
    rows = make_records(5)
    gates = torch.tensor([0.5, -2.0, 0.25])
    cc = make_cc(tokenizer, inject_layer=1, fusion="gated")
    with torch.no_grad():
        cc.fusion.gate.copy_(gates)
    m = diagnostics.connection_norms(cc, tokenizer, rows, connection="english", batch_size=2)
    own = [hand_pass(cc, tokenizer, r["instruction"], 1) for r in rows]
    eng = [hand_pass(cc, tokenizer, r["instruction_en"], 1)[0] for r in rows]
    assert list(m["connections"]) == ["english"] and m["inject_layer"] == 1
    assert_stats(m["residual"], [float(h.norm()) for _, h in own])
    for layer in range(3):  # gated: g_l · c
        assert_stats(
            m["connections"]["english"]["added"][layer],
            [abs(float(gates[layer])) * float(v[layer].norm()) for v in eng],
        )
    assert torch.equal(cc.fusion.gate, gates)  # the model's own fusion is left alone
    cc = make_cc(tokenizer, fusion="scaled")
    m = diagnostics.connection_norms(cc, tokenizer, rows, connection="transform")
    residual = [float(h.norm()) for _, h in (hand_pass(cc, tokenizer, r["instruction"], 0) for r in rows)]
    for layer in range(3):  # scaled: c rescaled to the residual's RMS, so its norm is the residual's
        assert_stats(m["connections"]["transform"]["added"][layer], residual)


def test_connection_norms_of_a_bilingual_prompt_model_read_its_inference_prompt(tokenizer):
    """A model trained with --augment bilingual-prompt is measured on the prompt it is given at
    inference (the English, then the non-English instruction), computed here by hand."""
    from cctuning.data.augment import bilingual_instruction

    rows = make_records(4)
    cc = make_cc(tokenizer, augment="bilingual-prompt")
    m = diagnostics.connection_norms(cc, tokenizer, rows, connection="transform")
    prompts = [bilingual_instruction(r["instruction"], r["instruction_en"]) for r in rows]
    own = [hand_pass(cc, tokenizer, p, 0) for p in prompts]
    assert_stats(m["residual"], [float(h.norm()) for _, h in own])
    alone = [hand_pass(cc, tokenizer, r["instruction"], 0) for r in rows]
    assert [float(h.norm()) for _, h in alone] != [float(h.norm()) for _, h in own]  # it can fail
    assert m["augment"] == "bilingual-prompt" and m["prompts_without_english"] == 0


def test_connection_norms_sampling_and_errors(tokenizer, tmp_path):
    cc = make_cc(tokenizer)
    rows = make_records(9)
    m = diagnostics.connection_norms(cc, tokenizer, rows, connection="transform", samples=4, seed=3)
    assert m["samples"] == 4 and sum(m["languages"].values()) == 4
    again = diagnostics.connection_norms(cc, tokenizer, rows, connection="transform", samples=4, seed=3)
    assert again == m  # seeded
    with pytest.raises(CCError, match="injects nothing"):
        diagnostics.connection_norms(cc, tokenizer, rows, connection="none")
    no_en = [{k: v for k, v in r.items() if k != "instruction_en"} for r in rows]
    assert list(diagnostics.connection_norms(cc, tokenizer, no_en)["connections"]) == ["transform"]
    with pytest.raises(CCError, match="instruction_en"):
        diagnostics.connection_norms(cc, tokenizer, no_en, connection="english")
    sft = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig(method="sft"))
    with pytest.raises(CCError, match="CC-Tuning model"):
        diagnostics.connection_norms(sft, tokenizer, rows)


def test_report_norms_option_writes_what_it_measures(tokenizer, tmp_path):
    cc = make_cc(tokenizer)
    folder = tmp_path / "cc"
    cc.save_pretrained(folder, tokenizer=tokenizer)
    data = write_jsonl(tmp_path / "held.jsonl", make_records(6))
    table, png = build_report([], tmp_path / "rep", norms=folder, data=data, samples=5)
    assert png == tmp_path / "rep" / "norms.png" and png.read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "rep" / "norms.json").read_text())
    direct = diagnostics.connection_norms(cc, tokenizer, data, samples=5)
    assert written["model"] == str(folder) and written["data"] == str(data)
    for name in ("english", "transform"):
        for got, want in zip(written["connections"][name]["vector"], direct["connections"][name]["vector"]):
            assert got == pytest.approx(want, **CLOSE)
    assert "connection norms" in table and "| 2 |" in table
    # the command line's options (cctuning report ... --norms ...)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--output", str(tmp_path / "cli"), "--norms", str(folder), "--data", str(data)]
        + ["--samples", "3", "--norms-connection", "english"]
    )
    build_report_from_args(args)
    cli = json.loads((tmp_path / "cli" / "norms.json").read_text())
    assert list(cli["connections"]) == ["english"] and cli["samples"] == 3
    with pytest.raises(CCError, match="--data"):
        build_report([], tmp_path / "rep", norms=folder)
    with pytest.raises(CCError, match="at least one"):
        build_report([], tmp_path / "rep")


# -- 2. the Decision Maker over training ------------------------------------------------------------
def write_state(folder, step, log):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))


def test_training_choices_read_the_newest_state_and_are_plotted(tmp_path):
    run = tmp_path / "cc-run"
    log = [
        {"loss": 3.0, "step": 5, "layer_top": 2, "layer_entropy": 1.9},
        {"loss": 2.5, "step": 10, "layer_top": 2, "layer_entropy": 1.2},
        {"loss": 2.1, "step": 15, "layer_top": 0, "layer_entropy": 0.6},
        {"loss": 2.0, "step": 20},  # a log window without choices
        {"train_loss": 2.4, "step": 20},
    ]
    write_state(run / "checkpoint-10", 10, log[:2])
    write_state(run / "checkpoint-20", 20, log)
    write_state(run / "checkpoint-9", 9, [{"step": 9, "layer_top": 1, "layer_entropy": 0.0}])
    (run / "checkpoint-20" / "cctuning_config.json").write_text(json.dumps({"num_layers": 4}))
    (run / "layer_choice.json").write_text(json.dumps({"counts": [3, 0, 5, 2], "steps": 20}))
    c = diagnostics.training_choices(run)
    assert c["trainer_state"] == str(run / "checkpoint-20" / "trainer_state.json")
    assert c["steps"] == [5, 10, 15] and c["layer_top"] == [2, 2, 0] and c["layer_entropy"] == [1.9, 1.2, 0.6]
    assert c["num_layers"] == 4 and c["max_entropy_bits"] == 2.0
    assert c["share"] == [0.3, 0.0, 0.5, 0.2] and c["windows"] == []

    table, png = build_report([str(run)], tmp_path / "rep")
    assert png.name == "training_choices.png" and png.read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "rep" / "training_choices.json").read_text())
    assert written["runs"]["cc-run"] == c
    assert "| cc-run | 3 | 1.90 | 0.60 | 2.00 | 0 | 2 (50%) |" in table

    entropy, top, share = plot_training_choices({"cc-run": c}, tmp_path / "t.png").values()
    assert entropy["lines"]["entropy"] == {"x": [5.0, 10.0, 15.0], "y": [1.9, 1.2, 0.6]}
    assert sorted(entropy["hlines"]) == [0.0, 2.0]  # no choice .. uniform over 4 layers
    assert top["lines"]["top layer"] == {"x": [5.0, 10.0, 15.0], "y": [2.0, 2.0, 0.0]}
    bars = share["bars"]["whole run"]
    assert bars["x"] == [0.0, 1.0, 2.0, 3.0] and bars["height"] == pytest.approx([0.3, 0.0, 0.5, 0.2])


def test_training_choices_window_distribution_and_missing_parts(tmp_path):
    run = tmp_path / "run"
    log = [
        {"step": 2, "layer_top": 1, "layer_entropy": 0.9, "layer_counts": [1, 3, 0]},
        {"step": 4, "layer_top": 0, "layer_entropy": 0.0, "layer_counts": [4, 0, 0]},
    ]
    write_state(run, 4, log)  # the run folder's own state; no layer_choice.json anywhere
    c = diagnostics.training_choices(run)
    assert c["counts"] is None and c["share"] is None and c["num_layers"] == 3
    assert c["windows"] == [{"step": 2, "share": [0.25, 0.75, 0.0]}, {"step": 4, "share": [1.0, 0.0, 0.0]}]
    _, top, share = plot_training_choices({"run": c}, tmp_path / "t.png").values()
    (image,) = top["images"]
    assert image == [[0.25, 1.0], [0.75, 0.0], [0.0, 0.0]]  # rows: layers, columns: log windows
    assert top["lines"]["top layer"]["y"] == [1.0, 0.0] and share["bars"] == {}
    # counts only from train_results.json
    (run / "trainer_state.json").unlink()
    (run / "train_results.json").write_text(json.dumps({"layer_choice_counts": [0, 2, 2]}))
    assert not diagnostics.is_training_run(run)
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "layer_choice.json").write_text(json.dumps({"counts": [1, 1, 1]}))
    c = diagnostics.training_choices(run)
    assert c["share"] == [0.0, 0.5, 0.5] and c["steps"] == [] and c["trainer_state"] is None
    plot_training_choices({"run": c}, tmp_path / "t.png")
    with pytest.raises(CCError, match="trainer_state.json"):
        diagnostics.training_choices(tmp_path / "empty")


# -- 3. the connection's gain per language ---------------------------------------------------------
def write_nll_run(folder, items, connection, model="m", data="held.jsonl"):
    folder.mkdir(parents=True)
    (folder / NLL_ITEMS_NAME).write_text("".join(json.dumps(i) + "\n" for i in items))
    report = {"data": data, "connection": connection, "method": "cc", "model": model, "num_layers": 3}
    (folder / NLL_NAME).write_text(json.dumps({**report, "nll": summarize(items, reps=50)}))


def test_connection_gain_equals_paired_difference_and_its_sign(tmp_path):
    rng = np.random.default_rng(0)
    base, connected = [], []
    for line in range(1, 21):
        lang = ("sw", "zh")[line % 2]
        tokens = int(rng.integers(3, 9))
        nll = float(rng.uniform(1, 3)) * tokens
        base.append({"line": line, "lang": lang, "nll_sum": nll, "tokens": tokens, "layer": None})
        better = 0.8 if lang == "sw" else 1.1  # the connection helps sw, hurts zh
        connected.append({"line": line, "lang": lang, "nll_sum": nll * better, "tokens": tokens, "layer": 1})
    write_nll_run(tmp_path / "none", base, "none")
    write_nll_run(tmp_path / "tr", connected, "transform")
    write_nll_run(tmp_path / "other", connected, "english", model="another model")  # no partner
    table, _ = build_report(
        [str(tmp_path / "none"), str(tmp_path / "tr"), str(tmp_path / "other")], tmp_path / "rep"
    )
    gain = json.loads((tmp_path / "rep" / "connection_gain.json").read_text())
    assert "negative: the connection helps" in gain["sign"]
    (pair,) = gain["pairs"]
    assert pair["connection"] == "transform" and pair["without"] == str(tmp_path / "none")
    direct = paired_difference(connected, base)  # with minus without
    assert pair["per_language"] == direct
    for lang, sign in (("sw", -1), ("zh", 1)):
        rows = [(c, b) for c, b in zip(connected, base) if c["lang"] == lang]
        tokens = sum(b["tokens"] for _, b in rows)
        by_hand = (sum(c["nll_sum"] for c, _ in rows) - sum(b["nll_sum"] for _, b in rows)) / tokens
        assert pair["per_language"][lang]["diff"] == pytest.approx(by_hand, rel=1e-12)
        assert math.copysign(1, by_hand) == sign
    assert "connection gain" in table and "negative: the connection helps" in table

    (shown,) = plot_connection_gain(gain, tmp_path / "g.png").values()
    bars = shown["bars"][pair["label"]]
    langs = list(direct)
    assert langs == ["sw", "zh", "all"]
    assert bars["x"] == pytest.approx([0, 1, 2]) and shown["hlines"] == [0.0]
    assert bars["height"] == pytest.approx([direct[k]["diff"] for k in langs], rel=1e-12)
    ends = [end for pair_ends in bars["err"] for end in pair_ends]
    assert ends == pytest.approx([direct[k][e] for k in langs for e in ("ci_low", "ci_high")], rel=1e-9)


def test_connection_gain_on_real_nll_runs(tokenizer, tmp_path):
    cc = make_cc(tokenizer)
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
    data = write_jsonl(tmp_path / "held.jsonl", make_records(6))
    for connection in ("none", "transform", "english"):
        evaluate_nll(cc, tokenizer, data, connection, tmp_path / connection, batch_size=3, progress=False,
                     model_name="tiny", reps=50)  # fmt: skip
    build_report([str(tmp_path / c) for c in ("transform", "none", "english")], tmp_path / "rep")
    gain = json.loads((tmp_path / "rep" / "connection_gain.json").read_text())
    assert [p["connection"] for p in gain["pairs"]] == ["transform", "english"]
    for pair in gain["pairs"]:
        assert pair["per_language"] == paired_difference(
            load_items(tmp_path / pair["connection"]), load_items(tmp_path / "none")
        )
        assert pair["per_language"]["all"]["diff"] != 0
