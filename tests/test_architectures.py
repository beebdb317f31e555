"""The mechanism on more architectures (issue 17), checked against values computed another way.

For every architecture of ``MORE_ARCHITECTURES`` (tiny random configs, cctuning/testing.py):

* the captured vector at p equals the FFN output recomputed by hand from the layer's weights, and
  the decoder layer's output equals its input + the attention's contribution + that vector (so the
  vector is exactly what the FFN adds to the residual stream);
* a zero injection leaves the logits unchanged, a random one changes the fused position and every
  later one, and nothing before it;
* two CC-Tuning steps with the project's Trainer on a repeated batch: finite losses, a loss that
  goes down, and a Decision Maker that gets a gradient.

"By hand" reads only what no FFN hook touches: the decoder layer's input and output (hooks on the
layer) and the attention module's output (hook on the attention); the norms, the MLP and the
mixture of experts (router, top-k, experts, shared expert) are recomputed from their weights with
the formulas of each architecture's definition, written out here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder
from cctuning.errors import CCError
from cctuning.model import CCConfig, CCModel, locate
from cctuning.model.ccmodel import positions_from_mask
from cctuning.testing import MORE_ARCHITECTURES, tiny_model
from cctuning.training.args import TrainConfig
from cctuning.training.run import FeatureDataset, build_training_arguments
from cctuning.training.trainer import CCTrainer
from tests.test_model import PAIRS, batch_for

ATOL, RTOL = 1e-5, 1e-4


@dataclass(frozen=True)
class Layout:
    """Where a decoder layer's FFN sits. ``attn``: the attention module; ``attn_norm``: a norm on the
    attention output before its residual add; ``pre_ffn``/``post_ffn``: norms on the FFN's input and
    output; ``parallel``: the FFN reads the layer input (not input + attention) and its output is added
    alongside the attention's; ``gain_offset``: 1 for Gemma's RMSNorm, which scales by (1 + weight)."""

    attn: str
    pre_ffn: str | None
    attn_norm: str | None = None
    post_ffn: str | None = None
    parallel: bool = False
    gain_offset: float = 0.0


PRE_NORM = Layout("self_attn", "post_attention_layernorm")
LAYOUTS = {
    "qwen3": PRE_NORM,
    "phi3": PRE_NORM,
    "mixtral": PRE_NORM,
    "qwen3_moe": PRE_NORM,
    "qwen2_moe": PRE_NORM,
    "olmo2": Layout(
        "self_attn", None, attn_norm="post_attention_layernorm", post_ffn="post_feedforward_layernorm"
    ),
    "gemma2": Layout(
        "self_attn",
        "pre_feedforward_layernorm",
        attn_norm="post_attention_layernorm",
        post_ffn="post_feedforward_layernorm",
        gain_offset=1.0,
    ),
    "gpt_neox": Layout("attention", "post_attention_layernorm", parallel=True),
    "gpt_neox_sequential": Layout("attention", "post_attention_layernorm"),
    "phi": Layout("self_attn", "input_layernorm", parallel=True),  # one LayerNorm feeds both
    "gpt2": Layout("attn", "ln_2"),
}


def test_every_new_architecture_has_a_layout():
    assert set(LAYOUTS) == set(MORE_ARCHITECTURES)


# -- the formulas, written out ---------------------------------------------------------------------
def act_by_hand(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return x * torch.sigmoid(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # the tanh approximation
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":  # exact, with erf
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    raise AssertionError(f"no hand-written activation {name!r}")


def activation_name(config) -> str:
    for key in ("hidden_activation", "activation_function", "hidden_act"):
        if getattr(config, key, None):
            return getattr(config, key)
    raise AssertionError("config names no activation")


def linear(x: torch.Tensor, module) -> torch.Tensor:
    """``nn.Linear``: x Wᵀ + b; GPT-2's ``Conv1D`` stores W transposed: x W + b."""
    transposed = type(module).__name__ == "Conv1D"
    y = x @ (module.weight if transposed else module.weight.T)
    return y if module.bias is None else y + module.bias


