"""The opt-in connection variants (docs/method.md §5): fusion forms and Decision Maker options do what
they say, against computations written here; the defaults stay the paper's."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cctuning.cli import main
from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder, PromptFormat
from cctuning.errors import CCError
from cctuning.eval.nll import evaluate_nll, load_items
from cctuning.inference import CCGenerator
from cctuning.model import CCConfig, CCModel, locate
from cctuning.model.transform import TransformMatrix
from cctuning.testing import tiny_model
from tests.conftest import flags, make_records, write_jsonl

PROMPTS = ["Habari ya asubuhi?", "请回答问题。", "ما هي عاصمة مصر؟", "नमस्ते"]


def batch_of(tokenizer, n=4, english=True):
    enc = PromptEncoder(tokenizer, PromptFormat("chat"), max_length=64)
    rows = make_records(n)
    feats = [
        enc.encode_example(r["instruction"], r["output"], r["instruction_en"] if english else None).features()
        for r in rows
    ]
    return CCCollator(tokenizer.pad_token_id)(feats)


def cc_model(tokenizer, seed=0, **cfg):
    torch.manual_seed(seed)
    base = tiny_model("llama", tokenizer=tokenizer, seed=seed)
    return CCModel.from_base(base, CCConfig(prompt_format={"mode": "chat"}, **cfg))


def rms(x):
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@pytest.mark.parametrize("fusion", ["gated", "gated-scalar"])
def test_gated_connection_at_init_equals_sft_exactly(tokenizer, fusion):
    cc = cc_model(tokenizer, fusion=fusion).train()
    sft = CCModel.from_base(copy.deepcopy(cc.base), CCConfig(method="sft")).train()
    batch = batch_of(tokenizer)
    cc.generator = torch.Generator().manual_seed(0)
    out = cc(**batch)
    ref = sft(**batch)  # the SFT model ignores the English inputs
    assert ref.layer_choice is None
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    assert out.layer_choice is not None  # the connection ran: only its gate is 0
    # and the gate is the one weight of the connection that gets a gradient at step 0
    out.loss.backward()
    assert cc.fusion.gate.grad.abs().sum() > 0
    assert cc.decision_maker.proj.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("layer_choice", ["learned", "mean"])
def test_gate_gradient_is_the_chain_rule_through_the_fused_position(tokenizer, layer_choice):
    """dL/dg_l = Σ_b w_bl ⟨c_b, dL/dh_b[p]⟩, with dL/dh read from the fused layer output here."""
    cc = cc_model(tokenizer, fusion="gated", layer_choice=layer_choice).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
        cc.fusion.gate.copy_(torch.linspace(-0.5, 0.5, cc.arch.num_layers))
    batch = batch_of(tokenizer)
    seen = {}

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:  # the non-English pass (the English one runs without gradient)
            hidden.retain_grad()
            seen["h"] = hidden

    handle = cc.arch.layers[0].register_forward_hook(keep)  # runs after the injection hook
    cc(**batch).loss.backward()
    handle.remove()
    _, _, acts = _hidden_after_inject_layer(cc, batch)
    rows, pos = torch.arange(len(acts)), batch["cc_position"]
    emb = cc.base.get_input_embeddings()(batch["input_ids"][rows, pos])
    if layer_choice == "mean":
        weights = torch.full((len(acts), cc.arch.num_layers), 1.0 / cc.arch.num_layers)
    else:
        logits = (acts.mean(1) + emb) @ cc.decision_maker.proj.weight.T
        weights = F.one_hot(logits.argmax(-1), cc.arch.num_layers).float()
    c = (weights.unsqueeze(-1) * acts).sum(1)
    dot = (seen["h"].grad[rows, pos] * c).sum(-1)
    expected = (weights * dot.unsqueeze(-1)).sum(0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(cc.fusion.gate.grad, expected.detach(), rtol=1e-4, atol=1e-9)


def _hidden_after_inject_layer(cc, batch):
    """Layer k's output with and without the connection, and the English activations, by hooks here."""
    arch = locate(cc.base)
    outs = []
    handle = arch.layers[cc.cc_config.inject_layer].register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    store = {}
    hs = [
        m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o))
        for i, m in enumerate(arch.ffn)
    ]
    with torch.no_grad():
        cc.base(input_ids=batch["en_input_ids"], attention_mask=batch["en_attention_mask"])
    for h in hs:
        h.remove()
    rows = torch.arange(len(batch["en_cc_position"]))
    acts = torch.stack([store[i][rows, batch["en_cc_position"]] for i in range(len(store))], dim=1)
    outs.clear()
    with torch.no_grad():
        cc.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        plain = outs[-1]
        cc(**batch)
        fused = outs[-1]
    handle.remove()
    return plain, fused, acts


