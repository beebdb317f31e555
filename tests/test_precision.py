"""bf16 and fp16 on CPU, end to end (issue 17).

Two ways to run in half precision:

* ``--dtype bfloat16`` (or ``float16``): the weights themselves are half precision;
* ``--bf16`` (or ``--fp16``): float32 master weights, the forward under autocast.

Checked here, on the tiny random architectures: the dtypes where they matter (the fused vector has
the hidden state's dtype; the Decision Maker's logits, Gumbel noise and softmax are float32; the
Transform Matrix is solved in float64), agreement with float32 within a stated tolerance, and every
command (train, fit-matrix, generate, eval, eval --nll) running in each mode.

Tolerances, against float32 on the same weights: bf16 keeps 8 significant bits (unit roundoff
2⁻⁹ ≈ 0.2 %); over the 3 layers of the tiny models the relative L2 error of the logits and of the
captured activations measured 0.3–1.6 % (bf16 weights or autocast; 11 architectures), so the bound
is :data:`REL_TOL` = 3 %. The mean response NLL is an average of many such logits: within
:data:`NLL_TOL` = 1 % relative.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from cctuning.cli import main
from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder
from cctuning.eval.nll import evaluate_nll, load_items
from cctuning.inference import CCGenerator, TransformMatrix
from cctuning.inference.matrix import NormalEquations
from cctuning.loading import load_for_inference
from cctuning.model import CCConfig, CCModel
from cctuning.model.connection import connected_forward, injection
from cctuning.model.decision import DecisionMaker, hard_gumbel_softmax
from cctuning.testing import tiny_model
from tests.conftest import flags, make_records, write_jsonl

REL_TOL = 0.03  # relative L2 error of half-precision logits and activations against float32
NLL_TOL = 0.01  # relative error of a half-precision mean response NLL against float32
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def cc_pair(tokenizer, arch: str = "llama", dtype=torch.bfloat16):
    """The same CC-Tuning model twice: float32 and with its weights in ``dtype`` (Decision Maker with
    well separated logits and a Transform Matrix, so that both choose the same layers)."""
    torch.manual_seed(0)
    fmt = {"mode": "chat"}
    full = CCModel.from_base(tiny_model(arch, tokenizer=tokenizer), CCConfig(prompt_format=fmt)).eval()
    d = full.arch.hidden_size
    with torch.no_grad():
        full.decision_maker.proj.weight.normal_(0, 1.0)
    full.set_transform(TransformMatrix(torch.eye(d) + 0.1 * torch.randn(d, d)))
    half = CCModel.from_base(copy.deepcopy(full.base).to(dtype), CCConfig(prompt_format=fmt)).eval()
    with torch.no_grad():
        half.decision_maker.proj.weight.copy_(full.decision_maker.proj.weight)
    half.set_transform(full.transform)
    return full, half


def english_batch(tokenizer, n: int = 4) -> dict:
    enc = PromptEncoder(tokenizer, max_length=256)
    feats = [
        enc.encode_example(r["instruction"], r["output"], r["instruction_en"]).features()
        for r in make_records(n)
    ]
    return CCCollator(tokenizer.pad_token_id)(feats)


def forward(model, batch, autocast: bool = False):
    """Logits, loss, the English activations and the chosen layers of one connected forward."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = connected_forward(
            model,
            "english",
            batch["input_ids"],
            batch["attention_mask"],
            batch["cc_position"],
            batch["en_input_ids"],
            batch["en_attention_mask"],
            batch["en_cc_position"],
            labels=batch["labels"],
        )
        acts = model.collect_activations(
            batch["en_input_ids"], batch["en_attention_mask"], batch["en_cc_position"]
        )
    return out.logits, out.loss, acts, out.layer_choice


# -- the Decision Maker ------------------------------------------------------------------------------
def near_ties(dtype, rows: int = 2048, layers: int = 8, d: int = 64):
    """Decision Maker inputs in ``dtype`` whose logits are close between layers, and the weight."""
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(rows, layers, d, generator=g).to(dtype)
    emb = torch.randn(rows, d, generator=g).to(dtype)
    weight = torch.randn(layers, d, generator=g) * 0.05
    weight[1] = weight[0] + 0.001 * torch.randn(d, generator=g)  # layers 0 and 1 nearly tie
    return acts, emb, weight.to(dtype)


