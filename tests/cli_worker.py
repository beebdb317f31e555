"""`cctuning` run as a subprocess by the fault and multi-process tests, with two test-only probes.

It is the real CLI (``cctuning.cli.main``) with these additions, switched on by environment
variables so that the library itself carries no test hooks:

* ``CCT_TEST_DUMP=DIR``: when training ends, each rank writes ``DIR/rank<R>.json`` with a hash of
  its whole state dict, the Decision Maker weight, and a hash of every batch it trained on.
* ``CCT_TEST_PAUSE_AT=N``: while saving checkpoint-N, after some of its files have landed, write
  ``<output>/paused`` and sleep, so that the test can SIGKILL the run at a known point.
* ``CCT_TEST_THREADS=N``: torch threads (match the test process to get the same numerics).
* ``CCT_TEST_PROBE=DIR``: for the sharded tests (FSDP, DeepSpeed ZeRO-3), each rank writes
  ``DIR/probe<R>.pt``: the engine, what its weights look like outside a forward, the inputs, captured
  activations and Decision Maker inputs of its first training step, the examples of every step, the
  logged losses, and the logits of the trained (still sharded) model on its first batch.
* ``CCT_TEST_ZERO3_RELEASE_ALL=1``: DeepSpeed ZeRO-3 keeps no weight gathered between forwards
  (``stage3_param_persistence_threshold`` 0; by default weights under 100k elements, all of a tiny
  model's, stay gathered), so every weight is an empty placeholder outside its module's forward.
* ``CCT_TEST_DS_NO_SHM_OP=1``: DeepSpeed on CPU does not JIT-compile its shared-memory all-reduce
  (a C++ op, 1-3 minutes with g++ on first use, cached in ~/.cache/torch_extensions). It serves only
  ``inference_all_reduce`` (tensor-parallel inference); training's collectives go through
  torch.distributed (gloo) either way.
* ``CCT_TEST_NO_NOISE=1``: the Decision Maker picks its layer without Gumbel noise (argmax, with the
  same straight-through gradient), so that runs that split a batch differently choose alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _install_dump(folder: Path) -> None:
    from cctuning.training.trainer import CCTrainer

    seen: list[str] = []
    compute_loss, train = CCTrainer.compute_loss, CCTrainer.train

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        seen.append(_digest([inputs["input_ids"]]))
        return compute_loss(self, model, inputs, *args, **kwargs)

    def dumping_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        model = self._cc_model()
        state = model.state_dict()
        rank = self.accelerator.process_index
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "world_size": self.accelerator.num_processes,
                    "state": _digest([state[k] for k in sorted(state)]),
                    "decision_maker": model.decision_maker.proj.weight.detach().cpu().tolist(),
                    "batches": seen,
                    "layer_counts": self.layer_counts.tolist(),
                }
            )
        )
        return result

    CCTrainer.compute_loss, CCTrainer.train = recording_compute_loss, dumping_train


def no_noise_gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, generator=None) -> torch.Tensor:
    """``hard_gumbel_softmax`` with zero noise: one-hot of the argmax forward, softmax gradient backward."""
    y_soft = (logits.float() / tau).softmax(-1)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, y_soft.argmax(-1, keepdim=True), 1.0)
    return (y_hard - y_soft.detach() + y_soft).to(logits.dtype)


def _install_no_noise() -> None:
    import cctuning.model.decision as decision

    decision.hard_gumbel_softmax = no_noise_gumbel_softmax


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's tokens without padding: the example, whatever the batch it was padded in."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]


def _weight_view(weight) -> dict:
    """What a weight looks like outside a forward: its type, shape and local (this rank's) size."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return {
        "type": type(weight).__name__,
        "shape": tuple(weight.shape),
        "local_numel": int(local.numel()),
        "ds_shape": tuple(weight.ds_shape) if hasattr(weight, "ds_shape") else None,
    }


