"""`cctuning export` and the portable base reference of LoRA runs (issue 15, Export).

Merged logits are compared with the adapter's within atol = rtol = 1e-4 (float32 tiny Llama: merging
W + B·A·scale into one matrix changes the rounding, not the function); everything copied or re-saved
without a merge is compared exactly.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cctuning import loading
from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.inference import TransformMatrix
from cctuning.inference.export import export_model
from cctuning.io import folder_lock, sha256_file
from cctuning.loading import load_for_inference
from cctuning.model import CCConfig, CCModel, baseref
from cctuning.model.baseref import weights_fingerprint
from cctuning.model.connection import connected_forward
from cctuning.model.lora import add_lora
from cctuning.testing import tiny_model
from tests.conftest import FAST, train
from tests.test_model import batch_for

MERGE_TOL = dict(atol=1e-4, rtol=1e-4)
EXACT = dict(atol=0, rtol=0)
PORTABLE = ("base_model_relative", "base_model_id", "base_model_fingerprint")


def save_base(folder, tokenizer, seed=0):
    tiny_model("llama", seed=seed, tokenizer=tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_lora_run(base, run, tokenizer, fusion="gated", lora=True):
    """A trained-looking CC run on ``base``: non-zero LoRA B (it starts at 0), Decision Maker and gates,
    and a Transform Matrix that is not the identity, so that every part changes the logits."""
    torch.manual_seed(0)
    model = CCModel._load_base(base)
    if lora:
        model = add_lora(model, 4)
    cc = CCModel.from_base(model, CCConfig(base_model=str(base), fusion=fusion))
    with torch.no_grad():
        for name, p in cc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        cc.decision_maker.proj.weight.normal_(0, 1.0)
        if cc.fusion.gate is not None:
            cc.fusion.gate.uniform_(0.5, 1.5)
    d = cc.arch.hidden_size
    cc.set_transform(TransformMatrix(torch.eye(d) + 0.3 * torch.randn(d, d)))
    cc.eval().save_pretrained(run, tokenizer=tokenizer)
    return run


def logits(cc, batch, connection):
    with torch.no_grad():
        out = connected_forward(
            cc,
            connection,
            batch["input_ids"],
            batch["attention_mask"],
            batch["cc_position"],
            batch["en_input_ids"],
            batch["en_attention_mask"],
            batch["en_cc_position"],
        )
    return out.logits


@pytest.fixture
def project(tmp_path, tokenizer):
    """project/base (a base model folder) and project/runs/lora (a LoRA run on it)."""
    base = save_base(tmp_path / "project" / "base", tokenizer)
    run = make_lora_run(base, tmp_path / "project" / "runs" / "lora", tokenizer)
    return base, run


# -- export ----------------------------------------------------------------------------------------
def test_merged_export_computes_what_the_adapter_run_computes(project, tmp_path, tokenizer):
    base, run = project
    out = tmp_path / "export"
    result = export_model(run, out, merge_lora=True)
    assert result.kind == "merged" and result.base_model is None and result.method == "cc"
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "decision_maker.safetensors",
        "transform_matrix.safetensors",
        "cctuning_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert not {"adapter_model.safetensors", "adapter_config.json", ".cctuning.lock"} & files
    assert not any(p.name.startswith(".export") for p in tmp_path.iterdir())  # no stage left
    # the Decision Maker, its gates and the matrix are carried over unchanged
    for name in ("decision_maker.safetensors",):
        a, b = load_file(str(run / name)), load_file(str(out / name))
        assert a.keys() == b.keys() == {"weight", "gate"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        load_file(str(run / "transform_matrix.safetensors"))["matrix"],
        load_file(str(out / "transform_matrix.safetensors"))["matrix"],
    )
    config = json.loads((out / "cctuning_config.json").read_text())
    assert config["export"]["kind"] == "merged" and config["export"]["source"] == str(run.resolve())
    assert config["fusion"] == "gated" and config["base_model_fingerprint"] == weights_fingerprint(base)

    original, exported = CCModel.from_pretrained(run), CCModel.from_pretrained(out)
    assert original.uses_lora and not exported.uses_lora and exported.transform is not None
    b = batch_for(tokenizer, "left")
    for connection in ("none", "transform", "english"):
        torch.testing.assert_close(
            logits(exported, b, connection), logits(original, b, connection), **MERGE_TOL
        )
    # the comparison can fail: the adapter and the connection both change the logits
    with original.base.disable_adapter():
        bare = logits(original, b, "none")
    assert (bare - logits(original, b, "none")).abs().max() > 1e-2
    assert (logits(original, b, "transform") - logits(original, b, "none")).abs().max() > 1e-2
    # plain transformers loads the export as a normal model: connection none
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(plain_logits, logits(exported, b, "none"), **EXACT)
    torch.testing.assert_close(plain_logits, logits(original, b, "none"), **MERGE_TOL)


def test_adapter_export_without_merge_keeps_the_adapter_and_records_its_base(project, tmp_path, tokenizer):
    base, run = project
    out = tmp_path / "project" / "exports" / "lora"
    result = export_model(run, out)
    assert result.kind == "adapter" and result.base_model == str(base.resolve())
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "decision_maker.safetensors"} <= files
    assert "model.safetensors" not in files
    config = json.loads((out / "cctuning_config.json").read_text())
    assert config["base_model_relative"] == "../../base"
    assert config["base_model_fingerprint"] == weights_fingerprint(base)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    b = batch_for(tokenizer)
    original, exported = CCModel.from_pretrained(run), CCModel.from_pretrained(out)
    assert exported.uses_lora
    for connection in ("none", "transform"):
        torch.testing.assert_close(logits(exported, b, connection), logits(original, b, connection), **EXACT)
    # transformers with PEFT loads base + adapter from adapter_config.json
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(plain_logits, logits(original, b, "none"), **MERGE_TOL)


def test_full_weight_run_exports_exactly_and_merge_is_a_no_op(tmp_path, tokenizer):
    base = save_base(tmp_path / "base", tokenizer)
    run = make_lora_run(base, tmp_path / "run", tokenizer, fusion="add", lora=False)
    (run / "train_results.json").write_text("{}")
    (run / "checkpoint-2").mkdir()
    result = export_model(run, tmp_path / "out", merge_lora=True)
    assert result.kind == "full" and result.merge_ignored
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and not {"train_results.json", "checkpoint-2"} & files
    b = batch_for(tokenizer)
    original, exported = CCModel.from_pretrained(run), CCModel.from_pretrained(tmp_path / "out")
    for connection in ("none", "transform", "english"):
        torch.testing.assert_close(logits(exported, b, connection), logits(original, b, connection), **EXACT)


# -- the portable base ------------------------------------------------------------------------------
def test_lora_run_records_its_base_portably_and_still_loads_after_a_move(project, tmp_path, tokenizer):
    base, run = project
    config = json.loads((run / "cctuning_config.json").read_text())
    assert config["base_model"] == str(base.resolve())
    assert config["base_model_relative"] == "../../base"
    assert config["base_model_fingerprint"] == weights_fingerprint(base)
    b = batch_for(tokenizer)
    before = logits(CCModel.from_pretrained(run), b, "transform")
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(tmp_path / "project", moved)
    assert not base.exists()
    new_run = moved / "runs" / "lora"
    for loaded in (CCModel.from_pretrained(new_run), load_for_inference(str(new_run))[0]):
        torch.testing.assert_close(logits(loaded, b, "transform"), before, **EXACT)
    # another model where the base was: refused by its fingerprint, loaded only when given explicitly
    shutil.rmtree(moved / "base")
    save_base(moved / "base", tokenizer, seed=1)
    with pytest.raises(CCError, match="other weights than the base") as err:
        CCModel.from_pretrained(new_run)
    assert "\n" not in str(err.value)
    assert CCModel.from_pretrained(new_run, base_model=str(moved / "base")).uses_lora
    # no base anywhere: one line naming what was recorded
    shutil.rmtree(moved / "base")
    for load in (lambda: CCModel.from_pretrained(new_run), lambda: load_for_inference(str(new_run))):
        with pytest.raises(CCError, match="base model of the LoRA adapter not found") as err:
            load()
        message = str(err.value)
        assert "\n" not in message and str(base.resolve()) in message and "../../base" in message


def test_a_base_named_by_preset_is_recorded_by_name_and_found_through_the_loading_layer(
    tmp_path, tokenizer, monkeypatch
):
    preset = save_base(tmp_path / "cache" / "tiny-preset", tokenizer)
    (preset / "cctuning_preset.json").write_text(json.dumps({"preset": "tiny-preset"}))
    torch.manual_seed(0)
    cc = CCModel.from_base(add_lora(CCModel._load_base(preset), 4), CCConfig(base_model="tiny-preset"))
    run = tmp_path / "run"
    cc.save_pretrained(run, tokenizer=tokenizer)
    config = json.loads((run / "cctuning_config.json").read_text())
    assert config["base_model"] == config["base_model_id"] == "tiny-preset"
    assert config["base_model_relative"] is None  # a preset is found by name, not by a path
    assert config["base_model_fingerprint"] == weights_fingerprint(preset)
    # the preset folder moves (rebuilt elsewhere): PEFT's absolute path breaks, the name still resolves
    moved = tmp_path / "cache2" / "tiny-preset"
    shutil.move(preset, moved)
    with pytest.raises(CCError, match="load_for_inference to resolve a preset name"):
        CCModel.from_pretrained(run)
    monkeypatch.setattr(
        loading, "resolve_model_path", lambda name: str(moved) if name == "tiny-preset" else name
    )
    assert loading.lora_base_path(run) == str(moved)
    assert load_for_inference(str(run))[0].uses_lora


def test_a_folder_saved_before_the_portable_fields_still_loads(project, tokenizer):
    base, run = project
    config = json.loads((run / "cctuning_config.json").read_text())
    for key in PORTABLE:
        config.pop(key)
    (run / "cctuning_config.json").write_text(json.dumps(config))
    b = batch_for(tokenizer)
    loaded = CCModel.from_pretrained(run)
    assert loaded.uses_lora and loaded.cc_config.base_model == str(base.resolve())
    assert logits(loaded, b, "none").shape[0] == b["input_ids"].shape[0]


def test_weights_fingerprint_is_content_only_and_samples_large_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    (a / "notes.txt").write_text("not a weight file")
    shutil.copytree(a, b)
    (b / "notes.txt").write_text("changed")
    assert weights_fingerprint(a) == weights_fingerprint(b) is not None
    assert weights_fingerprint(tmp_path) is None  # no weight files
    monkeypatch.setattr(baseref, "SAMPLE_BYTES", 256)  # 8 samples of 256 bytes of a 16 KiB file
    sampled = weights_fingerprint(a)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[0] ^= 1  # inside the first sample
    (b / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(b) != sampled


# -- refusals -------------------------------------------------------------------------------------------
def test_export_refusals_leave_nothing_behind(project, tmp_path, monkeypatch):
    base, run = project
    full = tmp_path / "full"
    (full / "notes").mkdir(parents=True)
    with pytest.raises(CCError, match="is not empty"):
        export_model(run, full)
    with pytest.raises(CCError, match="not a model folder"):
        export_model(run, full, overwrite=True)
    for inside in (run, run / "export"):
        with pytest.raises(CCError, match="is the model folder or inside it"):
            export_model(run, inside, overwrite=True)
    with pytest.raises(CCError, match="holds the model folder"):
        export_model(run, tmp_path / "project", overwrite=True)
    with pytest.raises(CCError, match="is the input --model's base"):
        export_model(run, base, overwrite=True)
    with folder_lock(tmp_path / "locked", "a test"), pytest.raises(CCError, match="in use by"):
        export_model(run, tmp_path / "locked")
    # a missing base: one line naming it, and no output folder or stage left
    shutil.move(base, tmp_path / "hidden")
    with pytest.raises(CCError, match="not found: recorded") as err:
        export_model(run, tmp_path / "new" / "out", merge_lora=True)
    assert "\n" not in str(err.value) and str(base.resolve()) in str(err.value)
    assert not (tmp_path / "new").exists()
    # the base given explicitly; a failure while building leaves nothing either
    monkeypatch.setattr(
        CCModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        export_model(run, tmp_path / "new" / "out", base_model=str(tmp_path / "hidden"))
    assert not (tmp_path / "new").exists()
    assert not (run / ".cctuning.lock").exists()


def test_overwrite_replaces_an_earlier_export(project, tmp_path):
    base, run = project
    out = tmp_path / "out"
    export_model(run, out)
    (out / "stray.txt").write_text("from before")
    (tmp_path / ".out.export-abandoned").mkdir()  # what a killed export leaves
    result = export_model(run, out, merge_lora=True, overwrite=True)
    assert result.kind == "merged" and "stray.txt" not in result.files
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    assert not (tmp_path / ".out.export-abandoned").exists()
    stamp = json.loads((out / "transform_matrix.json").read_text())["decision_maker_sha256"]
    assert stamp == sha256_file(out / "decision_maker.safetensors")


# -- the command line ---------------------------------------------------------------------------------
def test_cli_trains_a_lora_run_and_exports_it(tmp_path, tokenizer, data_file, capsys):
    base = save_base(tmp_path / "base", tokenizer)
    run, out = tmp_path / "runs" / "lora", tmp_path / "out"
    assert train(*FAST, model=base, data=data_file, output=run, lora_r=4) == 0
    config = json.loads((run / "cctuning_config.json").read_text())
    assert config["base_model_relative"] == "../../base"
    assert config["base_model_fingerprint"] == weights_fingerprint(base)
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--output", str(out), "--merge-lora"]) == 0
    printed = capsys.readouterr().out
    assert "merged" in printed and str(out) in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err
    assert main(["export", "--model", str(run), "--output", str(tmp_path / "adapter")]) == 0
    assert "needs its base model" in capsys.readouterr().out
