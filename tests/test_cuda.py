"""The mechanism on a GPU: bf16 weights, SDPA attention, CUDA kernels (issue 17).

Marked ``cuda``: ``scripts/gpu_check.sh`` (``make gpu-check``) runs them with ``pytest -m cuda`` on a
machine with CUDA. Where torch sees no CUDA device they are skipped, and pytest prints the reason.
``CCTUNING_CUDA_TESTS_DEVICE=cpu`` runs them on the CPU instead: that checks the tests and the script's
plumbing on a machine without a GPU, and says nothing about CUDA.

Each test computes its reference another way: the FFN output by hand from the layer's weights in
float32, the logits without the injection, the naive two-prefill generation, the NLL on the CPU in
float32. Tolerances for bf16 are those of tests/test_precision.py (relative L2 error 3 %).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder
from cctuning.eval.nll import evaluate_nll, load_items
from cctuning.inference import CCGenerator
from cctuning.model import CCConfig, CCModel
from cctuning.model.ccmodel import positions_from_mask
from cctuning.testing import tiny_model
from tests.conftest import connected_model, make_records, write_jsonl

pytestmark = pytest.mark.cuda

REL_TOL = 0.03  # relative L2 error of bf16 against float32 (tests/test_precision.py)
DEVICE_VARIABLE = "CCTUNING_CUDA_TESTS_DEVICE"
PAIRS = [
    ("Habari ya asubuhi, rafiki yangu?", "Nzuri sana.", "Good morning, my friend?"),
    ("请回答下面的问题。", "今天天气很好。", "Please answer the question below."),
    ("ما هي عاصمة مصر؟", "القاهرة هي العاصمة.", "What is the capital of Egypt?"),
]
PROMPTS = [p[0] for p in PAIRS] + ["hi", "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।"]


@pytest.fixture(scope="module")
def device() -> torch.device:
    forced = os.environ.get(DEVICE_VARIABLE)
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip(
            f"no CUDA device (torch.cuda.is_available() is False; {DEVICE_VARIABLE}=cpu runs these on the CPU)"
        )
    return torch.device("cuda")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def sdpa_model(arch, tokenizer, device, dtype=torch.bfloat16, seed=0):
    model = tiny_model(arch, tokenizer=tokenizer, seed=seed)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model.to(device=device, dtype=dtype).eval()


def batch_for(tokenizer, device, side="right") -> dict:
    enc = PromptEncoder(tokenizer)
    batch = CCCollator(tokenizer.pad_token_id, side)([enc.encode_example(*p).features() for p in PAIRS])
    return {k: v.to(device) for k, v in batch.items()}


def connected(tokenizer, device, arch="llama", dtype=torch.bfloat16) -> CCModel:
    """A CC model whose connection visibly changes the output (strong Decision Maker, a real matrix).
    Every random number is drawn on the CPU, then the model moves: the same weights on any device
    (drawn on CUDA, the Decision Maker differed from the CPU's, and so did the NLL)."""
    return connected_model(tokenizer, arch, 0, base=sdpa_model(arch, tokenizer, "cpu", dtype)).to(device)


def test_the_device_is_what_the_run_asked_for(device):
    if os.environ.get(DEVICE_VARIABLE):
        assert device.type == os.environ[DEVICE_VARIABLE]
    else:
        assert device.type == "cuda" and torch.cuda.is_bf16_supported()


def test_captured_activation_is_the_ffn_output_at_p(tokenizer, arch, device):
    cc = CCModel.from_base(sdpa_model(arch, tokenizer, device), CCConfig())
    b = batch_for(tokenizer, device, "left")
    mlp_in = {}
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlp_in.__setitem__(i, a[0]))
        for i, layer in enumerate(cc.arch.layers)
    ]
    with torch.no_grad():
        acts = cc.collect_activations(b["input_ids"], b["attention_mask"], b["cc_position"])
    for h in handles:
        h.remove()
    assert acts.dtype == torch.bfloat16 and acts.device.type == device.type
    rows, p = torch.arange(len(PAIRS), device=device), b["cc_position"]
    for i, layer in enumerate(cc.arch.layers):
        x, mlp = mlp_in[i][rows, p].float(), layer.mlp
        gate = x @ mlp.gate_proj.weight.float().T
        act = F.gelu(gate, approximate="tanh") if arch == "gemma3_text" else F.silu(gate)
        by_hand = (act * (x @ mlp.up_proj.weight.float().T)) @ mlp.down_proj.weight.float().T
        if arch == "gemma3_text":
            with torch.no_grad():
                by_hand = layer.post_feedforward_layernorm(by_hand.to(torch.bfloat16)).float()
        assert rel_error(acts[:, i], by_hand) < REL_TOL


