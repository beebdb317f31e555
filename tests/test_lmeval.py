"""The lm-evaluation-harness backend (cctuning/eval/lmeval.py), checked against lm-eval's own ``hf``
model, ``cctuning eval --nll``, ``cctuning eval`` and by hand; everything offline."""

import inspect
import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from cctuning.cli import lm_eval as lm_eval_cli  # noqa: E402
from cctuning.cli import main  # noqa: E402
from cctuning.data.encoding import PromptFormat  # noqa: E402
from cctuning.errors import CCError  # noqa: E402
from cctuning.eval import lmeval, lmeval_tasks  # noqa: E402
from cctuning.eval.benchmarks import Item, load_benchmark  # noqa: E402
from cctuning.eval.nll import evaluate_nll, load_items  # noqa: E402
from cctuning.eval.runner import EvalConfig, evaluate  # noqa: E402
from cctuning.eval.scoring import score_item  # noqa: E402
from cctuning.inference import TransformMatrix  # noqa: E402
from cctuning.loading import resolve_device  # noqa: E402
from cctuning.model import CCConfig, CCModel  # noqa: E402
from cctuning.testing import CHATML_TEMPLATE, tiny_model, tiny_tokenizer  # noqa: E402
from tests.conftest import connected_model, make_records, write_jsonl  # noqa: E402

CONTEXTS = [
    "Habari ya asubuhi, rafiki yangu? Tafadhali jibu swali hili.",
    "请回答下面的问题。今天天气很好。",
    "ما هي عاصمة مصر؟",
    "hi",
    "The quick brown fox jumps over the lazy dog. Answer the question: ",  # trailing space
    "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।\n",  # trailing newline
    "Привет, как дела?" * 3,
    "1 2 3 4 5 6 7 8 9 0 (1) (2) (3) A B C D: answer is",
]
CONTINUATIONS = [" 1", "2", " Nzuri sana, asante.", "القاهرة", " B", "\n\nYes, indeed."]


def connected(tokenizer, arch="llama", seed=0):
    """A CC model whose connection visibly changes its output (strong Decision Maker, non-trivial matrix)."""
    cc = connected_model(tokenizer, arch, seed)
    # the template's end of turn is an eos of the model, so that lm-eval's hf model stops where we do
    cc.base.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    return cc


def requests(kind: str, args: list[tuple], docs: list[dict] | None = None) -> list[Instance]:
    docs = docs or [{}] * len(args)
    return [
        Instance(kind, doc, arguments, idx=0, metadata=("test", i, 1))
        for i, (arguments, doc) in enumerate(zip(args, docs))
    ]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def cc(tok):
    return connected(tok)


@pytest.fixture(scope="module")
def hf(cc, tok):
    return HFLM(pretrained=cc.base, tokenizer=tok, batch_size=8, max_length=48)


def ours(cc, tok, **kwargs) -> lmeval.CCLM:
    kwargs = {"batch_size": 8, "max_length": 48, **kwargs}
    return lmeval.CCLM(pretrained=cc, tokenizer=tok, device="cpu", **kwargs)