def _install_probe(folder: Path) -> None:
    from cctuning.model.ccmodel import CCModel
    from cctuning.model.decision import DecisionMaker
    from cctuning.training.trainer import CCTrainer

    probe: dict = {"steps": []}
    collect, decide = CCModel.collect_activations, DecisionMaker.forward
    compute_loss, train = CCTrainer.compute_loss, CCTrainer.train

    def recording_collect(self, input_ids, attention_mask, positions, grad=False):
        acts = collect(self, input_ids, attention_mask, positions, grad)
        if self.training and "activations" not in probe:
            probe["en_batch"] = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "positions": positions,
            }
            probe["activations"] = acts.detach().clone()
        return acts

    def recording_decide(self, activations, embedding, *args, **kwargs):
        if self.training and "dm_embedding" not in probe:
            probe["dm_activations"] = activations.detach().clone()
            probe["dm_embedding"] = embedding.detach().clone()
        return decide(self, activations, embedding, *args, **kwargs)

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            probe.setdefault("batch", {k: v.detach().clone() for k, v in inputs.items()})
            probe["steps"].append(_rows(inputs["input_ids"], inputs["attention_mask"]))
        return compute_loss(self, model, inputs, *args, **kwargs)

    def probing_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        model = self._cc_model()
        probe["engine"] = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        probe["world_size"] = self.accelerator.num_processes
        probe["embedding_weight"] = _weight_view(model.arch.embeddings.weight)
        probe["dm_weight"] = _weight_view(model.decision_maker.proj.weight)
        probe["log_history"] = self.state.log_history
        batch = probe["batch"]
        plain = {k: batch[k] for k in ("input_ids", "attention_mask")}
        wrapped = self.model_wrapped  # the engine's module: its forward gathers the shards
        wrapped.eval()
        with torch.no_grad():
            probe["logits_plain"] = wrapped(**plain).logits.detach().clone()
            probe["logits_connected"] = wrapped(**batch).logits.detach().clone()
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(probe, folder / f"probe{self.accelerator.process_index}.pt")
        return result

    CCModel.collect_activations, DecisionMaker.forward = recording_collect, recording_decide
    CCTrainer.compute_loss, CCTrainer.train = recording_compute_loss, probing_train


def _install_zero3_release_all() -> None:
    from accelerate.utils import DeepSpeedPlugin

    post_init = DeepSpeedPlugin.__post_init__

    def releasing_post_init(self):
        post_init(self)
        zero = self.deepspeed_config.get("zero_optimization", {})
        if zero.get("stage") == 3:
            zero["stage3_param_persistence_threshold"] = 0

    DeepSpeedPlugin.__post_init__ = releasing_post_init


def _install_ds_no_shm_op() -> None:
    import importlib

    # by module name: the attribute deepspeed.comm.torch is the torch package (re-exported)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _install_pause(step: int) -> None:
    """Stop inside the save of checkpoint-``step``, between two renames of the staged files."""
    import cctuning.io as io

    real_replace = os.replace

    def pausing_replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        dst = Path(dst)
        if dst.parent.name == f"checkpoint-{step}" and dst.name == "config.json":
            (dst.parent.parent / "paused").write_text("paused\n")
            time.sleep(600)

    io.os = type(sys)("os_with_pause")
    io.os.__dict__.update(os.__dict__)
    io.os.replace = pausing_replace


def main() -> int:
    if os.environ.get("CCT_TEST_THREADS"):  # the same thread count as the test process: the same numerics
        torch.set_num_threads(int(os.environ["CCT_TEST_THREADS"]))
    if os.environ.get("CCT_TEST_DUMP"):
        _install_dump(Path(os.environ["CCT_TEST_DUMP"]))
    if os.environ.get("CCT_TEST_PROBE"):
        _install_probe(Path(os.environ["CCT_TEST_PROBE"]))
    if os.environ.get("CCT_TEST_NO_NOISE"):
        _install_no_noise()
    if os.environ.get("CCT_TEST_ZERO3_RELEASE_ALL"):
        _install_zero3_release_all()
    if os.environ.get("CCT_TEST_DS_NO_SHM_OP"):
        _install_ds_no_shm_op()
    if os.environ.get("CCT_TEST_PAUSE_AT"):
        _install_pause(int(os.environ["CCT_TEST_PAUSE_AT"]))
    from cctuning.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
