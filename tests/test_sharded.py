"""Sharded training that has run: FSDP2 and DeepSpeed ZeRO-3 over 2 CPU processes (gloo).

Each engine trains the tiny Llama through ``accelerate launch --config_file
examples/accelerate/{fsdp_cpu,deepspeed_zero3_cpu}.yaml`` (the shipped GPU configs with 2 processes
and fp32, checked below), 2 examples per process, and is compared with values computed another way:

* a single process training the same global batch of 4 (same examples per step, same losses and
  gradient norms logged, same final weights and Decision Maker);
* the unsharded model: the activations the hooks captured and the Decision Maker's input (the
  token embedding at p) in the sharded forward equal those recomputed from the full weights;
* the saved folder: it loads with ``CCModel.from_pretrained`` and gives the logits the sharded model
  gave in memory, with and without the connection.

The Decision Maker picks its layer without Gumbel noise in these runs (``CCT_TEST_NO_NOISE``): the
noise comes from each rank's RNG, so a batch split over 2 ranks would draw other noise than the
same batch in one process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from cctuning.errors import CCError
from cctuning.model import CCConfig, CCModel
from cctuning.testing import tiny_model
from cctuning.training import sharding
from tests.conftest import assert_same_weights, make_records, short_train_args, write_jsonl
from tests.test_model import batch_for
from tests.test_scaling import _free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "examples" / "accelerate"
WORKER = Path(__file__).resolve().parent / "cli_worker.py"
# engine → (the CPU config, the GPU config it is made from, the engine accelerate must report)
ENGINES = {
    "fsdp": ("fsdp_cpu.yaml", "fsdp.yaml", "FSDP"),
    "deepspeed": ("deepspeed_zero3_cpu.yaml", "deepspeed_zero3.yaml", "DEEPSPEED"),
}
STEPS = 3
TIMEOUT = 300


def _options(base_dir: Path, data: Path, output: Path, batch_size: int) -> list[str]:
    return short_train_args(base_dir, data, output, batch_size, STEPS, save_steps="2")


def _env(probe: Path) -> dict:
    return {
        **os.environ,
        "CCT_TEST_PROBE": str(probe),
        "CCT_TEST_NO_NOISE": "1",
        "CCT_TEST_ZERO3_RELEASE_ALL": "1",  # DeepSpeed: every weight a placeholder outside its forward
        "TORCH_EXTENSIONS_DIR": str(probe / "torch_extensions"),  # ... checked to stay empty
        "CCT_TEST_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


def _run(cmd: list[str], probe: Path, cwd: Path, **env: str) -> None:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT, env={**_env(probe), **env}, cwd=cwd
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    built = probe / "torch_extensions"
    assert not built.exists() or not any(built.iterdir()), f"an op was compiled: {list(built.iterdir())}"


def _launch(config: str, args: list[str], probe: Path, cwd: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE / config),
        "--main_process_port",
        str(_free_port()),
        "--num_cpu_threads_per_process",
        "1",
        str(WORKER),
        *args,
    ]
    # DeepSpeed: no C++ op compiled (its shared-memory all-reduce serves inference only)
    env = {"CCT_TEST_DS_NO_SHM_OP": "1"} if "deepspeed" in config else {}
    _run(cmd, probe, cwd, **env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base_dir):
    root = tmp_path_factory.mktemp("sharded")
    data = write_jsonl(root / "train.jsonl", make_records(16))
    return SimpleNamespace(root=root, data=data, base=base_dir)


@pytest.fixture(scope="module")
def reference(setup):
    """One process, batch 4: the global batch of 2 processes × 2."""
    out, probe = setup.root / "single", setup.root / "single-probe"
    _run([sys.executable, str(WORKER), *_options(setup.base, setup.data, out, 4)], probe, setup.root)
    return SimpleNamespace(out=out, probe=torch.load(probe / "probe0.pt", weights_only=False))


def _losses(probe: dict, key: str = "loss") -> list[float]:
    return [entry[key] for entry in probe["log_history"] if key in entry and "train_runtime" not in entry]


@pytest.fixture(scope="module")
def sharded(setup):
    """``sharded(engine)``: the 2-process run of ``engine`` (made once per module)."""
    runs: dict[str, SimpleNamespace] = {}

    def run(engine: str) -> SimpleNamespace:
        if engine == "deepspeed":
            pytest.importorskip(
                "deepspeed", reason="DeepSpeed is not installed (pip install 'cctuning[deepspeed]')"
            )
        if engine not in runs:
            out, probe = setup.root / engine, setup.root / f"{engine}-probe"
            _launch(ENGINES[engine][0], _options(setup.base, setup.data, out, 2), probe, setup.root)
            ranks = [torch.load(probe / f"probe{r}.pt", weights_only=False) for r in (0, 1)]
            runs[engine] = SimpleNamespace(out=out, ranks=ranks)
        return runs[engine]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_sharded_training_matches_one_process_and_the_unsharded_model(
    engine, setup, reference, sharded, tokenizer
):
    run = sharded(engine)
    ranks = run.ranks
    # the engine really is the one launched, and the weights really are sharded outside a forward
    assert [r["engine"] for r in ranks] == [ENGINES[engine][2]] * 2
    assert [r["world_size"] for r in ranks] == [2, 2]
    vocab, hidden = 512, 32
    for r in ranks:
        emb, dm = r["embedding_weight"], r["dm_weight"]
        if engine == "fsdp":  # FSDP2: DTensors, each rank holding half of the rows
            assert emb["type"] == dm["type"] == "DTensor"
            assert emb["shape"] == (vocab, hidden) and emb["local_numel"] == vocab * hidden // 2
        else:  # ZeRO-3: an empty placeholder outside a forward; the full shape is known to DeepSpeed
            assert emb["local_numel"] == 0 and emb["ds_shape"] == (vocab, hidden)
            assert dm["local_numel"] == 0 and dm["ds_shape"] == (3, hidden)

    # the global batch of each step is the single process's batch: the same examples
    single = reference.probe
    assert len(single["steps"]) == STEPS and all(len(r["steps"]) == STEPS for r in ranks)
    for step in range(STEPS):
        together = sorted(ranks[0]["steps"][step] + ranks[1]["steps"][step])
        assert together == sorted(single["steps"][step])
    # ... and so the same losses, gradient norms and final weights (Decision Maker included)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(_losses(ranks[0], key)), torch.tensor(_losses(single, key)), rtol=1e-4, atol=1e-5
        )
    # Adam moves a weight by about lr (1e-2) per step whatever the size of its gradient, so float noise in
    # near-zero gradients shows up to ~1e-3 of one step (DeepSpeed: 1.4e-5); a gradient not averaged
    # over the ranks would be off by whole steps
    for name in ("model.safetensors", "decision_maker.safetensors"):
        mine, theirs = load_file(str(run.out / name)), load_file(str(reference.out / name))
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-4, msg=f"{name}: {k}")
    initial = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    saved_dm = load_file(str(run.out / "decision_maker.safetensors"))["weight"]
    assert (saved_dm - initial.decision_maker.proj.weight.detach()).abs().max() > 1e-4  # it trained

    # the hooks captured in the sharded forward what the unsharded model computes, and the Decision
    # Maker read the token embedding at p from the full (gathered) weight
    unsharded = CCModel.from_base(str(setup.base), CCConfig()).eval()
    table = unsharded.arch.embeddings.weight.detach()
    for r in ranks:
        en = r["en_batch"]
        with torch.no_grad():
            expected = unsharded.collect_activations(en["input_ids"], en["attention_mask"], en["positions"])
        torch.testing.assert_close(r["activations"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["dm_activations"], expected, rtol=1e-4, atol=1e-5)
        batch = r["batch"]
        rows = torch.arange(batch["input_ids"].shape[0])
        tokens = batch["input_ids"][rows, batch["cc_position"]]
        torch.testing.assert_close(r["dm_embedding"], table[tokens], rtol=0, atol=0)

    # the saved folder is a full model folder plus our files, and gives the sharded model's logits
    loaded = CCModel.from_pretrained(run.out)
    for r in ranks:
        batch = r["batch"]
        with torch.no_grad():
            plain = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            connected = loaded(**batch).logits
        torch.testing.assert_close(plain, r["logits_plain"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(connected, r["logits_connected"], rtol=1e-4, atol=1e-5)
        assert (connected - plain).abs().max() > 1e-4  # the connection is part of what was compared


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_sharded_run_resumes_to_the_same_weights_and_layer_counts(engine, setup, sharded):
    """A copy of the run's checkpoint-2 (the engine's own checkpoint format) resumed under the same
    engine ends where the uninterrupted run ended, layer-choice counts included."""
    full = sharded(engine).out
    part = setup.root / f"{engine}-resumed"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    args = [*_options(setup.base, setup.data, part, 2), "--resume", "last"]
    _launch(ENGINES[engine][0], args, setup.root / f"{engine}-resumed-probe", setup.root)
    assert_same_weights(full, part)
    counts = [json.loads((d / "layer_choice.json").read_text())["counts"] for d in (full, part)]
    assert counts[0] == counts[1] and sum(counts[0]) == STEPS * 4


# -- the configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", list(ENGINES))
def test_cpu_configs_are_the_gpu_configs_with_two_processes_and_fp32(engine):
    cpu_name, gpu_name, _ = ENGINES[engine]
    cpu, gpu = (yaml.safe_load((ACCELERATE / n).read_text()) for n in (cpu_name, gpu_name))
    differ = {k for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)}
    assert differ == {"num_processes", "mixed_precision"}
    assert cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no" and cpu["use_cpu"] is False
    assert load_config_from_file(str(ACCELERATE / cpu_name)).num_processes == 2


# -- the placeholder weight (ZeRO-3) and the engine checks, in one process ------------------------
def test_decision_maker_input_is_the_same_with_a_placeholder_embedding_weight(tokenizer):
    """ZeRO-3 leaves every weight an empty placeholder outside its module's forward and gathers it
    around the forward. Here the embedding weight is replaced the same way (empty, filled by a pre-hook
    and emptied again by a post-hook): the Decision Maker must see the same input and choose the same."""
    torch.manual_seed(0)
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig()).eval()
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 1.0)
    batch = batch_for(tokenizer)
    seen = []
    cc.decision_maker.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with torch.no_grad():
        logits = cc(**batch).logits
    emb = cc.arch.embeddings
    full = emb.weight.data
    rows = torch.arange(batch["input_ids"].shape[0])
    torch.testing.assert_close(seen[0], full[batch["input_ids"][rows, batch["cc_position"]]], rtol=0, atol=0)

    placeholder = torch.empty(0, dtype=full.dtype)
    emb.weight.data = placeholder
    emb.register_forward_pre_hook(lambda m, a: setattr(m.weight, "data", full))
    emb.register_forward_hook(lambda m, a, o: setattr(m.weight, "data", placeholder))
    # a new Decision Maker on such a model takes its device and dtype from the placeholder
    assert CCModel(cc.base, CCConfig()).decision_maker.proj.weight.dtype == full.dtype
    with torch.no_grad():
        placeholder_logits = cc(**batch).logits
    assert emb.weight.numel() == 0  # a placeholder again after the forward
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(placeholder_logits, logits, rtol=0, atol=0)


def _trainer(args, fsdp=False, deepspeed=False, engine=DistributedType.MULTI_CPU):
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    plugin = SimpleNamespace(deepspeed_config=zero3)
    return SimpleNamespace(
        args=args,
        is_fsdp_enabled=fsdp,
        is_deepspeed_enabled=deepspeed,
        accelerator=SimpleNamespace(distributed_type=engine, state=SimpleNamespace(deepspeed_plugin=plugin)),
    )


@pytest.mark.parametrize(
    ("env", "name"),
    [({"ACCELERATE_USE_FSDP": "true"}, "FSDP"), ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed")],
)
def test_a_run_launched_for_a_sharded_engine_never_trains_without_it(monkeypatch, env, name):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    args = SimpleNamespace(fsdp=None, deepspeed=None, fsdp_plugin_args=None)
    sharding.after_accelerator(_trainer(args))  # nothing asked: nothing to check
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CCError, match=f"launched for {name}, but accelerate set up MULTI_CPU"):
        sharding.after_accelerator(_trainer(args))
    sharding.after_accelerator(_trainer(args, fsdp=name == "FSDP", deepspeed=name == "DeepSpeed"))


def test_zero3_that_would_not_gather_the_weights_for_the_save_is_refused():
    """Tried: without it the Trainer writes DeepSpeed's checkpoint and our folder gets no model weights."""
    full = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    sharding.check_zero3_saves_full_weights(full)
    sharding.check_zero3_saves_full_weights({"zero_optimization": {"stage": 2}})  # ZeRO-2: full weights
    for value in (False, None):
        config = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": value}}
        with pytest.raises(CCError, match="zero3_save_16bit_model: true"):
            sharding.check_zero3_saves_full_weights(config)


def test_fsdp1_on_a_machine_without_an_accelerator_is_refused_in_one_line(monkeypatch):
    import accelerate.state

    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setattr(accelerate.state, "PartialState", lambda: state)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    args = SimpleNamespace(fsdp=None, deepspeed=None, fsdp_plugin_args=None)
    with pytest.raises(CCError, match=r"FSDP1 \(fsdp_version: 1\) needs an accelerator device"):
        sharding.before_accelerator(args)
    assert state.distributed_type == DistributedType.MULTI_CPU
    monkeypatch.setenv("FSDP_VERSION", "2")
    sharding.before_accelerator(args)  # FSDP2: handed to accelerate's multi-process branch
    assert state.distributed_type == DistributedType.MULTI_GPU