@pytest.mark.parametrize("fusion", ["add", "scaled", "gated", "gated-scalar"])
def test_each_fusion_adds_what_it_documents_at_p_only(tokenizer, fusion):
    cc = cc_model(tokenizer, fusion=fusion, inject_layer=1).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
        if cc.fusion.gate is not None:
            cc.fusion.gate.normal_(0, 1.0)
    batch = batch_of(tokenizer)
    plain, fused, acts = _hidden_after_inject_layer(cc, batch)
    rows = torch.arange(len(acts))
    pos = batch["cc_position"]
    emb = cc.base.get_input_embeddings()(batch["input_ids"][rows, pos])
    layer = ((acts.mean(1) + emb) @ cc.decision_maker.proj.weight.T).argmax(-1)
    c = acts[rows, layer]
    h = plain[rows, pos]
    expected = {
        "add": h + c,
        "scaled": h + c * rms(h) / rms(c),
        "gated": h + cc.fusion.gate[layer].detach().unsqueeze(-1) * c if fusion == "gated" else None,
        "gated-scalar": h + cc.fusion.gate.detach() * c if fusion == "gated-scalar" else None,
    }[fusion]
    torch.testing.assert_close(fused[rows, pos], expected, atol=1e-5, rtol=1e-5)
    if fusion == "scaled":  # the injected part has exactly the hidden state's RMS
        torch.testing.assert_close(rms(fused[rows, pos] - h), rms(h), atol=1e-4, rtol=1e-4)
    keep = batch["attention_mask"].bool().clone()  # every real token but p (padding aside)
    keep[rows, pos] = False
    assert torch.equal(fused[keep], plain[keep])


def test_rms_decision_maker_input_equals_hand_computation(tokenizer):
    cc = cc_model(tokenizer, dm_input="rms").eval()
    acts = (
        torch.randn(6, cc.arch.num_layers, cc.arch.hidden_size)
        * torch.logspace(0, 3, cc.arch.num_layers)[None, :, None]
    )
    ids = torch.randint(5, 100, (6, 5))
    pos = torch.full((6,), 4)
    _, weights = cc.choose(ids, pos, acts)
    e = cc.base.get_input_embeddings()(ids[:, 4])
    z = (acts / rms(acts)).mean(1) + e / rms(e)
    assert torch.equal(weights.argmax(-1), (z @ cc.decision_maker.proj.weight.T).argmax(-1))
    raw = cc_model(tokenizer).eval()
    raw.decision_maker.load_state_dict(cc.decision_maker.state_dict())
    z_raw = acts.mean(1) + e
    assert torch.equal(
        raw.choose(ids, pos, acts)[1].argmax(-1), (z_raw @ raw.decision_maker.proj.weight.T).argmax(-1)
    )


def test_unknown_options_are_one_line_errors(tokenizer):
    with pytest.raises(CCError, match="unknown fusion 'mul'"):
        cc_model(tokenizer, fusion="mul")
    with pytest.raises(CCError, match="unknown Decision Maker input"):
        cc_model(tokenizer, dm_input="layernorm")
    with pytest.raises(CCError, match="tau_end must be > 0"):
        CCConfig(tau_end=0.0)