def reference_logits(acts, emb, weight) -> torch.Tensor:
    """``W (mean_l a_l + e)`` in float64 from the same (half-precision) values."""
    return (acts.double().mean(1) + emb.double()) @ weight.double().T


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("autocast", [False, True])
def test_decision_maker_logits_and_gumbel_softmax_are_float32(dtype, autocast):
    acts, emb, weight = near_ties(HALF[dtype])
    dm = DecisionMaker(acts.shape[-1], acts.shape[1]).to(HALF[dtype])
    with torch.no_grad():
        dm.proj.weight.copy_(weight)
    ref = reference_logits(acts, emb, weight)
    # the inputs are discriminating: logits rounded to the model's dtype flip some choices
    rounded = ((acts.mean(1) + emb) @ weight.T).to(HALF[dtype])
    assert (rounded.float().argmax(-1) != ref.argmax(-1)).any()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = dm.logits(acts, emb)
        fused, chosen = dm(acts, emb, sample=False)
        g = torch.Generator().manual_seed(7)
        _, sampled = dm(acts, emb, sample=True, generator=g)
    assert logits.dtype == torch.float32 and chosen.dtype == torch.float32
    assert rel_error(logits, ref) < 1e-6
    assert torch.equal(chosen.argmax(-1), ref.argmax(-1))
    # the fused vector is the chosen layer's activation, in the activations' dtype
    rows = torch.arange(len(acts))
    assert fused.dtype == HALF[dtype] and torch.equal(fused, acts[rows, ref.argmax(-1)])
    # sampling: argmax of the float32 logits plus the seeded Gumbel noise (drawn in float32)
    draws = torch.empty(ref.shape, dtype=torch.float32).exponential_(
        generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(sampled.argmax(-1), (ref - draws.log().double()).argmax(-1))


def test_hard_gumbel_softmax_keeps_the_straight_through_gradient_in_float32():
    logits = torch.randn(4, 5, dtype=torch.bfloat16).float().requires_grad_()
    out = hard_gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(out.sum(-1), torch.ones(4))
    (out * torch.arange(5.0)).sum().backward()
    assert logits.grad.dtype == torch.float32 and logits.grad.abs().sum() > 0


# -- the fusion --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bfloat16", "float16", "autocast"])
def test_the_fused_vector_has_the_hidden_states_dtype(tokenizer, mode):
    full, half = cc_pair(tokenizer, dtype=HALF.get(mode, torch.float32))
    model = full if mode == "autocast" else half
    batch = english_batch(tokenizer)
    seen = []
    layer = model.arch.layers[model.cc_config.inject_layer]
    # registered after the injection hook: sees the layer output after the fusion
    handle = layer.register_forward_hook(
        lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "autocast"):
            model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            acts = model.collect_activations(
                batch["en_input_ids"], batch["en_attention_mask"], batch["en_cc_position"]
            )
            inj = injection(model, "english", acts, batch["input_ids"], batch["cc_position"])
            with model.hooks.injecting(inj.positions, inj.vectors, model.fusion, inj.weights):
                model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    plain, fused = seen[0], seen[-1]
    assert fused.dtype == plain.dtype
    expected_dtype = torch.float32 if mode == "autocast" else HALF[mode]
    assert plain.dtype == expected_dtype  # autocast: the residual stream stays float32
    assert inj.vectors.dtype == acts.dtype
    rows = torch.arange(len(plain))
    want = plain.clone()
    want[rows, inj.positions] = plain[rows, inj.positions] + inj.vectors.to(plain.dtype)
    assert torch.equal(fused, want)


# -- the Transform Matrix ----------------------------------------------------------------------------
def test_the_transform_matrix_is_solved_in_float64_from_half_precision_activations():
    g = torch.Generator().manual_seed(0)
    d, layers, n = 16, 2, 40
    # ill-conditioned source rows (singular values 1 .. 1e-3): a float32 solve loses digits here
    u = torch.linalg.qr(torch.randn(n * layers, d, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    s = u @ torch.diag(torch.logspace(0, -3, d, dtype=torch.float64)) @ v.T
    source = s.reshape(n, layers, d).to(torch.bfloat16)
    target = (source.double() @ torch.randn(d, d, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    acc = NormalEquations(d, layers)
    acc.add(source, target)
    assert acc.sts.dtype == torch.float64
    solution = acc.solve()
    assert solution.dtype == torch.float64
    src, tgt = source.double().reshape(-1, d), target.double().reshape(-1, d)
    exact = torch.linalg.lstsq(src, tgt, driver="gelsd").solution
    assert rel_error(solution, exact) < 1e-6
    # the same normal equations solved in float32 are far off: the check above can fail
    single = torch.linalg.solve(acc.sts[0].float(), acc.stt[0].float())
    assert rel_error(single, exact) > 1e-4
    # applied in float32 and rounded once to the activations' dtype
    m = TransformMatrix(solution.float())
    out = m.apply(source)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (source.float() @ solution.float()).to(torch.bfloat16))


# -- agreement with float32 --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
def test_half_precision_agrees_with_float32(tokenizer, arch, mode):
    full, half = cc_pair(tokenizer, arch)
    batch = english_batch(tokenizer)
    ref = forward(full, batch)
    out = forward(full, batch, autocast=True) if mode == "autocast" else forward(half, batch)
    assert out[0].dtype == torch.bfloat16
    assert rel_error(out[0], ref[0]) < REL_TOL
    assert rel_error(out[2], ref[2]) < REL_TOL
    assert abs(float(out[1]) - float(ref[1])) < NLL_TOL * float(ref[1])
    assert torch.equal(out[3], ref[3])  # the same layers are chosen


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_nll_and_generation_agree_with_float32(tokenizer, tmp_path, dtype):
    full, half = cc_pair(tokenizer, dtype=HALF[dtype])
    data = write_jsonl(tmp_path / "held.jsonl", make_records(6))
    for connection in ("none", "transform"):
        ref = evaluate_nll(full, tokenizer, data, connection, tmp_path / f"f-{connection}", progress=False)
        got = evaluate_nll(half, tokenizer, data, connection, tmp_path / f"h-{connection}", progress=False)
        a, b = got["nll"]["all"]["nll"], ref["nll"]["all"]["nll"]
        assert abs(a - b) < NLL_TOL * b
        layers = [i["layer"] for i in load_items(tmp_path / f"h-{connection}")]
        assert layers == [i["layer"] for i in load_items(tmp_path / f"f-{connection}")]
    prompts = [r["instruction"] for r in make_records(4)]
    gen = CCGenerator(half, tokenizer, max_new_tokens=6, batch_size=4)
    fast = gen.generate(prompts, "transform", return_first_logits=True)
    naive = gen.generate(prompts, "transform", naive=True)
    assert [f.token_ids for f in fast] == [n.token_ids for n in naive]  # fast path = naive path in half
    ref = CCGenerator(full, tokenizer, max_new_tokens=6, batch_size=4).generate(
        prompts, "transform", return_first_logits=True
    )
    for f, r in zip(fast, ref):
        assert f.layer == r.layer
        assert rel_error(f.first_logits, r.first_logits) < REL_TOL


def test_a_half_precision_training_step_trains_the_decision_maker(tokenizer):
    _, half = cc_pair(tokenizer)
    half.train()
    loss = half(**english_batch(tokenizer)).loss
    loss.backward()
    grad = half.decision_maker.proj.weight.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- every command, in each mode ------------------------------------------------------------------
MODES = {
    "fp32": [],
    "bf16-weights": ["--dtype", "bfloat16"],
    "bf16-autocast": ["--bf16"],
    "fp16-autocast": ["--fp16"],
}
WEIGHT_DTYPE = {"bf16-weights": torch.bfloat16, "fp16-weights": torch.float16}


def first_loss(run) -> float:
    state = json.loads(next(run.glob("checkpoint-*/trainer_state.json")).read_text())
    return next(h["loss"] for h in state["log_history"] if "loss" in h)


def inference_commands(run, data, tmp_path) -> dict:
    """fit-matrix, generate, eval (XNLI/sw, 2 items) and eval --nll on a model folder; what they left."""
    assert main(["fit-matrix", "--model", str(run), "--data", str(data), "--samples", "12"]) == 0
    gens = tmp_path / f"{run.name}-gen.jsonl"
    assert main(["generate", "--model", str(run), "--input", str(data), "--output", str(gens),
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    bench = ["eval", "--model", str(run), "--benchmarks", "XNLI", "--langs", "sw", "--limit", "2"]
    assert main([*bench, "--max-new-tokens", "4", "--output", str(tmp_path / f"{run.name}-bench")]) == 0
    nll_dir = tmp_path / f"{run.name}-nll"
    assert main(["eval", "--model", str(run), "--nll", str(data), "--output", str(nll_dir)]) == 0
    return {
        "run": run,
        "nll": json.loads((nll_dir / "nll.json").read_text())["nll"]["all"]["nll"],
        "generations": [json.loads(line) for line in gens.read_text().splitlines()],
    }


def pipeline(base_dir, tmp_path, mode: str) -> dict:
    """train (3 steps) in ``mode``, then :func:`inference_commands`."""
    data = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    run = tmp_path / mode
    train = ["train", *flags(model=base_dir, data=data, output=run, max_steps=3, batch_size=4, lr="1e-3",
                             logging_steps=1, warmup_ratio=0)]  # fmt: skip
    assert main([*train, *MODES[mode]]) == 0
    return inference_commands(run, data, tmp_path)


@pytest.fixture(scope="module")
def fp32_run(base_dir, tmp_path_factory):
    return pipeline(base_dir, tmp_path_factory.mktemp("fp32"), "fp32")


def check_against_fp32(got: dict, fp32_run: dict, dtype) -> None:
    run = got["run"]
    weights = load_file(str(run / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {dtype}
    assert load_file(str(run / "decision_maker.safetensors"))["weight"].dtype == dtype
    # the inference commands load the folder in its own dtype (transformers' dtype="auto")
    model, _, _ = load_for_inference(str(run))
    assert model.arch.embeddings.weight.dtype == dtype and model.transform is not None
    assert abs(got["nll"] - fp32_run["nll"]) < NLL_TOL * fp32_run["nll"]
    assert len(got["generations"]) == len(fp32_run["generations"])


@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast", "fp16-autocast"])
def test_every_command_runs_in_half_precision(base_dir, tmp_path, capsys, fp32_run, mode):
    got = pipeline(base_dir, tmp_path, mode)
    capsys.readouterr()
    # half-precision weights were saved, or float32 master weights under autocast
    check_against_fp32(got, fp32_run, WEIGHT_DTYPE.get(mode, torch.float32))
    # the first step's loss is computed on the same initial weights: only the precision differs
    assert abs(first_loss(got["run"]) - first_loss(fp32_run["run"])) < NLL_TOL * first_loss(fp32_run["run"])


def test_float16_weights_run_inference_but_are_not_trained(base_dir, tmp_path, capsys, fp32_run, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    train = ["train", *flags(model=base_dir, data=data, max_steps=3, batch_size=4, lr="1e-3")]
    # AdamW's squared gradients underflow in float16 (the weights blew up by 230 in 3 steps): refused
    assert main([*train, "--output", str(tmp_path / "f16"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype float16 cannot train" in err and "--fp16" in err
    assert not (tmp_path / "f16").exists()
    # a float16 folder (here: the float32 run converted) runs every inference command
    half = tmp_path / "fp16-weights"
    model, tok, _ = load_for_inference(str(fp32_run["run"]), dtype=torch.float16, load_transform=False)
    model.save_pretrained(half, tokenizer=tok)
    check_against_fp32(inference_commands(half, data, tmp_path), fp32_run, torch.float16)
    # bfloat16 weights train, with a warning that small updates are lost
    assert main([*train, "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--max-steps", "1"]) == 0
    assert any("float32 master weights" in r.getMessage() for r in caplog.records)
