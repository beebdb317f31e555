"""`cctuning eval` and `cctuning report` end to end on a tiny model."""

import json

import pytest
import torch

import cctuning.eval.runner as runner
from cctuning.cli import main
from cctuning.eval.benchmarks import load_benchmark
from cctuning.eval.runner import EvalConfig, evaluate
from cctuning.inference import CCGenerator, TransformMatrix
from cctuning.model import CCConfig, CCModel
from cctuning.testing import tiny_model


@pytest.fixture(scope="module")
def cc_dir(tmp_path_factory, tokenizer):
    """A CC model folder with a matrix, as `cctuning train` + `fit-matrix` would leave it."""
    path = tmp_path_factory.mktemp("ccmodel")
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"}))
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size)))
    cc.save_pretrained(path, tokenizer=tokenizer)
    return path


def test_eval_end_to_end_two_benchmarks_and_resume(cc_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [
        "eval",
        "--model",
        str(cc_dir),
        "--benchmarks",
        "xnli,MKQA",
        "--langs",
        "sw,zh,en",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "**XNLI** (accuracy ×100)" in printed and "MKQA has no data for sw" in printed
    res = json.loads((out / "results.json").read_text())
    assert (
        res["connection"] == "transform"
        and res["limit"] == 2
        and res["versions"]["torch"] == torch.__version__
    )
    assert set(res["benchmarks"]) == {"XNLI", "MKQA"}
    assert set(res["benchmarks"]["XNLI"]["per_language"]) == {"en", "sw", "zh"}
    assert all(v["n"] == 2 for v in res["benchmarks"]["XNLI"]["per_language"].values())
    # the cached generations are what was scored: rescoring them by hand gives the same numbers
    from cctuning.eval.scoring import score_item

    for lang in ("sw", "zh"):
        rows = {
            str(json.loads(line)["id"]): json.loads(line)
            for line in (out / "generations" / "XNLI" / f"{lang}.jsonl").read_text().splitlines()
        }
        items = load_benchmark("XNLI", lang, limit=2)
        acc = sum(score_item(it, rows[str(it.id)]["output"])["accuracy"] for it in items) / 2
        assert res["benchmarks"]["XNLI"]["per_language"][lang]["accuracy"] == acc
        assert all(isinstance(r["layer"], int) for r in rows.values())
    assert (out / "results.csv").read_text().startswith("benchmark,lang,metric,value,n,unparsed")
    assert "| en | sw | zh | avg | avg w/o en |" in (out / "results.md").read_text()
    # resume: nothing is generated again
    calls = []
    real = runner._run_items
    monkeypatch.setattr(runner, "_run_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(args) == 0 and calls == []
    # an interrupted run (last line cut, one item missing) regenerates only what is missing
    cache = out / "generations" / "MKQA" / "zh.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:10])
    assert main(args) == 0 and len(calls) == 1
    assert json.loads((out / "results.json").read_text())["benchmarks"] == res["benchmarks"]
    # other settings in the same folder are refused
    assert main(args[:-2] + ["--connection", "none", "--output", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_likelihood_scoring_matches_a_hand_computation(cc_dir, tokenizer, tmp_path):
    model = CCModel.from_pretrained(cc_dir)
    cfg = EvalConfig(
        model=str(cc_dir),
        benchmarks=["XStoryCloze"],
        langs=["sw"],
        limit=3,
        connection="none",
        scoring="likelihood",
        output=str(tmp_path / "lik"),
    )
    res = evaluate(cfg, model, tokenizer, progress=False)
    gen = CCGenerator(model, tokenizer)
    correct = 0
    for item in load_benchmark("XStoryCloze", "sw", limit=3):
        ids = torch.tensor([gen.encoder.encode_prompt(item.prompt, gen._prompt_budget()).ids])
        with torch.no_grad():
            logp = torch.log_softmax(model.base(input_ids=ids).logits[0, -1], -1)
        label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in ("1", "2")]
        pred = ("1", "2")[int(torch.stack([logp[i] for i in label_ids]).argmax())]
        correct += pred == item.answer
    assert res["benchmarks"]["XStoryCloze"]["per_language"]["sw"]["accuracy"] == correct / 3


def test_plain_hf_folder_and_report(base_dir, cc_dir, tmp_path, capsys):
    a, b = tmp_path / "plain", tmp_path / "cc"
    common = ["--benchmarks", "XStoryCloze", "--langs", "en,sw", "--limit", "2", "--max-new-tokens", "3"]
    assert main(["eval", "--model", str(base_dir), "--output", str(a), *common]) == 0
    assert json.loads((a / "results.json").read_text())["connection"] == "none"
    assert (
        main(["eval", "--model", str(base_dir), "--connection", "transform", "--output", str(b), *common])
        == 2
    )
    assert "needs a CC-Tuning model" in capsys.readouterr().err
    assert main(["eval", "--model", str(cc_dir), "--output", str(b), *common]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--output", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert "| benchmark | lang | metric | plain (none, none) | cc (cc, transform) |" in table
    png = (tmp_path / "rep" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    csv_text = (tmp_path / "rep" / "report.csv").read_text()
    a_res = json.loads((a / "results.json").read_text())
    en = a_res["benchmarks"]["XStoryCloze"]["per_language"]["en"]["accuracy"]
    assert f"XStoryCloze,en,accuracy,{en}," in csv_text


@pytest.mark.parametrize("sample_layer", [0, 2])
def test_likelihood_chunks_hold_prompts_of_similar_length_and_give_the_same_scores(
    cc_dir, tokenizer, tmp_path, monkeypatch, sample_layer
):
    """Likelihood scoring sorts the items by prompt length before chunking them (less padding in each
    batch) unless the layer is sampled; the scores equal those of one item at a time."""
    model = CCModel.from_pretrained(cc_dir)
    calls = []
    original = CCGenerator.generate

    def spy(self, prompts, *args, **kwargs):
        calls.append([len(p) for p in prompts])
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(CCGenerator, "generate", spy)

    def run(batch_size, name):
        cfg = EvalConfig(model=str(cc_dir), benchmarks=["XNLI"], langs=["sw"], limit=12, scoring="likelihood",
                         batch_size=batch_size, sample_layer=sample_layer, output=str(tmp_path / name))  # fmt: skip
        return evaluate(cfg, model, tokenizer, progress=False)

    batched = run(2, "b2")
    chunks, calls[:] = list(calls), []
    single = run(1, "b1")
    file_order = [len(it.prompt) for it in load_benchmark("XNLI", "sw", limit=12)]
    lengths = [n for chunk in chunks for n in chunk]
    assert len(chunks) > 1  # the test tells sorted chunks from one sorted call
    assert lengths == (sorted(file_order) if sample_layer == 0 else file_order * sample_layer)  # per draw
    if sample_layer:  # the Gumbel draws follow the batches, so batch 2 and batch 1 may differ
        return
    a, b = batched["benchmarks"]["XNLI"], single["benchmarks"]["XNLI"]
    assert a["per_language"] == b["per_language"]

    def logprobs(name):
        root = tmp_path / name / "generations"
        return {
            (str(f.relative_to(root)), row["id"]): row["logprobs"]
            for f in root.rglob("*.jsonl")
            for row in map(json.loads, f.read_text(encoding="utf-8").splitlines())
        }

    two, one = logprobs("b2"), logprobs("b1")
    assert two.keys() == one.keys() and len(two) == 12
    for key, lp in two.items():
        for label, value in lp.items():
            assert abs(value - one[key][label]) < 1e-4
