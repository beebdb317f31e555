"""The official stochastic layer choice at evaluation (``--sample-layer K``): K seeded Gumbel draws per
item, averaged, checked against scores computed another way."""

import json
import math

import torch

from cctuning.eval.benchmarks import load_benchmark
from cctuning.eval.nll import evaluate_nll, load_items
from cctuning.eval.runner import EvalConfig, evaluate
from cctuning.eval.scoring import score_item
from cctuning.model import CCConfig, CCModel
from cctuning.model.transform import TransformMatrix
from cctuning.testing import tiny_model
from tests.conftest import make_records, write_jsonl


def model_and_data(tokenizer, tmp_path):
    torch.manual_seed(0)
    base = tiny_model("llama", tokenizer=tokenizer)
    cc = CCModel.from_base(base, CCConfig(prompt_format={"mode": "chat"})).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 0.01)  # near-uniform: the draws differ
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size) * 20))
    return cc, write_jsonl(tmp_path / "held.jsonl", make_records(6))


def test_sampled_nll_is_the_mean_over_draws_of_the_fixed_layer_nll(tokenizer, tmp_path):
    cc, data = model_and_data(tokenizer, tmp_path)
    rep = evaluate_nll(
        cc, tokenizer, data, "english", tmp_path / "s", batch_size=3, seed=5, sample_layer=4, progress=False
    )
    items = load_items(tmp_path / "s")
    assert rep["sample_layer"] == 4 and all(len(i["layers"]) == 4 for i in items)
    assert len({layer for i in items for layer in i["layers"]}) > 1  # sampled, not the argmax
    per_layer = {}
    for layer in range(cc.arch.num_layers):  # the same weights, the layer fixed: another path
        fixed = CCModel.from_base(
            cc.base, CCConfig(prompt_format={"mode": "chat"}, layer_choice=f"fixed:{layer}")
        )
        evaluate_nll(fixed.eval(), tokenizer, data, "english", tmp_path / f"f{layer}", progress=False)
        per_layer[layer] = load_items(tmp_path / f"f{layer}")
        fixed.hooks.remove()
    for j, item in enumerate(items):
        expected = sum(per_layer[layer][j]["nll_sum"] for layer in item["layers"]) / 4
        assert math.isclose(item["nll_sum"], expected, rel_tol=1e-5)
        assert item["layer"] == max(set(item["layers"]), key=item["layers"].count)
    again = evaluate_nll(
        cc, tokenizer, data, "english", None, batch_size=3, seed=5, sample_layer=4, progress=False
    )
    assert again["nll"] == rep["nll"]  # seeded
    assert not cc.cc_config.sample_layer and cc.generator is None  # restored: argmax again


def test_sampled_benchmark_scores_are_the_mean_over_the_draws(tokenizer, tmp_path):
    cc, _ = model_and_data(tokenizer, tmp_path)
    folder = tmp_path / "m"
    cc.save_pretrained(folder, tokenizer=tokenizer)
    model = CCModel.from_pretrained(folder)
    cfg = EvalConfig(
        model=str(folder), benchmarks=["XNLI"], langs=["sw"], limit=4, max_new_tokens=3,
        output=str(tmp_path / "ev"), sample_layer=2, seed=1,
    )  # fmt: skip
    res = evaluate(cfg, model, tokenizer, progress=False)
    items = {str(it.id): it for it in load_benchmark("XNLI", "sw", limit=4)}
    per_draw = []
    for draw in range(2):
        rows = [
            json.loads(x)
            for x in (tmp_path / "ev" / "generations" / f"draw-{draw}" / "XNLI" / "sw.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len(rows) == 4
        per_draw.append(sum(score_item(items[str(r["id"])], r["output"])["accuracy"] for r in rows) / 4)
    got = res["benchmarks"]["XNLI"]["per_language"]["sw"]["accuracy"]
    assert math.isclose(got, sum(per_draw) / 2)
    assert res["sample_layer"] == 2
    assert sum(res["layer_choice"]["sw"].values()) == 8  # every draw's layer counts


def test_experiment_cells_take_sample_layer_for_evaluation_only(tmp_path):
    import pytest

    from cctuning.errors import CCError
    from cctuning.lab.experiment import load_config, resolve_cells

    cfg_file = tmp_path / "e.yaml"
    cfg_file.write_text(
        "cells:\n  - {name: cc, method: cc}\n  - {name: cc-sampled, method: cc, sample_layer: 4}\n"
    )
    cells = resolve_cells(load_config(cfg_file))
    assert cells[0].train_name == cells[1].train_name  # one training serves both
    assert (cells[0].sample_layer, cells[1].sample_layer) == (0, 4)
    cfg_file.write_text("cells:\n  - {name: cc, method: cc, sample_layer: -1}\n")
    with pytest.raises(CCError, match="layer draws must be ≥ 0"):
        load_config(cfg_file)