def norm_by_hand(module, x: torch.Tensor, gain_offset: float) -> torch.Tensor:
    if isinstance(module, torch.nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * (gain_offset + module.weight)


def mlp_by_hand(mlp, x: torch.Tensor, config, top_k: int | None = None) -> torch.Tensor:
    """The FFN output of one layer for inputs ``x`` (rows, hidden); ``top_k`` overrides the number
    of experts a mixture routes each token to."""
    name = activation_name(config)

    def act(v):
        return act_by_hand(name, v)

    if hasattr(mlp, "experts"):  # a sparse mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE)
        probs = torch.softmax(x @ mlp.gate.weight.T, dim=-1)  # router
        top, chosen = probs.topk(top_k or config.num_experts_per_tok, dim=-1)
        if config.model_type == "mixtral" or getattr(config, "norm_topk_prob", False):
            top = top / top.sum(-1, keepdim=True)
        experts = mlp.experts
        out = torch.zeros_like(x)
        for row in range(x.shape[0]):
            for weight, e in zip(top[row], chosen[row].tolist(), strict=True):
                gate, up = (experts.gate_up_proj[e] @ x[row]).chunk(2)
                out[row] += weight * (experts.down_proj[e] @ (act(gate) * up))
        if hasattr(mlp, "shared_expert"):  # Qwen2-MoE: a dense expert, gated by a sigmoid
            shared = mlp_by_hand(mlp.shared_expert, x, config)
            out = out + torch.sigmoid(x @ mlp.shared_expert_gate.weight.T) * shared
        return out
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one projection, gate first
        gate, up = linear(x, mlp.gate_up_proj).chunk(2, dim=-1)
        return linear(up * act(gate), mlp.down_proj)
    if hasattr(mlp, "gate_proj"):  # Llama-style gated MLP
        return linear(act(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)
    if hasattr(mlp, "dense_h_to_4h"):  # GPT-NeoX
        return linear(act(linear(x, mlp.dense_h_to_4h)), mlp.dense_4h_to_h)
    if hasattr(mlp, "fc1"):  # Phi-2
        return linear(act(linear(x, mlp.fc1)), mlp.fc2)
    if hasattr(mlp, "c_fc"):  # GPT-2
        return linear(act(linear(x, mlp.c_fc)), mlp.c_proj)
    raise AssertionError(f"no hand-written FFN for {type(mlp).__name__}")


def model_for(arch: str, tokenizer, seed: int = 0):
    """A tiny random model whose weights are large enough to matter and whose norm gains and biases
    are not their initial 1 or 0, so that a formula that forgets one of them fails."""
    model = tiny_model(arch, tokenizer=tokenizer, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:  # norm gains and biases
                p.add_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


# -- 1. what is captured ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MORE_ARCHITECTURES)
def test_captured_vector_is_the_ffn_output_recomputed_by_hand(tokenizer, arch):
    model = model_for(arch, tokenizer)
    cc = CCModel.from_base(model, CCConfig())
    layout, config = LAYOUTS[arch], model.config
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key):
        def hook(module, args, kwargs, output=None):
            value = output if output is not None else (args[0] if args else kwargs["hidden_states"])
            seen[key] = value[0] if isinstance(value, tuple) else value

        return hook

    handles = []
    for i, layer in enumerate(cc.arch.layers):
        handles.append(layer.register_forward_pre_hook(keep(("in", i)), with_kwargs=True))
        handles.append(layer.register_forward_hook(keep(("out", i)), with_kwargs=True))
        handles.append(getattr(layer, layout.attn).register_forward_hook(keep(("attn", i)), with_kwargs=True))
    b = batch_for(tokenizer, "left")
    with torch.no_grad():
        acts = cc.collect_activations(b["input_ids"], b["attention_mask"], b["cc_position"])
    for h in handles:
        h.remove()

    rows, p = torch.arange(len(PAIRS)), b["cc_position"]
    assert acts.shape == (len(PAIRS), cc.arch.num_layers, cc.arch.hidden_size)
    with torch.no_grad():
        for i, layer in enumerate(cc.arch.layers):
            h_in, h_out, attn = (seen[(k, i)][rows, p] for k in ("in", "out", "attn"))
            if layout.attn_norm:
                attn = norm_by_hand(getattr(layer, layout.attn_norm), attn, layout.gain_offset)
            # sequential: the FFN reads the residual after the attention's add; parallel: the layer input
            resid = h_in if layout.parallel else h_in + attn
            x = (
                norm_by_hand(getattr(layer, layout.pre_ffn), resid, layout.gain_offset)
                if layout.pre_ffn
                else resid
            )
            f = mlp_by_hand(layer.mlp, x, config)
            if layout.post_ffn:
                f = norm_by_hand(getattr(layer, layout.post_ffn), f, layout.gain_offset)
            assert f.norm(dim=-1).min() > 0.05, (
                "the FFN output must be large enough for the test to mean something"
            )
            torch.testing.assert_close(
                acts[:, i], f, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"{arch} layer {i}: {m}"
            )
            # what is captured is exactly what the FFN adds: layer output = input + attention + f
            torch.testing.assert_close(h_out, h_in + attn + acts[:, i], atol=ATOL, rtol=RTOL)
            if layout.parallel:  # the layer's whole update is not the FFN output there
                assert (h_out - h_in - acts[:, i]).norm(dim=-1).min() > 0.05


def test_mixture_of_experts_output_is_routed_and_includes_the_shared_expert(tokenizer):
    """The MoE checks above would mean little if routing did not matter: the tokens use different
    experts, the top-k choice gives another vector than mixing every expert, and Qwen2-MoE's shared
    expert contributes to the captured vector."""
    model = model_for("qwen2_moe", tokenizer)
    cc = CCModel.from_base(model, CCConfig())
    layer, config = cc.arch.layers[1], model.config
    assert hasattr(layer.mlp, "experts") and not hasattr(cc.arch.layers[0].mlp, "experts")
    b = batch_for(tokenizer, "left")
    inputs = {}
    handle = layer.mlp.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0]))
    with torch.no_grad():
        acts = cc.collect_activations(b["input_ids"], b["attention_mask"], b["cc_position"])
        handle.remove()
        tokens = inputs["x"][b["attention_mask"].bool()]
        chosen = (tokens @ layer.mlp.gate.weight.T).topk(config.num_experts_per_tok, dim=-1).indices
        x = inputs["x"][torch.arange(len(PAIRS)), b["cc_position"]]
        every_expert = mlp_by_hand(layer.mlp, x, config, top_k=config.num_experts)
        shared = torch.sigmoid(x @ layer.mlp.shared_expert_gate.weight.T) * mlp_by_hand(
            layer.mlp.shared_expert, x, config
        )
    assert len(chosen.sort(-1).values.unique(dim=0)) > 1, "every token routed to the same experts"
    torch.testing.assert_close(acts[:, 1], mlp_by_hand(layer.mlp, x, config), atol=ATOL, rtol=RTOL)
    assert (acts[:, 1] - every_expert).norm(dim=-1).min() > 0.05
    assert shared.norm(dim=-1).min() > 0.05 and (acts[:, 1] - shared).norm(dim=-1).min() > 0.05