def test_zero_injection_is_identity_and_an_injection_changes_only_p_and_later(tokenizer, arch, device):
    model = sdpa_model(arch, tokenizer, device)
    cc = CCModel.from_base(model, CCConfig())
    b = batch_for(tokenizer, device)
    ids, mask, p = b["input_ids"], b["attention_mask"], b["cc_position"]
    pos = positions_from_mask(mask)
    torch.manual_seed(1)
    vector = 4 * torch.randn(3, cc.arch.hidden_size, device=device)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, torch.zeros(3, cc.arch.hidden_size, device=device)):
            zero = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with cc.hooks.injecting(p, vector):
            moved = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(plain, zero)
    scale = float(plain.float().abs().max())
    for i in range(3):
        n = int(mask[i].sum())
        before = (moved[i, : p[i]].float() - plain[i, : p[i]].float()).abs().max()
        after = (moved[i, p[i] : n].float() - plain[i, p[i] : n].float()).abs().amax(-1)
        # one bf16 step at the logits' scale is 2^-8 of it: before p at most that, from p on far more
        assert before <= 0.005 * scale
        assert (after > 0.01 * scale).all(), f"row {i}: every position from p on must change"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_generation_fast_path_equals_the_naive_path(tokenizer, arch, device):
    # float32: the same tokens and first logits; bf16: first logits within the bf16 tolerance
    cc = connected(tokenizer, device, arch, torch.float32)
    gen = CCGenerator(cc, tokenizer, max_new_tokens=6, batch_size=5)
    fast = gen.generate(PROMPTS, "transform", return_first_logits=True)
    naive = gen.generate(PROMPTS, "transform", naive=True, return_first_logits=True)
    for f, n in zip(fast, naive):
        torch.testing.assert_close(f.first_logits, n.first_logits, atol=1e-4, rtol=1e-4)
        assert f.token_ids == n.token_ids and f.layer == n.layer
    half = connected(tokenizer, device, arch, torch.bfloat16)
    gen = CCGenerator(half, tokenizer, max_new_tokens=6, batch_size=5)
    fast_b = gen.generate(PROMPTS, "transform", return_first_logits=True)
    naive_b = gen.generate(PROMPTS, "transform", naive=True, return_first_logits=True)
    for f, n, ref in zip(fast_b, naive_b, fast):
        assert rel_error(f.first_logits, n.first_logits) < REL_TOL
        assert rel_error(f.first_logits, ref.first_logits) < REL_TOL
        assert f.layer == n.layer == ref.layer


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_a_cc_training_step_in_bf16(tokenizer, device, mode):
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    cc = CCModel.from_base(sdpa_model("llama", tokenizer, device, dtype), CCConfig()).train()
    ref = CCModel.from_base(sdpa_model("llama", tokenizer, "cpu", torch.float32), CCConfig()).train()
    with torch.no_grad():
        cc.decision_maker.proj.weight.copy_(ref.decision_maker.proj.weight)
    cc.generator, ref.generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    b = batch_for(tokenizer, device)
    with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
        loss = cc(**b).loss
    loss.backward()
    ref_loss = ref(**{k: v.cpu() for k, v in b.items()}).loss
    assert abs(float(loss) - float(ref_loss)) < 0.01 * float(ref_loss)
    grad = cc.decision_maker.proj.weight.grad
    assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_nll_on_the_device_equals_the_cpu(tokenizer, device, tmp_path):
    data = write_jsonl(tmp_path / "held.jsonl", make_records(6))
    on_device = connected(tokenizer, device, "llama", torch.float32)
    on_cpu = connected(tokenizer, "cpu", "llama", torch.float32)
    for connection in ("none", "transform"):
        evaluate_nll(on_device, tokenizer, data, connection, tmp_path / "dev", batch_size=3, progress=False)
        evaluate_nll(on_cpu, tokenizer, data, connection, tmp_path / "cpu", batch_size=3, progress=False)
        for a, b in zip(load_items(tmp_path / "dev"), load_items(tmp_path / "cpu")):
            assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-4 * abs(b["nll_sum"]) + 1e-4
            assert a["layer"] == b["layer"] and a["tokens"] == b["tokens"]
        for sub in ("dev", "cpu"):
            for f in (tmp_path / sub).iterdir():
                f.unlink()
            (tmp_path / sub).rmdir()


def test_the_fused_vector_has_the_hidden_states_dtype_on_the_device(tokenizer, arch, device):
    cc = connected(tokenizer, device, arch)
    b = batch_for(tokenizer, device)
    seen = []
    layer = cc.arch.layers[cc.cc_config.inject_layer]
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            cc(**b)
    finally:
        handle.remove()
    assert seen[-1].dtype == torch.bfloat16 and seen[-1].device.type == device.type


def test_the_inference_commands_load_onto_the_device(tokenizer, device, tmp_path, monkeypatch):
    """``load_for_inference`` (every inference command and the experiment's stages) puts the model
    on the device that ``--device auto`` picks there, with the Transform Matrix and Decision Maker;
    the CUDA run's held-out NLL equals the CPU's."""
    from cctuning.loading import load_for_inference

    folder = tmp_path / "model"
    connected(tokenizer, "cpu", "llama", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("CCTUNING_DEVICE", device.type)
    model, tok, _ = load_for_inference(str(folder))
    assert {p.device.type for p in model.parameters()} == {device.type}
    cpu_model, _, _ = load_for_inference(str(folder), device="cpu")
    data = write_jsonl(tmp_path / "held.jsonl", make_records(4))
    evaluate_nll(model, tok, data, "transform", tmp_path / "dev", batch_size=2, progress=False)
    evaluate_nll(cpu_model, tok, data, "transform", tmp_path / "cpu", batch_size=2, progress=False)
    for a, b in zip(load_items(tmp_path / "dev"), load_items(tmp_path / "cpu")):
        assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-4 * abs(b["nll_sum"]) + 1e-4
        assert a["layer"] == b["layer"]
