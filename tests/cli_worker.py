"""`cctuning` run as a subprocess by the fault and multi-process tests, with two test-only probes.

It is the real CLI (``cctuning.cli.main``) with these additions, switched on by environment
variables so that the library itself carries no test hooks:

* ``CCT_TEST_DUMP=DIR``: when training ends, each rank writes ``DIR/rank<R>.json`` with a hash of
  its whole state dict, the Decision Maker weight, and a hash of every batch it trained on.
* ``CCT_TEST_PAUSE_AT=N``: while saving checkpoint-N, after some of its files have landed, write
  ``<output>/paused`` and sleep, so that the test can SIGKILL the run at a known point.
* ``CCT_TEST_THREADS=N``: torch threads (match the test process to get the same numerics).
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
    if os.environ.get("CCT_TEST_PAUSE_AT"):
        _install_pause(int(os.environ["CCT_TEST_PAUSE_AT"]))
    from cctuning.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