# -- 2. the injection ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MORE_ARCHITECTURES)
def test_zero_injection_is_identity_and_an_injection_changes_only_p_and_later(tokenizer, arch):
    model = model_for(arch, tokenizer)
    cc = CCModel.from_base(model, CCConfig())
    b = batch_for(tokenizer, "right")
    ids, mask, p = b["input_ids"], b["attention_mask"], b["cc_position"]
    pos = positions_from_mask(mask)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, torch.zeros(len(PAIRS), cc.arch.hidden_size)):
            zero = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, torch.randn(len(PAIRS), cc.arch.hidden_size)):
            moved = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(plain, zero)
    for i in range(len(PAIRS)):
        n = int(mask[i].sum())
        assert p[i] + 1 < n, "the test needs positions after p"
        torch.testing.assert_close(moved[i, : p[i]], plain[i, : p[i]], atol=1e-6, rtol=0)
        diff = (moved[i, p[i] : n] - plain[i, p[i] : n]).abs().amax(-1)
        assert (diff > 1e-4).all(), f"{arch} row {i}: every position from p on must change"


# -- 3. training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MORE_ARCHITECTURES)
def test_two_cc_training_steps_lower_the_loss_and_train_the_decision_maker(tokenizer, tmp_path, arch):
    torch.manual_seed(0)
    cc = CCModel.from_base(tiny_model(arch, tokenizer=tokenizer), CCConfig()).train()
    b = batch_for(tokenizer, "right")
    cc(**b).loss.backward()
    dm_grad = cc.decision_maker.proj.weight.grad
    assert dm_grad is not None and torch.isfinite(dm_grad).all() and dm_grad.abs().sum() > 0
    cc.zero_grad(set_to_none=True)

    def eval_loss():
        with torch.no_grad():
            return float(cc.eval()(**b).loss)

    before, dm_before = eval_loss(), cc.decision_maker.proj.weight.detach().clone()
    encoder = PromptEncoder(tokenizer)
    features = [encoder.encode_example(*pair).features() for pair in PAIRS]
    cfg = TrainConfig(
        model="m",
        data="d",
        output=str(tmp_path),
        max_steps=2,
        batch_size=len(PAIRS),  # one batch, the same one each step
        lr=3e-3,
        scheduler="constant",
        warmup_ratio=0,
        logging_steps=1,
        trainer={"save_strategy": "no", "disable_tqdm": True},
    )
    trainer = CCTrainer(
        model=cc.train(),
        args=build_training_arguments(cfg),
        train_dataset=FeatureDataset(features),
        data_collator=CCCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    after = eval_loss()
    assert after < before - 0.05, f"{arch}: loss {before:.3f} -> {after:.3f}"
    assert not torch.equal(cc.decision_maker.proj.weight, dm_before)
    assert int(trainer.layer_counts.sum()) == 2 * len(PAIRS)


# -- 4. what cannot be supported -------------------------------------------------------------------
def test_a_model_without_feed_forward_blocks_is_refused_with_the_reason(tokenizer):
    config = AutoConfig.for_model(
        "mamba", vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CCError) as err:
        CCModel.from_base(model, CCConfig())
    message = str(err.value)
    assert "\n" not in message and "mamba" in message and "no feed-forward" in message


def test_a_layer_without_the_feed_forward_module_is_a_one_line_error(tokenizer):
    model = tiny_model("qwen3", tokenizer=tokenizer)
    del model.model.layers[2].mlp
    with pytest.raises(CCError, match=r"^decoder layer 2 of \d+ has no 'mlp'[^\n]*$"):
        locate(model)
