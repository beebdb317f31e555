"""Scale: LoRA through PEFT, gradient checkpointing, mixed precision, several processes, example configs."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from cctuning.cli import main
from cctuning.config import build_config
from cctuning.data.collator import CCCollator
from cctuning.inference import CCGenerator, TransformMatrix
from cctuning.model import CCConfig, CCModel
from cctuning.model.lora import add_lora
from cctuning.testing import tiny_model
from cctuning.training import CCTrainer, TrainConfig
from cctuning.training.run import build_training_arguments, prepare
from tests.conftest import ResumeCheck, flags, make_records, short_train_args, write_jsonl
from tests.test_model import batch_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORKER = Path(__file__).resolve().parent / "cli_worker.py"


def lora_cc(tokenizer, r=4, seed=0, **cfg) -> CCModel:
    """A CC model on a LoRA-wrapped tiny Llama whose adapters are non-zero (lora_B starts at 0)."""
    torch.manual_seed(seed)
    cc = CCModel.from_base(add_lora(tiny_model("llama", tokenizer=tokenizer), r), CCConfig(**cfg))
    with torch.no_grad():
        for name, p in cc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        cc.decision_maker.proj.weight.normal_(0, 1.0)
    return cc


# -- LoRA ----------------------------------------------------------------------------------------
def test_hooks_find_the_layers_inside_a_peft_model_and_capture_what_the_merged_model_computes(tokenizer):
    cc = lora_cc(tokenizer).eval()
    inner = cc.base.get_base_model()  # the transformers model PEFT injected its layers into
    assert cc.uses_lora and cc.arch.layers is inner.model.layers
    assert all(ffn is layer.mlp for ffn, layer in zip(cc.arch.ffn, inner.model.layers))
    b = batch_for(tokenizer, "left")
    with torch.no_grad():
        acts = cc.collect_activations(b["en_input_ids"], b["en_attention_mask"], b["en_cc_position"])
        loss = cc(**b).loss
    # the same weights another way: LoRA merged into plain Linear layers, no PEFT left
    merged = copy.deepcopy(cc.base).merge_and_unload()
    plain = CCModel.from_base(merged, CCConfig()).eval()
    plain.decision_maker.load_state_dict(cc.decision_maker.state_dict())
    with torch.no_grad():
        expected = plain.collect_activations(b["en_input_ids"], b["en_attention_mask"], b["en_cc_position"])
        expected_loss = plain(**b).loss
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    # and the adapters matter: without them the activations differ
    with cc.base.disable_adapter(), torch.no_grad():
        bare = cc.collect_activations(b["en_input_ids"], b["en_attention_mask"], b["en_cc_position"])
    assert (bare - acts).abs().max() > 1e-3


def test_lora_folder_saves_adapter_and_decision_maker_and_reloads_identically(tokenizer, tmp_path, base_dir):
    torch.manual_seed(0)
    base = CCModel._load_base(base_dir)
    cc = CCModel.from_base(add_lora(base, 4), CCConfig(base_model=str(base_dir))).eval()
    with torch.no_grad():
        for name, p in cc.named_parameters():
            if "lora_B" in name or "decision_maker" in name:
                p.normal_(0, 0.3)
    cc.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "decision_maker.safetensors",
        "cctuning_config.json",
        "tokenizer.json",
    } <= files
    assert "model.safetensors" not in files  # the base weights are not copied
    saved = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    b = batch_for(tokenizer)
    for kwargs in ({}, {"base_model": str(base_dir)}):
        loaded = CCModel.from_pretrained(tmp_path / "m", **kwargs)
        assert loaded.uses_lora and not any(p.requires_grad for p in loaded.base.parameters())
        assert torch.equal(loaded.decision_maker.proj.weight, cc.decision_maker.proj.weight)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**b).logits, cc(**b).logits, atol=0, rtol=0)


@pytest.mark.parametrize("connection", ["transform", "english", "none"])
def test_generation_with_adapters_equals_generation_with_them_merged(tokenizer, connection):
    cc = lora_cc(tokenizer).eval()
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size) * 5))
    merged = CCModel.from_base(copy.deepcopy(cc.base).merge_and_unload(), CCConfig()).eval()
    merged.decision_maker.load_state_dict(cc.decision_maker.state_dict())
    merged.set_transform(cc.transform)
    prompts = ["Habari ya asubuhi?", "请回答下面的问题。"]
    english = ["Good morning?", "Please answer."] if connection == "english" else None
    a = CCGenerator(cc, tokenizer, max_new_tokens=5).generate(prompts, connection, english)
    b = CCGenerator(merged, tokenizer, max_new_tokens=5).generate(prompts, connection, english)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and [x.layer for x in a] == [
        x.layer for x in b
    ]


def _params(model: CCModel) -> dict[str, torch.Tensor]:
    """Every weight by a name that does not depend on whether PEFT is in trainable mode."""
    return {k.replace(".default", ""): v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_lora_training_changes_only_adapters_and_decision_maker_and_resumes(
    base_dir, data_file, tmp_path, capsys
):
    lora = dict(lora_r="4", lora_target="q_proj,v_proj,down_proj")
    check = ResumeCheck(tmp_path, base_dir, data_file, lr="1e-2", warmup_ratio="0", **lora)
    common, full = check.command, check.full
    check.run_full()
    # the starting point, rebuilt the way `train` builds it (same seed: same LoRA and DM init)
    cfg = build_config(
        TrainConfig,
        None,
        {k.lstrip("-").replace("-", "_"): v for k, v in zip(common[1::2], common[2::2])}
        | {"output": str(tmp_path / "x")},
    )
    start = _params(prepare(cfg)[0])
    trained = CCModel.from_pretrained(full)
    end = _params(trained)
    assert start.keys() == end.keys()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    lora_keys = {k for k in start if "lora_" in k}
    assert lora_keys and {k.split(".")[-3] for k in lora_keys} == {"q_proj", "v_proj", "down_proj"}
    assert changed == lora_keys | {"decision_maker.proj.weight"}
    # resume: a copy of the run's first checkpoint continues to the same final adapters and DM
    check.copy_checkpoint("checkpoint-2")
    check.resume(weights=("adapter_model.safetensors", "decision_maker.safetensors"))
    capsys.readouterr()


# -- gradient checkpointing --------------------------------------------------------------------------
def _loss_and_grads(tokenizer, english_grad: bool, lora: bool, checkpointing: dict | None):
    torch.manual_seed(0)
    model = tiny_model("llama", tokenizer=tokenizer)
    if lora:
        model = add_lora(model, 4)
    cc = CCModel.from_base(model, CCConfig(english_grad=english_grad)).train()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 1.0)
        for name, p in cc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    calls = [0] * cc.arch.num_layers  # attention runs inside the checkpoint, before the FFN
    for i, layer in enumerate(cc.arch.layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    if checkpointing is not None:
        cc.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        assert cc.is_activation_checkpointing
    cc.generator = torch.Generator().manual_seed(0)  # same Gumbel noise in both runs
    out = cc(**batch_for(tokenizer))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in cc.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, calls


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("english_grad", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_every_gradient(
    tokenizer, english_grad, reentrant, lora
):
    loss, grads, calls = _loss_and_grads(tokenizer, english_grad, lora, None)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(
        tokenizer, english_grad, lora, {"use_reentrant": reentrant}
    )
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert grads["decision_maker.proj.weight"].abs().sum() > 0
    # the checkpoint really recomputed (so the capture hooks inside it fired again). Plain: one English
    # and one non-English forward. Checkpointed: the non-English layers run twice, and the English
    # pass is checkpointed (so recomputed) only where its gradient survives that.
    assert calls == [2] * len(calls)
    english_recomputed = english_grad and not reentrant
    assert calls_ckpt == [4 if english_recomputed else 3] * len(calls)


def test_gradient_checkpointing_flag_reaches_the_model(base_dir, data_file, tmp_path, monkeypatch, capsys):
    seen = []
    original = CCModel.activation_checkpointing_enable

    def spy(self, **kwargs):
        seen.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(CCModel, "activation_checkpointing_enable", spy)
    common = [
        "train",
        *flags(
            model=base_dir,
            data=data_file,
            max_steps="2",
            batch_size="4",
            lr="1e-3",
            warmup_ratio="0",
            english_grad=True,
        ),
    ]
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert not seen
    assert main(common + ["--output", str(tmp_path / "ckpt"), "--gradient-checkpointing"]) == 0
    assert seen
    capsys.readouterr()
    for name in ("model.safetensors", "decision_maker.safetensors"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "ckpt" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# -- mixed precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_mixed_precision_flags_reach_the_trainer(tokenizer, tmp_path, flag):
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), **{flag: True})
    args = build_training_arguments(cfg)
    assert getattr(args, flag) is True
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    trainer = CCTrainer(model=cc, args=args, data_collator=CCCollator(tokenizer.pad_token_id))
    assert trainer.accelerator.mixed_precision == flag
    if flag == "bf16":  # CPU autocast exists for bf16: the forward really runs in it
        with trainer.accelerator.autocast():
            out = cc(**batch_for(tokenizer))
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_bf16_and_fp16_together_is_a_clear_error(base_dir, data_file, tmp_path, capsys):
    code = main(
        ["train", *flags(model=base_dir, data=data_file, output=tmp_path / "o", bf16=True, fp16=True)]
    )
    assert code == 2 and "exclude each other" in capsys.readouterr().err


# -- several processes ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights_and_a_synchronised_decision_maker(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_records(16))
    out, dump = tmp_path / "out", tmp_path / "dump"
    args = short_train_args(base_dir, data, out, 2)
    env = {**os.environ, "CCT_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / "accelerate" / "multi_cpu.yaml"),
        "--main_process_port",
        str(_free_port()),
        "--num_cpu_threads_per_process",
        "1",
        str(WORKER),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # each rank trained on its own batches (3 steps each) ...
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    # ... yet both end with the same weights, Decision Maker included: gradients were synchronised
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["decision_maker"] == ranks[1]["decision_maker"]
    saved = load_file(str(out / "decision_maker.safetensors"))["weight"]
    assert torch.equal(saved, torch.tensor(ranks[0]["decision_maker"]))
    cfg = build_config(
        TrainConfig, None, {k.lstrip("-").replace("-", "_"): v for k, v in zip(args[1::2], args[2::2])}
    )
    initial = prepare(cfg)[0].decision_maker.proj.weight.detach()
    assert (saved - initial).abs().max() > 1e-4  # the Decision Maker did train
    # layer choices are counted over both processes: 3 steps × 2 ranks × 2 examples
    assert ranks[0]["layer_counts"] == ranks[1]["layer_counts"]
    assert sum(json.loads((out / "layer_choice.json").read_text())["counts"]) == 12
    assert proc.stdout.count("saved cc model") == 1  # one line per run, not per process


# -- example configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["multi_cpu.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
def test_accelerate_example_configs_are_valid_accelerate_configs(name):
    path = EXAMPLES / "accelerate" / name
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2
    raw = yaml.safe_load(path.read_text())
    if name == "deepspeed_zero3.yaml":
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == 3 and ds["zero3_save_16bit_model"] is True  # our _save gets full weights
    if name == "fsdp.yaml":
        fsdp = raw["fsdp_config"]
        assert (
            fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
            and fsdp["fsdp_cpu_ram_efficient_loading"] is False
        )


def test_example_train_configs_parse(tmp_path):
    for path in sorted(EXAMPLES.glob("train*.yaml")):
        cfg = build_config(TrainConfig, str(path), {})
        assert cfg.output
        if "lora" in path.name:
            assert cfg.lora_r > 0