@pytest.mark.parametrize("fusion", ["scaled", "gated"])
@pytest.mark.parametrize("connection", ["transform", "english"])
def test_generation_fast_path_equals_naive_path_with_each_fusion(tokenizer, fusion, connection):
    cc = cc_model(tokenizer, fusion=fusion).eval()
    d = cc.arch.hidden_size
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
        if cc.fusion.gate is not None:
            cc.fusion.gate.normal_(0, 2.0)
    cc.set_transform(TransformMatrix(torch.eye(d) * 20 + torch.randn(d, d)))
    gen = CCGenerator(cc, tokenizer, max_new_tokens=5, batch_size=4)
    english = (
        [f"Answer the question number {i}." for i in range(len(PROMPTS))] if connection == "english" else None
    )
    fast = gen.generate(PROMPTS, connection, english, return_first_logits=True)
    naive = gen.generate(PROMPTS, connection, english, naive=True, return_first_logits=True)
    plain = gen.generate(PROMPTS, "none", return_first_logits=True)
    for f, n, p in zip(fast, naive, plain):
        torch.testing.assert_close(f.first_logits, n.first_logits, atol=1e-5, rtol=1e-5)
        assert f.token_ids == n.token_ids and f.layer == n.layer
        assert (f.first_logits - p.first_logits).abs().max() > 1e-3


@pytest.mark.parametrize("fusion", ["scaled", "gated"])
def test_nll_honours_the_fusion(tokenizer, tmp_path, fusion):
    """The held-out NLL with the English connection equals the training forward's loss per item."""
    cc = cc_model(tokenizer, fusion=fusion).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
        if cc.fusion.gate is not None:
            cc.fusion.gate.normal_(0, 2.0)
    rows = make_records(4)
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    evaluate_nll(cc, tokenizer, data, "english", tmp_path / "nll", batch_size=2, progress=False)
    items = load_items(tmp_path / "nll")
    enc = PromptEncoder(tokenizer, cc.cc_config.prompt_format, max_length=1024)
    for rec, item in zip(rows, items):
        feats = enc.encode_example(rec["instruction"], rec["output"], rec["instruction_en"]).features()
        batch = CCCollator(tokenizer.pad_token_id)([feats])
        with torch.no_grad():
            logits = cc(**batch).logits
        labels = batch["labels"]
        nll = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        assert math.isclose(item["nll_sum"], float(nll), rel_tol=1e-5, abs_tol=1e-5)
    none = evaluate_nll(cc, tokenizer, data, "none", tmp_path / "none", batch_size=2, progress=False)
    assert (
        none["nll"]["all"]["nll"]
        != json.loads((tmp_path / "nll" / "nll.json").read_text())["nll"]["all"]["nll"]
    )


def test_options_are_saved_and_reloaded(tokenizer, tmp_path):
    cc = cc_model(tokenizer, fusion="gated", dm_input="rms", tau_end=0.25)
    with torch.no_grad():
        cc.fusion.gate.normal_()
    cc.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    saved = json.loads((tmp_path / "m" / "cctuning_config.json").read_text())
    assert (saved["fusion"], saved["dm_input"], saved["tau_end"]) == ("gated", "rms", 0.25)
    loaded = CCModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.fusion.gate, cc.fusion.gate)
    assert loaded.decision_maker.input_norm == "rms"
    batch = batch_of(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, cc.eval()(**batch).logits)
    # a Decision Maker file without the gate its fusion needs is refused
    add_model = cc_model(tokenizer)
    add_model.save_pretrained(tmp_path / "add", tokenizer=tokenizer)
    with pytest.raises(CCError, match="no gate of shape"):
        cc.load_decision_maker(tmp_path / "add" / "decision_maker.safetensors")


