"""The trainer: what a run saves (the model, the Decision Maker, the layer counts), its checkpoints, and
resuming or reusing a run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cctuning.errors import CCError
from cctuning.io import INCOMPLETE_MARKER
from cctuning.model import CCModel
from cctuning.training import TrainConfig
from cctuning.training import run as run_module
from cctuning.training.run import last_checkpoint
from tests.conftest import FAST, ResumeCheck, train


@pytest.mark.parametrize("method", ["cc", "sft"])
def test_train_end_to_end(base_dir, data_file, tmp_path, capsys, method):
    out = tmp_path / "out"
    code = train(*FAST, model=base_dir, data=data_file, output=out, method=method)
    stdout = capsys.readouterr().out
    assert code == 0 and f"saved {method} model" in stdout
    cfg = json.loads((out / "cctuning_config.json").read_text())
    assert cfg["method"] == method and cfg["versions"]["torch"] == torch.__version__
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3 and results["records"] == 12
    base = load_file(str(base_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the LLM was trained
    model = CCModel.from_pretrained(out)
    assert model.cc_config.method == method
    if method == "cc":
        assert (out / "decision_maker.safetensors").is_file()
        assert sum(results["layer_choice_counts"]) == 12  # 3 steps × batch 4, one choice per example
    else:
        assert not (out / "decision_maker.safetensors").exists() and model.decision_maker is None


def test_resume_reaches_the_same_weights(base_dir, data_file, tmp_path, capsys):
    check = ResumeCheck(tmp_path, base_dir, data_file)
    check.run_full()
    check.keep_only("checkpoint-2")  # a run killed right after its first checkpoint
    check.resume()


def test_training_leaves_no_temporary_files_and_checkpoints_with_a_marker_are_skipped(
    base_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "o"
    options = dict(max_steps="2", batch_size="4", save_steps="1", save_total_limit="5")
    assert train(model=base_dir, data=data_file, output=out, **options) == 0
    capsys.readouterr()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    assert last_checkpoint(out) == str(out / "checkpoint-2")
    (out / "checkpoint-2" / INCOMPLETE_MARKER).write_text("")
    assert last_checkpoint(out) == str(out / "checkpoint-1")
    state = out / "checkpoint-1" / "trainer_state.json"
    state.write_text(state.read_text()[:20])  # the Trainer's own last file, cut by a kill
    assert last_checkpoint(out) is None


def test_train_or_reuse_reuses_a_finished_run_and_refuses_other_settings(
    base_dir, data_file, tmp_path, monkeypatch
):
    def cfg(**kw):
        options = dict(
            model=str(base_dir), data=str(data_file), output=str(tmp_path / "o"), max_steps=2, batch_size=2
        )
        return TrainConfig(**{**options, **kw})

    assert run_module.train_or_reuse(cfg()) is True
    results = tmp_path / "o" / run_module.TRAIN_RESULTS_NAME
    # a run that was itself resumed records resume='last'; it is still the same training
    data = json.loads(results.read_text())
    data["config"]["resume"] = "last"
    results.write_text(json.dumps(data))
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained again"))
    assert run_module.train_or_reuse(cfg()) is False
    with pytest.raises(CCError, match="holds a run with other settings"):
        run_module.train_or_reuse(cfg(lr=0.5))
