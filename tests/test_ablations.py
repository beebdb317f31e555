"""Ablation flags change what is injected, exactly as documented."""

import json

import pytest
import torch

from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.model import CCConfig, CCModel
from cctuning.testing import tiny_model
from tests.conftest import flags


def model_with(tokenizer, **kw):
    return CCModel.from_base(tiny_model("llama", tokenizer=tokenizer, num_layers=4), CCConfig(**kw))


def test_each_layer_choice_injects_what_it_says(tokenizer):
    acts = torch.randn(16, 4, 32)
    ids = torch.randint(5, 100, (16, 6))
    pos = torch.full((16,), 5)
    fused, _ = model_with(tokenizer, layer_choice="fixed:2").eval().choose(ids, pos, acts)
    assert torch.equal(fused, acts[:, 2])
    fused, _ = model_with(tokenizer, layer_choice="fixed:-1").eval().choose(ids, pos, acts)
    assert torch.equal(fused, acts[:, 3])
    m = model_with(tokenizer, layer_choice="mean").eval()
    fused, w = m.choose(ids, pos, acts)
    torch.testing.assert_close(fused, acts.mean(1))
    assert m.chosen_layers(w) is None
    m = model_with(tokenizer, layer_choice="random").train()
    m.generator = torch.Generator().manual_seed(0)
    fused, w = m.choose(ids, pos, acts)
    layers = m.chosen_layers(w)
    assert torch.equal(fused, acts[torch.arange(16), layers]) and len(layers.unique()) > 1
    m.generator = torch.Generator().manual_seed(0)
    assert torch.equal(m.chosen_layers(m.choose(ids, pos, acts)[1]), layers)  # seeded
    learned = model_with(tokenizer).eval()
    fused, w = learned.choose(ids, pos, acts)
    emb = learned.base.get_input_embeddings()(ids[:, 5])
    expected = ((acts.mean(1) + emb) @ learned.decision_maker.proj.weight.T).argmax(-1)
    assert torch.equal(learned.chosen_layers(w), expected)
    # the ablations do not train the Decision Maker
    assert not any(
        p.requires_grad for p in model_with(tokenizer, layer_choice="mean").decision_maker.parameters()
    )
    with pytest.raises(CCError, match="unknown layer choice"):
        CCConfig(layer_choice="best")
    with pytest.raises(CCError, match="has 4 layers"):
        model_with(tokenizer, layer_choice="fixed:4")


@pytest.mark.parametrize("inject", [0, 2])
def test_inject_layer_moves_the_fusion(tokenizer, inject):
    cc = model_with(tokenizer, inject_layer=inject).eval()
    ids = torch.randint(5, 100, (1, 8))
    outs = {}
    hs = [
        layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.clone()))
        for i, layer in enumerate(cc.arch.layers)
    ]
    with torch.no_grad():
        cc.base(input_ids=ids)
        plain = dict(outs)
        vec = torch.randn(1, 32)
        with cc.hooks.injecting(torch.tensor([4]), vec):
            cc.base(input_ids=ids)
    for h in hs:
        h.remove()
    for i in range(4):
        if i < inject:
            assert torch.equal(outs[i], plain[i])
        elif i == inject:  # exactly the vector, at p only
            torch.testing.assert_close(
                outs[i] - plain[i],
                torch.zeros_like(plain[i]).index_put((torch.tensor([0]), torch.tensor([4])), vec),
            )
        else:
            assert not torch.allclose(outs[i][0, 4], plain[i][0, 4])


def test_train_with_fixed_layer_logs_that_layer(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "fixed"
    assert (
        main(
            [
                "train",
                *flags(
                    model=base_dir,
                    data=data_file,
                    output=out,
                    max_steps="2",
                    batch_size="4",
                    layer_choice="fixed:1",
                ),
            ]
        )
        == 0
    )
    assert json.loads((out / "cctuning_config.json").read_text())["layer_choice"] == "fixed:1"
    assert json.loads((out / "layer_choice.json").read_text())["counts"] == [0, 8, 0]
    loaded = CCModel.from_pretrained(out)
    assert loaded.layer_rule == ("fixed", 1)
    assert (
        main(["train", *flags(model=base_dir, data=data_file, output=tmp_path / "x", layer_choice="fixed:x")])
        == 2
    )
    assert "unknown layer choice" in capsys.readouterr().err