def test_connection_none_equals_lm_evals_hf_model(cc, tok, hf):
    """Log-likelihoods (within 1e-5) and greedy generations as lm-eval's ``hf`` model on ``model.base``,
    for mixed lengths in batches of 8, the empty context, trailing whitespace and left truncation
    (max_length 48)."""
    lm = ours(cc, tok, connection="none")
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS[:4]] + [("", "Habari ya asubuhi")]
    reqs = requests("loglikelihood", pairs)
    got, want = lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert len(got) == len(pairs) == 33
    for (value, greedy), (ref, ref_greedy) in zip(got, want):
        assert abs(value - ref) < 1e-5 and greedy == ref_greedy
    assert len({round(v, 3) for v, _ in got}) > 20  # the requests really differ
    texts = requests("loglikelihood_rolling", [(c * 4,) for c in CONTEXTS])  # several windows each
    for value, ref in zip(lm.loglikelihood_rolling(texts), hf.loglikelihood_rolling(texts)):
        assert abs(value - ref) < 1e-5
    options = [{"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}, {"until": [], "max_gen_toks": 5}]
    gens = requests("generate_until", [(c, options[i % 2]) for i, c in enumerate(CONTEXTS * 3)])
    got, want = lm.generate_until(gens), hf.generate_until(gens)
    assert got == want and len(got) == 24 and all(got)


def test_apply_chat_template_renders_prompts_as_training(cc, tok):
    lm = ours(cc, tok)
    encoder = lm.encoder
    for text in CONTEXTS[:3]:
        assert lm.apply_chat_template([{"role": "user", "content": text}]) == encoder.render_prompt(text)[0]
    system = CCModel.from_base(
        tiny_model(tokenizer=tok), CCConfig(prompt_format=PromptFormat(system_prompt="Be brief."))
    )
    lm = lmeval.CCLM(pretrained=system, tokenizer=tok, device="cpu")
    rendered = lm.apply_chat_template([{"role": "user", "content": "Habari?"}])
    assert rendered == lm.encoder.render_prompt("Habari?")[0] and "Be brief." in rendered
    plain_tok = tiny_tokenizer(chat_template=False)
    lm = lmeval.CCLM(
        pretrained=CCModel.from_base(tiny_model(tokenizer=plain_tok), CCConfig()), tokenizer=plain_tok
    )
    assert (
        lm.apply_chat_template([{"role": "user", "content": "Habari?"}])
        == lm.encoder.render_prompt("Habari?")[0]
    )
    shot = lm.apply_chat_template(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    )
    assert shot == "<s>### Instruction:\na\n\n### Response:\nb</s>### Instruction:\nc\n\n### Response:\n"


@pytest.mark.parametrize("connection", ["transform", "english", "none"])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_loglikelihood_is_eval_nll_teacher_forced_value(tmp_path, connection, trailing_newline):
    """context = the rendered prompt, continuation = the rendered response: lm-eval's log-likelihood is
    minus ``cctuning eval --nll``'s summed NLL of the response. When the prompt ends in whitespace
    (ChatML's "assistant\\n"), lm-eval moves it into the continuation: the value then also holds the
    log-probability of that last prompt token, predicted before p and so free of the connection."""
    tok = tiny_tokenizer()
    if not trailing_newline:
        tok.chat_template = CHATML_TEMPLATE.replace(
            "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant{% endif %}"
        )
    cc = connected(tok, seed=1)
    data = write_jsonl(tmp_path / "heldout.jsonl", make_records(8))
    evaluate_nll(cc, tok, data, connection, output=tmp_path / "nll", batch_size=3, progress=False)
    expected = [-item["nll_sum"] for item in load_items(tmp_path / "nll")]
    lm = ours(cc, tok, connection=connection, batch_size=3, max_length=None)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    args, docs, extra = [], [], []
    for rec in records:
        prompt, _ = lm.encoder.render_prompt(rec["instruction"])
        args.append((prompt, lm.encoder.render_completion(rec["instruction"], rec["output"], prompt)))
        docs.append({"prompt_en": rec["instruction_en"]})
        ids = torch.tensor([lm.encoder.encode_prompt(rec["instruction"]).ids])
        with torch.no_grad():
            logits = cc.base(ids[:, :-1]).logits[0, -1]
        extra.append(float(torch.log_softmax(logits, -1)[ids[0, -1]]) if trailing_newline else 0.0)
    assert trailing_newline == prompt.endswith("\n")
    got = [value for value, _ in lm.loglikelihood(requests("loglikelihood", args, docs))]
    for value, want, add in zip(got, expected, extra):
        assert value == pytest.approx(want + add, abs=1e-4)
    if connection != "none":  # the connection changes the values, so p was where eval --nll puts it
        plain = ours(cc, tok, connection="none").loglikelihood(requests("loglikelihood", args))
        assert all(abs(v - p) > 1e-3 for v, (p, _) in zip(got, plain))


def test_sample_layer_is_seeded_and_averages_draws(cc, tok):
    reqs = requests("loglikelihood", [(c, " 1") for c in CONTEXTS])
    argmax = ours(cc, tok).loglikelihood(reqs)
    once = [ours(cc, tok, sample_layer=1, seed=s).loglikelihood(reqs) for s in (0, 1)]
    twice = ours(cc, tok, sample_layer=2, seed=0).loglikelihood(reqs)
    assert once[0] == ours(cc, tok, sample_layer=1, seed=0).loglikelihood(reqs)
    for a, b, m in zip(once[0], once[1], twice):
        assert m[0] == pytest.approx((a[0] + b[0]) / 2, abs=1e-5)
    assert any(abs(a[0] - m[0]) > 1e-4 for a, m in zip(argmax, twice))


def test_stop_strings_cut_generations_where_lm_eval_expects(cc, tok, hf):
    """``until`` cuts a generation at the first occurrence of a stop string, which lm-eval strips; the
    generation itself stops at the token that completes it (transformers' stop strings)."""
    lm = ours(cc, tok, connection="transform")
    free = lm.generate_until(
        requests("generate_until", [(c, {"until": [], "max_gen_toks": 20}) for c in CONTEXTS])
    )
    words = [w for text in free for w in set(re.findall("[A-Za-z]{4,}", text))]
    stop = max(words, key=words.count)  # a word of several generations
    cut = lm.generate_until(
        requests("generate_until", [(c, {"until": [stop], "max_gen_toks": 20}) for c in CONTEXTS])
    )
    assert cut == [text.split(stop)[0] for text in free]
    assert sum(stop in text for text in free) >= 2 and sum(c != f for c, f in zip(cut, free)) >= 2
    encoded = [lmeval.EncodedPrompt(ids=ids, position=len(ids) - 1) for ids in map(lm.tok_encode, CONTEXTS)]
    full = lm.generator.generate_encoded(encoded, "transform", max_new_tokens=20)
    stopped = lm.generator.generate_encoded(encoded, "transform", max_new_tokens=20, stop_strings=[stop])
    for a, b in zip(full, stopped):
        ends = [k for k in range(1, len(a.token_ids) + 1) if stop in tok.decode(a.token_ids[:k])]
        assert b.token_ids == a.token_ids[: ends[0] if ends else len(a.token_ids)]
    # lm-eval's hf model cuts them in the same places (connection none)
    plain = ours(cc, tok, connection="none")
    reqs = requests("generate_until", [(c, {"until": [stop, " A"], "max_gen_toks": 20}) for c in CONTEXTS])
    assert plain.generate_until(reqs) == hf.generate_until(reqs)


def test_english_reads_the_prompt_from_the_document(tok):
    """With the English prompt equal to the rendered prompt's instruction and an identity matrix, the
    oracle adds the activations the transform adds: the same log-likelihoods and generations."""
    cc = connected(tok, seed=4)
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size)))
    # max_length: the context's own (512), so that lm-eval's left truncation cuts nothing
    transform = ours(cc, tok, connection="transform", max_length=None)
    english = ours(cc, tok, connection="english", english_field="en", max_length=None)
    contexts = [transform.apply_chat_template([{"role": "user", "content": c}]) for c in CONTEXTS]
    docs = [{"en": c} for c in CONTEXTS]
    pairs = [(c, " 1") for c in contexts]
    for a, b in zip(
        transform.loglikelihood(requests("loglikelihood", pairs)),
        english.loglikelihood(requests("loglikelihood", pairs, docs)),
    ):
        assert a[0] == pytest.approx(b[0], abs=1e-5)
    gens = [(c, {"until": [], "max_gen_toks": 6}) for c in contexts]
    assert transform.generate_until(requests("generate_until", gens)) == english.generate_until(
        requests("generate_until", gens, docs)
    )
    plain = ours(cc, tok, connection="none", max_length=None).loglikelihood(requests("loglikelihood", pairs))
    other = english.loglikelihood(requests("loglikelihood", pairs, [{"en": "Good morning?"}] * len(pairs)))
    assert all(abs(a[0] - p[0]) > 1e-3 for a, p in zip(other, plain))


