"""The mechanism, checked against values computed another way (tiny random models, 4 architectures)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import IGNORE_INDEX, PromptEncoder
from cctuning.errors import CCError
from cctuning.model import CCConfig, CCModel, locate
from cctuning.model.ccmodel import positions_from_mask
from cctuning.model.connection import connected_forward, injected, prefill_to_connection
from cctuning.testing import tiny_model

PAIRS = [
    ("Habari ya asubuhi, rafiki yangu?", "Nzuri sana.", "Good morning, my friend?"),
    ("请回答下面的问题。", "今天天气很好。", "Please answer the question below."),
    ("ما هي عاصمة مصر؟", "القاهرة هي العاصمة.", "What is the capital of Egypt?"),
]


def batch_for(tokenizer, side="right", pairs=PAIRS):
    enc = PromptEncoder(tokenizer)
    return CCCollator(tokenizer.pad_token_id, side)([enc.encode_example(*p).features() for p in pairs])


def residual_before_ffn(layer, arch_name):
    """The module whose *input* is the residual stream that the FFN output is added to."""
    return layer.pre_feedforward_layernorm if arch_name == "gemma3_text" else layer.post_attention_layernorm


def test_captured_activation_is_the_ffn_output_at_p(tokenizer, arch):
    model = tiny_model(arch, tokenizer=tokenizer)
    cc = CCModel.from_base(model, CCConfig())
    b = batch_for(tokenizer, "left")
    layers = cc.arch.layers
    resid, outs, mlp_in = {}, {}, {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(
            residual_before_ffn(layer, arch).register_forward_pre_hook(
                lambda m, a, i=i: resid.__setitem__(i, a[0])
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)
            )
        )
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlp_in.__setitem__(i, a[0])))
    acts = cc.collect_activations(b["input_ids"], b["attention_mask"], b["cc_position"])
    for h in handles:
        h.remove()
    rows = torch.arange(len(PAIRS))
    p = b["cc_position"]
    assert acts.shape == (3, cc.arch.num_layers, cc.arch.hidden_size)
    for i, layer in enumerate(layers):
        # layer output = residual + FFN output, so the FFN output is their difference
        expected = outs[i][rows, p] - resid[i][rows, p]
        torch.testing.assert_close(acts[:, i], expected, atol=1e-5, rtol=1e-4)
        # and the MLP recomputed by hand from its weights
        x = mlp_in[i][rows, p]
        mlp = layer.mlp
        act = (
            F.gelu(x @ mlp.gate_proj.weight.T, approximate="tanh")
            if arch == "gemma3_text"
            else F.silu(x @ mlp.gate_proj.weight.T)
        )
        by_hand = (act * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        if arch == "gemma3_text":
            by_hand = layer.post_feedforward_layernorm(by_hand)
        torch.testing.assert_close(acts[:, i], by_hand, atol=1e-5, rtol=1e-4)


def test_zero_injection_is_identity_and_nonzero_changes_only_p_and_later(tokenizer, arch):
    model = tiny_model(arch, tokenizer=tokenizer)
    cc = CCModel.from_base(model, CCConfig())
    b = batch_for(tokenizer, "right")
    ids, mask, p = b["input_ids"], b["attention_mask"], b["cc_position"]
    pos = positions_from_mask(mask)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, torch.zeros(3, cc.arch.hidden_size)):
            zero = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, torch.randn(3, cc.arch.hidden_size)):
            moved = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(plain, zero)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(moved[i, : p[i]], plain[i, : p[i]], atol=1e-6, rtol=0)
        diff = (moved[i, p[i] : n] - plain[i, p[i] : n]).abs().amax(-1)
        assert (diff > 1e-4).all(), f"row {i}: every position from p on must change"


def test_left_and_right_padding_give_the_same_loss_and_choice(tokenizer):
    cc = CCModel.from_base(tiny_model("qwen2", tokenizer=tokenizer), CCConfig()).eval()
    with torch.no_grad():
        right = cc(**batch_for(tokenizer, "right"))
        left = cc(**batch_for(tokenizer, "left"))
    torch.testing.assert_close(right.loss, left.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(right.layer_choice, left.layer_choice)


def test_training_forward_equals_hand_computation(tokenizer, arch):
    """Loss of CCModel.forward (eval: argmax choice) == hooks written here + the plain cross-entropy."""
    model = tiny_model(arch, tokenizer=tokenizer)
    cc = CCModel.from_base(model, CCConfig(inject_layer=1)).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 1.0)
    b = batch_for(tokenizer, "right")
    with torch.no_grad():
        out = cc(**b)
    arch_info = locate(model)
    rows = torch.arange(3)
    # 1. English pass with our own hooks on the FFN modules
    store = {}
    hs = [
        m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o))
        for i, m in enumerate(arch_info.ffn)
    ]
    with torch.no_grad():
        model(
            input_ids=b["en_input_ids"],
            attention_mask=b["en_attention_mask"],
            position_ids=positions_from_mask(b["en_attention_mask"]),
        )
    for h in hs:
        h.remove()
    acts = torch.stack([store[i][rows, b["en_cc_position"]] for i in range(len(store))], 1)
    # 2. Decision Maker by hand: W (mean_l a_l + e)
    e = model.get_input_embeddings()(b["input_ids"])[rows, b["cc_position"]]
    logits = (acts.mean(1) + e) @ cc.decision_maker.proj.weight.T
    chosen = logits.argmax(-1)
    assert torch.equal(chosen, out.layer_choice)
    c = acts[rows, chosen]

    # 3. fused pass: add c after decoder layer 1 at p
    def add(mod, a, o):
        h = (o[0] if isinstance(o, tuple) else o).clone()
        h[rows, b["cc_position"]] += c
        return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

    handle = arch_info.layers[1].register_forward_hook(add)
    with torch.no_grad():
        lm = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=positions_from_mask(b["attention_mask"]),
        ).logits
    handle.remove()
    labels = b["labels"][:, 1:]
    ce = F.cross_entropy(lm[:, :-1].reshape(-1, lm.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=1e-5)
    # and the connection matters: a plain forward gives other logits
    with torch.no_grad():
        plain = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=positions_from_mask(b["attention_mask"]),
        ).logits
    assert (plain - out.logits).abs().max() > 1e-5


def _english_only_token_rows(tokenizer, b):
    en = set(b["en_input_ids"][b["en_attention_mask"].bool()].tolist())
    non_en = set(b["input_ids"][b["attention_mask"].bool()].tolist())
    rows = sorted(en - non_en)
    assert rows, "the test needs tokens that only the English prompts use"
    return rows


@pytest.mark.parametrize("english_grad", [False, True])
def test_gradients_decision_maker_and_english_pass(tokenizer, english_grad):
    torch.manual_seed(0)
    cc = CCModel.from_base(
        tiny_model("llama", tokenizer=tokenizer), CCConfig(english_grad=english_grad)
    ).train()
    b = batch_for(tokenizer)
    out = cc(**b)
    out.loss.backward()
    dm_grad = cc.decision_maker.proj.weight.grad
    assert dm_grad is not None and dm_grad.abs().sum() > 0
    emb_grad = cc.base.get_input_embeddings().weight.grad
    english_only = _english_only_token_rows(tokenizer, b)
    en_grad = emb_grad[english_only].abs().sum()
    if english_grad:
        assert en_grad > 0
    else:
        assert en_grad == 0
    # the non-English tokens always get gradient
    assert emb_grad[b["input_ids"][0, 1]].abs().sum() > 0


def test_gumbel_choice_is_one_hot_and_seeded_sampling_is_reproducible(tokenizer):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig()).train()
    acts = torch.randn(64, 3, cc.arch.hidden_size)
    emb = torch.randn(64, cc.arch.hidden_size)
    fused, w = cc.decision_maker(acts, emb, sample=True)
    assert torch.equal(w.sum(-1), torch.ones(64)) and set(w.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(fused, acts[torch.arange(64), w.argmax(-1)])
    draws = [cc.decision_maker(acts, emb, True, 1.0, torch.Generator().manual_seed(7))[1] for _ in range(2)]
    assert torch.equal(*draws)
    assert len(w.argmax(-1).unique()) > 1, "Gumbel noise must vary the choice across 64 rows"
    _, w_eval = cc.decision_maker(acts, emb, sample=False)
    logits = (acts.mean(1) + emb) @ cc.decision_maker.proj.weight.T
    assert torch.equal(w_eval.argmax(-1), logits.argmax(-1))


def test_save_and_load_give_identical_logits_and_decision_maker(tokenizer, tmp_path, arch):
    cc = CCModel.from_base(tiny_model(arch, tokenizer=tokenizer), CCConfig()).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_()
    cc.save_pretrained(tmp_path, tokenizer=tokenizer)
    loaded = CCModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.decision_maker.proj.weight, cc.decision_maker.proj.weight)
    b = batch_for(tokenizer)
    with torch.no_grad():
        a, c = cc(**b), loaded(**b)
    assert torch.equal(a.logits, c.logits)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # a normal HF folder for plain use
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=b["input_ids"]).logits, cc.base(input_ids=b["input_ids"]).logits
        )
    assert not any(p.name.endswith(".tmp") or p.name.startswith(".stage") for p in tmp_path.iterdir())


def test_decision_maker_shape_mismatch_is_a_clear_error(tokenizer, tmp_path):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    cc.save_pretrained(tmp_path, tokenizer=tokenizer)
    other = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer, num_layers=2), CCConfig())
    with pytest.raises(CCError, match="does not fit this model"):
        other.load_decision_maker(tmp_path / "decision_maker.safetensors")


def test_unsupported_architecture_names_what_was_looked_for():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "model_type": "weird", "hidden_size": 4})()
            self.emb = torch.nn.Embedding(3, 4)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(CCError, match=r"looked for get_decoder\(\).*--layers-path"):
        locate(Weird())


def ffn_outputs_at(model, input_ids, attention_mask, positions) -> torch.Tensor:
    """``f_l[p]`` (batch, L, d) from one full uncached forward, with hooks written here."""
    store = {}
    arch = locate(model)
    hs = [
        m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o))
        for i, m in enumerate(arch.ffn)
    ]
    with torch.no_grad():
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
        )
    for h in hs:
        h.remove()
    rows = torch.arange(len(input_ids))
    return torch.stack([store[i][rows, positions] for i in range(len(store))], 1)


LONG_PAIRS = [
    (p + " Tafadhali jibu swali hili kwa ufupi sana." * (i % 2), a, e) for i, (p, a, e) in enumerate(PAIRS)
]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # a cache cut back; sliding-window layers
@pytest.mark.parametrize("connection", ["transform", "english"])
@pytest.mark.parametrize("always_cache", [False, True])
def test_prefill_to_connection_equals_full_uncached_forwards(tokenizer, arch, connection, always_cache):
    """The prefill's ``f_l[p]`` are the FFN outputs at p of a full uncached forward of the same rows;
    the fused pass continued from its cache (twice, rewound in between) gives the logits of the full
    uncached connected forward from its start; the cache starts at min p where it is kept."""
    from tests.conftest import connected_model

    cc = connected_model(tokenizer, arch)
    b = batch_for(tokenizer, "left", LONG_PAIRS)
    ids, mask, column = b["input_ids"], b["attention_mask"], b["cc_position"]
    assert ids.shape[1] > 16 and len(set(column.tolist())) == 3  # beyond gemma's window; three p
    positions = positions_from_mask(mask)
    english = (b["en_input_ids"], b["en_attention_mask"], b["en_cc_position"])
    prefill = prefill_to_connection(cc, connection, ids, mask, positions, column, english, always_cache)

    source = english if connection == "english" else (ids, mask, column)
    torch.testing.assert_close(prefill.activations, ffn_outputs_at(cc.base, *source), atol=1e-5, rtol=1e-5)
    croppable = arch == "llama"
    kept = always_cache or (croppable and connection == "transform")
    assert prefill.start == (int(column.min()) if kept else 0)
    assert (prefill.cache is not None) == kept
    if kept and croppable:
        assert prefill.cache.get_seq_length() == prefill.start
    with torch.no_grad():
        full = connected_forward(cc, connection, ids, mask, column, *english, position_ids=positions)
    for draw in range(1 if kept and not croppable else 2):
        if draw:
            prefill.rewind()  # back to [0, start) for another fused pass
        inj = prefill.injection(cc, connection, ids, column)
        with torch.no_grad(), injected(cc, inj):
            out = cc.base(
                input_ids=ids[:, prefill.start :],
                attention_mask=mask,
                position_ids=positions[:, prefill.start :],
                past_key_values=prefill.cache,
                use_cache=kept,
            )
        assert torch.equal(inj.layers, full.layer_choice)
        torch.testing.assert_close(out.logits, full.logits[:, prefill.start :], atol=1e-5, rtol=1e-5)
    if kept and not croppable:  # a sliding-window cache serves one pass (generation's)
        with pytest.raises(RuntimeError, match="cannot be cut back"):
            prefill.rewind()


def test_layer_choice_comes_with_the_output_and_last_layer_choice_is_deprecated(tokenizer):
    """The forward's output carries the chosen layers (the Decision Maker's argmax, computed here
    from its inputs); ``last_layer_choice`` still gives them, with a DeprecationWarning, and is read-only."""
    from tests.conftest import connected_model

    cc = connected_model(tokenizer, "qwen2")
    b = batch_for(tokenizer, "right")
    with torch.no_grad():
        out = cc(**b)
    acts = ffn_outputs_at(cc.base, b["en_input_ids"], b["en_attention_mask"], b["en_cc_position"])
    e = cc.base.get_input_embeddings()(b["input_ids"])[torch.arange(3), b["cc_position"]]
    expected = ((acts.mean(1) + e) @ cc.decision_maker.proj.weight.T).argmax(-1)
    assert torch.equal(out.layer_choice, expected) and out["layer_choice"] is out.layer_choice
    assert type(out).__name__ == "CC" + type(cc.base(input_ids=b["input_ids"])).__name__
    with pytest.warns(DeprecationWarning, match="layer_choice from the forward's output"):
        assert torch.equal(cc.last_layer_choice, expected)
    with pytest.raises(AttributeError):
        cc.last_layer_choice = None
    sft = CCModel.from_base(tiny_model("qwen2", tokenizer=tokenizer), CCConfig(method="sft")).eval()
    with torch.no_grad():
        assert sft(**b).layer_choice is None


def test_nothing_in_the_library_reads_last_layer_choice():
    """The deprecated ``CCModel.last_layer_choice`` is defined, never used, inside cctuning."""
    import ast
    from pathlib import Path

    import cctuning

    users = [
        f"{path.name}:{node.lineno}"
        for path in Path(cctuning.__file__).parent.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "last_layer_choice"
    ]
    assert users == []
