"""Never lose or fake a result: output-folder rules, the folder lock, numeric guards and one-line
errors for damaged or hostile inputs. Each case here lost a run, passed off NaN as a result or
ended in a traceback before these rules existed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.io import LOCK_NAME, folder_lock
from cctuning.model import CCConfig, CCModel
from cctuning.model.transform import MATRIX_NAME, TransformMatrix
from cctuning.testing import tiny_model
from tests.conftest import flags, make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def train(base_dir, data, out, **options) -> int:
    opts = {"max_steps": 2, "batch_size": 4, "save_steps": 1, "warmup_ratio": 0, **options}
    return main(["train", *flags(model=base_dir, data=data, output=out, **opts)])


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cctuning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- output folders ------------------------------------------------------------------------------------
def test_output_equal_to_or_inside_the_base_model_is_refused(base_dir, data_file, tmp_path, capsys):
    before = (base_dir / "model.safetensors").read_bytes()
    for out, where in ((base_dir, "is"), (base_dir / "cc", "lies inside")):
        assert train(base_dir, data_file, out) == 2
        assert f"{where} the input --model" in one_error(capsys)
    assert (base_dir / "model.safetensors").read_bytes() == before
    assert not (base_dir / "cc").exists()


def test_a_folder_holding_another_run_is_refused_then_overwrite_replaces_it(
    base_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train(base_dir, data_file, out, max_steps=3) == 0
    assert main(["fit-matrix", *flags(model=out, data=data_file, samples=12)]) == 0
    capsys.readouterr()
    old = {p.name for p in out.iterdir()}
    assert {"checkpoint-3", MATRIX_NAME, "decision_maker.safetensors"} <= old
    assert train(base_dir, data_file, out, max_steps=2, seed=7) == 2
    line = one_error(capsys)
    assert "holds another run" in line and "--overwrite" in line and "--resume last" in line
    assert {p.name for p in out.iterdir()} == old  # nothing was touched
    # --overwrite clears the old run's files: no stale checkpoint-3 or matrix is left behind
    assert train(base_dir, data_file, out, max_steps=2, seed=7, overwrite=True) == 0
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-3" not in names and MATRIX_NAME not in names and "checkpoint-2" in names
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2
    # and the new run resumes and refits as usual
    assert main(["fit-matrix", *flags(model=out, data=data_file, samples=12)]) == 0
    assert CCModel.from_pretrained(out).transform is not None


def test_overwrite_keeps_files_that_are_not_the_runs(base_dir, data_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(base_dir, data_file, out) == 0  # files that are not a run's do not block
    assert train(base_dir, data_file, out, overwrite=True) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_output_that_is_a_file_or_under_a_file_is_one_line(base_dir, data_file, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train(base_dir, data_file, afile) == 2
    assert "exists and is not a folder" in one_error(capsys)
    assert train(base_dir, data_file, afile / "sub") == 2
    assert "cannot create the folder" in one_error(capsys)


def test_unwritable_output_fails_before_anything_is_computed(base_dir, data_file, tmp_path, capsys):
    # /proc refuses new entries even to root, so this holds whoever runs the tests
    started = time.perf_counter()
    assert train(base_dir, data_file, Path("/proc/self/cctuning-out")) == 2
    assert "cannot create the folder" in one_error(capsys)
    assert time.perf_counter() - started < 5


# -- the lock ------------------------------------------------------------------------------------------
def test_a_second_training_on_the_same_folder_names_the_holder(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    with folder_lock(out, "cctuning train"):
        assert train(base_dir, data_file, out) == 2
        line = one_error(capsys)
        assert f"in use by pid {os.getpid()} (cctuning train)" in line
    assert not (out / "model.safetensors").exists()
    assert train(base_dir, data_file, out) == 0  # released when the holder finished


def test_a_lock_left_by_a_killed_process_does_not_block(base_dir, data_file, tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys, time; from cctuning.io import folder_lock\n"
        "with folder_lock(sys.argv[1], 'holder'):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(CCError, match=f"in use by pid {proc.pid}"):
        with folder_lock(out, "test"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()  # the file stays, the lock does not
    assert train(base_dir, data_file, out) == 0
    assert not (out / LOCK_NAME).exists()  # a finished holder removes it


def test_a_second_experiment_on_the_same_folder_is_refused_before_it_writes(base_dir, tmp_path):
    from cctuning.lab.experiment import load_config, run_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        f"model: {base_dir}\noutput: {tmp_path / 'exp'}\nseeds: [1]\ntrain_per_lang: 1\n"
        "heldout_per_lang: 1\nlangs: sw\ntrain: {max_steps: 1, batch_size: 1}\n"
        "cells:\n  - {name: sft, method: sft}\n"
    )
    with folder_lock(tmp_path / "exp", "cctuning experiment"):
        with pytest.raises(CCError, match=rf"in use by pid {os.getpid()} \(cctuning experiment\)"):
            run_experiment(load_config(path), progress=False)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == []


# -- numeric guards ------------------------------------------------------------------------------------
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    base_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train(base_dir, data_file, out, lr=1e6, max_steps=6, scheduler="constant") == 2
    line = one_error(capsys)
    assert "training stopped" in line and "step " in line
    step = int(line.split("step ")[1].split(":")[0])
    assert not (out / "model.safetensors").exists()  # no result was saved
    assert not (out / "train_results.json").exists()
    for ckpt in out.glob("checkpoint-*"):  # every checkpoint written holds finite weights
        assert int(ckpt.name.split("-")[1]) < step
        tensors = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_non_finite_weights_are_never_saved(tokenizer, tmp_path):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    with torch.no_grad():
        next(cc.base.parameters())[0, 0] = float("nan")
    with pytest.raises(CCError, match="refusing to save.*NaN"):
        cc.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    with pytest.raises(CCError, match="refusing to save a transform matrix"):
        TransformMatrix(torch.full((4, 4), float("inf"))).save(tmp_path)


def test_nan_decision_maker_or_matrix_is_refused_on_load(tokenizer, tmp_path, capsys):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size)))
    cc.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    dm = tmp_path / "m" / "decision_maker.safetensors"
    good = dm.read_bytes()
    weight = load_file(str(dm))["weight"]
    weight[0, 0] = float("nan")
    save_file({"weight": weight}, str(dm))
    with pytest.raises(CCError, match="Decision Maker holds NaN"):
        CCModel.from_pretrained(tmp_path / "m")
    dm.write_bytes(good)
    save_file(
        {"matrix": torch.full((cc.arch.hidden_size,) * 2, float("nan"))}, str(tmp_path / "m" / MATRIX_NAME)
    )
    with pytest.raises(CCError, match="transform matrix holds NaN"):
        CCModel.from_pretrained(tmp_path / "m")
    assert main(["generate", *flags(model=tmp_path / "m", prompt="hi")]) == 2
    assert "transform matrix holds NaN" in one_error(capsys)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_steps": -5, "epochs": 0}, "zero steps"),
        ({"lr": 0}, "--lr must be > 0"),
        ({"lr": -1e-4}, "--lr must be > 0"),
        ({"batch_size": 0}, "--batch-size must be > 0"),
        ({"grad_accum": 0}, "--grad-accum must be > 0"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio must be between 0 and 1"),
    ],
)
def test_options_that_cannot_make_a_run_are_refused(base_dir, data_file, tmp_path, capsys, options, message):
    assert train(base_dir, data_file, tmp_path / "run", **options) == 2
    assert message in one_error(capsys)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# -- damaged and hostile inputs ------------------------------------------------------------------------
def _copy(base_dir, tmp_path, name) -> Path:
    folder = tmp_path / name
    shutil.copytree(base_dir, folder)
    return folder


def test_damaged_and_hostile_model_folders_are_one_line_errors(base_dir, data_file, tmp_path, capsys):
    cut = _copy(base_dir, tmp_path, "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert train(cut, data_file, tmp_path / "o1") == 2
    assert "damaged or truncated .safetensors" in one_error(capsys)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    pickled = _copy(base_dir, tmp_path, "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Hostile()}, pickled / "pytorch_model.bin", pickle_protocol=2)
    assert train(pickled, data_file, tmp_path / "o2") == 2
    assert "refused unread" in one_error(capsys)
    assert not (tmp_path / "PWNED").exists()

    custom = _copy(base_dir, tmp_path, "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_mine.MyLM"})
    (custom / "config.json").write_text(json.dumps(config))
    assert train(custom, data_file, tmp_path / "o3") == 2
    assert "--trust-remote-code" in one_error(capsys)


def test_data_that_is_a_directory_or_a_fifo_says_what_it_is(base_dir, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert train(base_dir, tmp_path / "d", tmp_path / "o") == 2  # the output outside the data folder
    assert "is a directory, not a data file" in one_error(capsys)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert train(base_dir, fifo, tmp_path / "o") == 2
    assert "is a named pipe (FIFO), not a data file" in one_error(capsys)


def test_a_config_whose_num_layers_disagrees_with_the_model_is_refused(tokenizer, tmp_path):
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig())
    cc.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    config_file = tmp_path / "m" / "cctuning_config.json"
    data = json.loads(config_file.read_text())
    data["num_layers"] += 1
    config_file.write_text(json.dumps(data))
    with pytest.raises(CCError, match="num_layers .* does not match the model"):
        CCModel.from_pretrained(tmp_path / "m")


# -- inference commands ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit-matrix", "--ridge", "-1"], "--ridge must be ≥ 0"),
        (["fit-matrix", "--heldout", "1"], "--heldout must be in [0, 1)"),
        (["fit-matrix", "--heldout", "-0.1"], "--heldout must be in [0, 1)"),
        (["fit-matrix", "--batch-size", "0"], "--batch-size must be > 0"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be > 0"),
        (["generate", "--prompt", "hi", "--batch-size", "0"], "--batch-size must be > 0"),
        (["eval", "--benchmarks", "XNLI", "--limit", "0"], "--limit must be > 0"),
        (["eval", "--benchmarks", "XNLI", "--batch-size", "0"], "--batch-size must be > 0"),
        (["eval", "--benchmarks", "XNLI", "--max-new-tokens", "-1"], "--max-new-tokens must be > 0"),
    ],
)
def test_inference_options_that_cannot_give_a_result_are_refused(
    trained_cc, data_file, capsys, argv, message
):
    extra = ["--data", str(data_file)] if argv[0] == "fit-matrix" else []
    before = {p.name: p.stat().st_mtime_ns for p in trained_cc.iterdir()}
    assert main([argv[0], "--model", str(trained_cc), *extra, *argv[1:]]) == 2
    assert message in one_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in trained_cc.iterdir()} == before  # nothing written


@pytest.fixture
def trained_cc(base_dir, data_file, tmp_path):
    out = tmp_path / "cc"
    assert train(base_dir, data_file, out, max_steps=2) == 0
    assert main(["fit-matrix", *flags(model=out, data=data_file, samples=12)]) == 0
    return out


def test_fit_matrix_replaces_a_retrained_models_stale_matrix(trained_cc, base_dir, data_file, capsys):
    assert train(base_dir, data_file, trained_cc, max_steps=3, seed=9, overwrite=True) == 0
    assert not (trained_cc / MATRIX_NAME).exists()  # --overwrite removed the old run's matrix
    assert main(["fit-matrix", *flags(model=trained_cc, data=data_file, samples=12)]) == 0
    # a stale matrix copied back in is refused on load, and fit-matrix replaces it
    model = CCModel.from_pretrained(trained_cc)
    stale = TransformMatrix(model.transform.matrix.clone(), {"decision_maker_sha256": "0" * 64})
    stale.save(trained_cc)
    with pytest.raises(CCError, match="fitted on another model"):
        CCModel.from_pretrained(trained_cc)
    assert main(["fit-matrix", *flags(model=trained_cc, data=data_file, samples=12)]) == 0
    assert CCModel.from_pretrained(trained_cc).transform is not None


def test_eval_never_reuses_generations_of_a_retrained_model(
    trained_cc, base_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "ev"
    argv = ["eval", *flags(model=trained_cc, benchmarks="XNLI", langs="sw", limit=2, output=out)]
    argv += flags(max_new_tokens=2, connection="none")
    assert main(argv) == 0
    capsys.readouterr()
    assert train(base_dir, data_file, trained_cc, max_steps=2, seed=11, overwrite=True) == 0
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error(capsys)
    assert "weights, Decision Maker or matrix changed" in line and "--overwrite" in line
    old = (out / "generations" / "XNLI" / "sw.jsonl").stat().st_mtime_ns
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "generations" / "XNLI" / "sw.jsonl").stat().st_mtime_ns != old  # generated anew
    run = json.loads((out / "run.json").read_text())
    from cctuning.io import folder_fingerprint

    assert run["fingerprint"]["weights"] == folder_fingerprint(trained_cc)


def test_nll_records_every_cut_and_flags_short_responses(trained_cc, tmp_path, caplog):
    from cctuning.eval.nll import evaluate_nll, load_items
    from cctuning.loading import load_for_inference

    long = [{**r, "instruction": r["instruction"] * 30} for r in make_records(4)]
    data = write_jsonl(tmp_path / "long.jsonl", long + make_records(4))
    model, tok, _ = load_for_inference(str(trained_cc))
    budget = 40
    rep = evaluate_nll(
        model, tok, data, "none", tmp_path / "nll", max_length=budget, progress=False, min_response_tokens=50
    )
    items = load_items(tmp_path / "nll")
    from cctuning.data.encoding import PromptEncoder

    enc = PromptEncoder(tok, model.cc_config.prompt_format, budget)
    for rec, item in zip(long + make_records(4), items):
        ex = enc.encode_example(rec["instruction"], rec["output"])
        assert (item["response_cut"], item["instruction_cut"]) == (ex.response_cut, ex.instruction_cut)
        assert item["short"] == (ex.response_cut > 0 and item["tokens"] < 50)
    trunc = rep["truncation"]
    assert trunc["instructions_cut"] == sum(1 for i in items if i["instruction_cut"]) > 0
    assert trunc["short_items"] == sum(i["short"] for i in items)
    assert trunc["short_items"] > 0 and "flagged 'short'" in caplog.text


# -- memory on huge records ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "plain"])
@pytest.mark.parametrize("chars_per_token", [1, 2, 4])
def test_a_character_cut_before_tokenising_gives_the_ids_of_the_uncut_text(
    monkeypatch, mode, chars_per_token
):
    """The bound is tried so tight that the first cut keeps too few tokens and is redone; every
    feature still equals the encoding with no character cut at all."""
    from cctuning.data import encoding
    from cctuning.data.encoding import PromptEncoder, PromptFormat
    from cctuning.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    words = "habari ya asubuhi rafiki yangu 请回答下面的问题 Привет как дела ".split()
    instruction = " ".join(words[i % len(words)] for i in range(3000))
    output = " ".join(words[(7 * i) % len(words)] for i in range(3000))
    cases = [
        (instruction, output, instruction[::-1]),
        ("short question", output, "short"),
        (instruction, "ok", None),
    ]
    for max_length in (48, 200):
        monkeypatch.setattr(encoding, "CHARS_PER_TOKEN", 10**9)
        exact = PromptEncoder(tok, PromptFormat(mode=mode), max_length=max_length)
        want = [exact.encode_example(*c) for c in cases]
        assert all(ex.precut_chars == 0 for ex in want)
        monkeypatch.setattr(encoding, "CHARS_PER_TOKEN", chars_per_token)
        bounded = PromptEncoder(tok, PromptFormat(mode=mode), max_length=max_length)
        got = [bounded.encode_example(*c) for c in cases]
        for g, w in zip(got, want):
            assert g.features() == w.features()
            assert (g.response_cut > 0, g.instruction_cut > 0) == (w.response_cut > 0, w.instruction_cut > 0)
        assert got[0].precut_chars > 0 and bounded.stats.precut_examples >= 1
        assert "before tokenising" in bounded.stats.summary()


HUGE_SCRIPT = """
import json, resource, sys
from cctuning.data.encoding import PromptEncoder, encode_records
from cctuning.data.records import load_records
from cctuning.testing import tiny_tokenizer
tok = tiny_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
records = load_records(sys.argv[1])
features = encode_records(records, PromptEncoder(tok, max_length=int(sys.argv[2])), with_english=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "lengths": [len(f["input_ids"]) for f in features],
                  "en_lengths": [len(f["en_input_ids"]) for f in features]}))
"""


@pytest.mark.slow
def test_a_50_mb_record_is_encoded_in_bounded_memory(tmp_path):
    """One 50 MB instruction, one 50 MB response and one 50 MB English prompt: the encoder holds
    under 1 GB above what the process held before loading them (the old path took 9.7 GB and more
    than two minutes on the 50 MB instruction alone)."""
    size = 50 * 2**20
    unit = "maswali na majibu ya kila siku "
    big = (unit * (size // len(unit) + 1))[:size]
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            json.dumps({"instruction": big, "output": "jibu", "instruction_en": "q", "lang": "sw"}) + "\n"
        )
        f.write(
            json.dumps({"instruction": "swali", "output": big, "instruction_en": big, "lang": "sw"}) + "\n"
        )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT, str(path), "128"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["lengths"] == [128, 128] and out["en_lengths"][0] < 64 and out["en_lengths"][1] == 128
    assert (out["peak_kb"] - out["before_kb"]) * 1024 < 2**30, out