def test_model_args_and_errors(cc, tok):
    lm = lmeval.CCLM.create_from_arg_obj(
        {"pretrained": cc, "tokenizer": tok, "batch_size": 3, "connection": "none"},
        {"batch_size": 1, "device": "cuda:0"},
    )
    assert lm.batch_size == 3 and lm.connection == "none" and lm.device.type in ("cpu", "cuda")
    with pytest.raises(CCError, match="does not take colour"):
        lmeval.CCLM(pretrained=cc, tokenizer=tok, colour="red")
    with pytest.raises(CCError, match="sample_layer"):
        lmeval.CCLM(pretrained=cc, tokenizer=tok, sample_layer=-1)
    sft = CCModel.from_base(tiny_model(tokenizer=tok), CCConfig(method="sft"))
    with pytest.raises(CCError, match="needs a CC-Tuning model"):
        lmeval.CCLM(pretrained=sft, tokenizer=tok, connection="transform")
    english = ours(cc, tok, connection="english")
    with pytest.raises(CCError, match="field 'prompt_en'"):
        english.loglikelihood(requests("loglikelihood", [("Habari?", " 1")], [{"prompt": "Habari?"}]))
    with pytest.raises(CCError, match="rolling"):
        english.loglikelihood_rolling(requests("loglikelihood_rolling", [("Habari?",)]))