def _train(base_dir, data_file, out, **options):
    argv = ["train", *flags(model=base_dir, data=data_file, output=out, max_steps=3, batch_size=4)]
    argv += flags(scheduler="constant", warmup_ratio=0, logging_steps=1, save_steps=100, seed=3, **options)
    assert main(argv) == 0


@pytest.mark.parametrize("fusion", ["scaled", "gated"])
def test_dm_lr_scale_scales_the_connection_step_only(base_dir, data_file, tmp_path, fusion):
    """Adam's first step moves each weight by lr·g/(|g|+eps): ×10 for the connection's weights (the
    Decision Maker; the gates, which alone have a gradient at step 0 with ``gated``), ×1 elsewhere."""
    from cctuning.training import TrainConfig
    from cctuning.training.run import prepare

    init = prepare(TrainConfig(model=str(base_dir), data=str(data_file), output="x", seed=3, fusion=fusion))[
        0
    ]
    runs = {}
    for scale in (1, 10):
        out = tmp_path / f"s{scale}"
        _train(base_dir, data_file, out, max_steps=1, dm_lr_scale=scale, fusion=fusion, lr=1e-3)
        runs[scale] = CCModel.from_pretrained(out)
    base_1 = dict(runs[1].base.named_parameters())
    for name, p in runs[10].base.named_parameters():
        torch.testing.assert_close(p, base_1[name])  # the LLM's step does not depend on the scale
    get = (lambda m: m.fusion.gate) if fusion == "gated" else (lambda m: m.decision_maker.proj.weight)
    d1 = get(runs[1]).detach() - get(init).detach()
    d10 = get(runs[10]).detach() - get(init).detach()
    moved = d1.abs() > 1e-6
    assert moved.any()
    torch.testing.assert_close(d10[moved], 10 * d1[moved], rtol=2e-3, atol=1e-7)


def test_temperature_schedule_follows_the_exponential_curve(base_dir, data_file, tmp_path, monkeypatch):
    from cctuning.model.decision import DecisionMaker

    seen = []
    original = DecisionMaker.forward

    def spy(self, activations, embedding, sample, tau=1.0, generator=None):
        seen.append(tau)
        return original(self, activations, embedding, sample, tau, generator)

    monkeypatch.setattr(DecisionMaker, "forward", spy)
    _train(base_dir, data_file, tmp_path / "t", max_steps=4, tau=2.0, tau_end=0.5)
    expected = [2.0 * (0.5 / 2.0) ** (t / 4) for t in range(4)]
    assert [round(t, 9) for t in seen] == [round(t, 9) for t in expected]


def test_cli_trains_fits_generates_and_scores_with_every_option(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cc"
    _train(base_dir, data_file, out, fusion="scaled", dm_input="rms", dm_lr_scale=5, tau_end=0.5)
    config = json.loads((out / "cctuning_config.json").read_text())
    assert (config["fusion"], config["dm_input"], config["tau_end"]) == ("scaled", "rms", 0.5)
    assert json.loads((out / "train_results.json").read_text())["config"]["dm_lr_scale"] == 5
    assert main(["fit-matrix", *flags(model=out, data=data_file, samples=12)]) == 0
    assert main(["generate", *flags(model=out, prompt="Habari?", max_new_tokens=3)]) == 0
    held = write_jsonl(tmp_path / "held.jsonl", make_records(4))
    assert main(["eval", *flags(model=out, nll=held, output=tmp_path / "nll")]) == 0
    model = CCModel.from_pretrained(out)
    assert model.cc_config.fusion == "scaled" and model.transform is not None
    direct = evaluate_nll(model, model_tokenizer(out), held, "transform", None, progress=False)
    saved = json.loads((tmp_path / "nll" / "nll.json").read_text())
    assert math.isclose(saved["nll"]["all"]["nll"], direct["nll"]["all"]["nll"], rel_tol=1e-6)


def model_tokenizer(folder):
    from cctuning.loading import load_tokenizer

    return load_tokenizer(str(folder))