def test_shipped_task_configs_are_written_by_the_function_and_load_offline(tmp_path):
    shipped = {
        str(p.relative_to(lmeval_tasks.TASKS_DIR)): p.read_text(encoding="utf-8")
        for p in lmeval_tasks.TASKS_DIR.rglob("*.yaml")
    }
    assert shipped == lmeval_tasks.task_configs()
    manager = lmeval_tasks.task_manager(include_defaults=False)
    for group in ("cctuning_xnli", "cctuning_xnli_gen", "cctuning_xstorycloze", "cctuning_mmmlu", "cctuning_xquad",
                  "cctuning_mkqa", "cctuning_xlsum"):  # fmt: skip
        assert group in manager.all_groups
    assert "cctuning_xstorycloze_sw" in manager.all_subtasks and len(manager.all_subtasks) == 90
    task = manager.load(["cctuning_mmmlu_sw"])["tasks"]["cctuning_mmmlu_sw"]
    items = load_benchmark("MMMLU", "sw")
    docs = list(task.test_docs())
    assert [d["prompt"] for d in docs] == [it.prompt for it in items]
    assert [task.doc_to_target(d) for d in docs] == ["ABCD".index(it.answer) for it in items]
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]
    # a user's own copy: a folder given as metadata, or an absolute path in data_files
    own = tmp_path / "MMMLU"
    own.mkdir()
    (own / "sw.jsonl").write_text(
        "".join(json.dumps({**d, "id": i}) + "\n" for i, d in enumerate(docs[:3])), encoding="utf-8"
    )
    for kwargs in ({"cctuning_data_dir": str(tmp_path)}, {}):
        files = "MMMLU/sw.jsonl" if kwargs else str(own / "sw.jsonl")
        split = lmeval_tasks.load_split({"test": files}, "MMMLU", "sw", pretrained="ignored", **kwargs)[
            "test"
        ]
        assert split["prompt"] == [d["prompt"] for d in docs[:3]]
    (own / "sw.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(CCError, match="sw.jsonl:1: field 'prompt': missing"):
        lmeval_tasks.load_split("MMMLU/sw.jsonl", "MMMLU", "sw", cctuning_data_dir=str(tmp_path))


def test_generative_tasks_score_with_our_rules():
    doc = lmeval_tasks._doc(load_benchmark("MKQA", "de", limit=1)[0])
    item = Item(doc["id"], doc["prompt"], tuple(doc["answer"]), doc["prompt_en"], "de", "MKQA")
    for output in (doc["answer"][0], "nichts", f"Die Antwort ist {doc['answer'][0]}."):
        metrics = score_item(item, output)
        assert lmeval_tasks.process_results(doc, [output]) == {
            k: float(metrics[k]) for k in ("exact_match", "f1", "contains")
        }
    choice = lmeval_tasks._doc(load_benchmark("XNLI", "sw", limit=1)[0])
    assert lmeval_tasks.process_results(choice, [f"Jibu: {choice['answer']}"]) == {
        "accuracy": 1.0,
        "parsed": 1.0,
    }
    assert lmeval_tasks.process_results(choice, ["sijui"]) == {"accuracy": 0.0, "parsed": 0.0}


def test_lm_eval_help_starts_with_our_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["lm-eval", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage: cctuning lm-eval [run] --model cctuning")
    ours, theirs = out.split("lm-eval's own help follows.")
    for name in lm_eval_cli.MODEL_ARGS:
        assert f"\n  {name} " in ours
    assert "cctuning lm-eval ls tasks" in ours and "cctuning_xnli_gen" not in ours
    assert "usage: lm-eval" in theirs  # then lm-eval's own help


def test_usage_lists_every_model_arg_of_the_model():
    taken = set(inspect.signature(lmeval.CCLM.__init__).parameters) - {"self", "unknown"}
    assert set(lm_eval_cli.MODEL_ARGS) | {"tokenizer"} == taken  # tokenizer: a Python object only
    assert lm_eval_cli.MODEL == lmeval.MODEL_NAME


@pytest.mark.parametrize(
    "argv,batch_size,device",
    [
        (["--model_args", "pretrained=m,batch_size=8"], "8", str(resolve_device("auto"))),
        (["--model_args", "pretrained=m", "--batch_size", "3", "--device", "cpu"], "3", "cpu"),
        (["--model_args", "pretrained=m,batch_size=2,device=cpu", "--batch_size", "5"], "2", "cpu"),
    ],
)
def test_lm_eval_is_told_the_batch_size_and_device_the_model_uses(argv, batch_size, device):
    _, args = lm_eval_cli._parse(["--model", "cctuning", "--tasks", "cctuning_xnli_sw", *argv])
    lm_eval_cli.settle_model_options(args)
    assert (getattr(args, "batch_size", None), args.device) == (batch_size, device)
    _, other = lm_eval_cli._parse(
        ["--model", "hf", "--model_args", "pretrained=m,batch_size=8", "--tasks", "x"]
    )
    lm_eval_cli.settle_model_options(other)  # another model's options are lm-eval's business
    assert (getattr(other, "batch_size", None), other.device) == (None, None)


@pytest.mark.slow
def test_lm_eval_run_matches_cctuning_eval(tmp_path, tok, capsys, caplog):
    """``cctuning lm-eval`` (lm-eval's command line, offline) on a saved tiny CC-Tuning model, limit 4:
    the likelihood task picks per item the label ``cctuning eval --scoring likelihood`` picks, and its
    log-likelihoods differ from ours by one constant per item (the prompt's last token, that lm-eval
    moves into the continuation); the generative task's outputs and scores are ``cctuning eval``'s."""
    folder = tmp_path / "cc"
    connected(tok, seed=3).save_pretrained(folder, tokenizer=tok)
    out = tmp_path / "lmeval"
    args = ["--model", "cctuning", "--model_args", f"pretrained={folder},connection=transform,batch_size=4",
            "--tasks", "cctuning_xstorycloze_sw,cctuning_mkqa_de", "--limit", "4", "--apply_chat_template",
            "--output_path", str(out), "--log_samples"]  # fmt: skip
    assert main(["lm-eval", *args]) == 0
    captured = capsys.readouterr()
    assert "cctuning_xstorycloze_sw" in captured.out
    # lm-eval's header names the batch size used (not its --batch_size default 1), and with no --device
    # the run uses (and says) cctuning's device, never lm-eval's default cuda:0
    assert "num_fewshot: None, batch_size: 4\n" in captured.out
    assert "cuda:0" not in captured.out + captured.err + caplog.text
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["connection"] == "transform" and results["config"]["transform_matrix"]
    assert (results["config"]["batch_size"], results["config"]["device"]) == (
        "4",
        str(resolve_device("auto")),
    )
    samples = {
        task: [
            json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        ]
        for task in ("cctuning_xstorycloze_sw", "cctuning_mkqa_de")
    }
    evaluate(EvalConfig(model=str(folder), benchmarks=["XStoryCloze"], langs=["sw"], limit=4,
                              scoring="likelihood", output=str(tmp_path / "lik")), progress=False)  # fmt: skip
    rows = {
        r["id"]: r
        for r in map(json.loads, (tmp_path / "lik/generations/XStoryCloze/sw.jsonl").read_text().splitlines())
    }
    items = load_benchmark("XStoryCloze", "sw", limit=4)
    assert len(samples["cctuning_xstorycloze_sw"]) == 4
    for sample, item in zip(sorted(samples["cctuning_xstorycloze_sw"], key=lambda s: s["doc_id"]), items):
        ours_lp = rows[item.id]["logprobs"]
        lm_lp = [float(r[0]) for r in sample["filtered_resps"]]
        diffs = [lm - ours_lp[label] for lm, label in zip(lm_lp, ("1", "2"))]
        assert diffs[0] == pytest.approx(diffs[1], abs=1e-4) and diffs[0] < 0
        assert ["1", "2"][max(range(2), key=lm_lp.__getitem__)] == max(ours_lp, key=ours_lp.get)
        assert sample["acc"] == float(max(ours_lp, key=ours_lp.get) == item.answer)
        assert str(sample["target"]) == str("12".index(item.answer))  # the gold label's index
    gen = evaluate(EvalConfig(model=str(folder), benchmarks=["MKQA"], langs=["de"], limit=4, connection="transform",
                              output=str(tmp_path / "gen")), progress=False)  # fmt: skip
    outputs = {
        r["id"]: r["output"]
        for r in map(json.loads, (tmp_path / "gen/generations/MKQA/de.jsonl").read_text().splitlines())
    }
    mkqa = sorted(samples["cctuning_mkqa_de"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in mkqa] == [
        outputs[it.id] for it in load_benchmark("MKQA", "de", limit=4)
    ]
    assert results["results"]["cctuning_mkqa_de"]["contains,none"] == pytest.approx(
        gen["benchmarks"]["MKQA"]["per_language"]["de"]["contains"]
    )
