"""Held-out response NLL: equal to a hand computation, and reported pairwise."""

import contextlib
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from cctuning.cli import main
from cctuning.data.encoding import PromptEncoder
from cctuning.errors import CCError
from cctuning.eval.nll import (
    evaluate_nll,
    load_items,
    paired_difference,
    paired_difference_over_seeds,
)
from cctuning.inference import TransformMatrix
from cctuning.model import CCConfig, CCModel, locate
from cctuning.testing import tiny_model
from tests.conftest import make_records, write_jsonl


def hand_nll(model, tokenizer, rec, connection):
    """Sum and count of the response NLL of one record, with hooks written here."""
    enc = PromptEncoder(tokenizer, max_length=1024)
    ex = enc.encode_example(rec["instruction"], rec["output"])
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor([ex.labels])
    handles = []
    if connection == "transform":
        arch = locate(model.base)
        store = {}
        hs = [
            m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o))
            for i, m in enumerate(arch.ffn)
        ]
        p_ids = torch.tensor([ex.input_ids[: ex.position + 1]])
        with torch.no_grad():
            model.base(input_ids=p_ids)
        for h in hs:
            h.remove()
        acts = torch.stack([store[i][0, ex.position] for i in range(len(store))]) @ model.transform.matrix
        e = model.base.get_input_embeddings()(ids)[0, ex.position]
        c = acts[int(((acts.mean(0) + e) @ model.decision_maker.proj.weight.T).argmax())]

        def add(mod, a, o):
            h = o.clone()
            h[0, ex.position] += c
            return h

        handles.append(arch.layers[0].register_forward_hook(add))
    with torch.no_grad():
        logits = model.base(input_ids=ids).logits
    for h in handles:
        h.remove()
    nll = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    return float(nll), int((labels[0, 1:] != -100).sum())


def test_nll_equals_hand_computation(tokenizer, tmp_path):
    torch.manual_seed(0)
    cc = CCModel.from_base(
        tiny_model("llama", tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"})
    ).eval()
    d = cc.arch.hidden_size
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 3.0)
    cc.set_transform(TransformMatrix(torch.eye(d) * 20 + torch.randn(d, d)))
    rows = make_records(6)
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    for connection in ("none", "transform"):
        rep = evaluate_nll(
            cc, tokenizer, data, connection, tmp_path / connection, batch_size=4, progress=False
        )
        items = load_items(tmp_path / connection)
        assert [i["line"] for i in items] == list(range(1, 7))
        by_hand = [hand_nll(cc, tokenizer, rec, connection) for rec in rows]
        for item, (s, n) in zip(items, by_hand):
            assert item["tokens"] == n
            assert math.isclose(item["nll_sum"], s, rel_tol=1e-4, abs_tol=1e-4)
        total, tokens = sum(s for s, _ in by_hand), sum(n for _, n in by_hand)
        assert math.isclose(rep["nll"]["all"]["nll"], total / tokens, rel_tol=1e-5)
        assert math.isclose(rep["nll"]["all"]["ppl"], math.exp(total / tokens), rel_tol=1e-5)
        sw = [h for h, r in zip(by_hand, rows) if r["lang"] == "sw"]
        assert math.isclose(
            rep["nll"]["sw"]["nll"], sum(s for s, _ in sw) / sum(n for _, n in sw), rel_tol=1e-5
        )
        m = rep["nll"]["all"]
        assert m["ci_low"] <= m["nll"] <= m["ci_high"]
    # the connection changes the likelihood, and the paired difference says so
    diff = paired_difference(load_items(tmp_path / "transform"), load_items(tmp_path / "none"))
    none, tr = (
        json.loads((tmp_path / "none" / "nll.json").read_text()),
        json.loads((tmp_path / "transform" / "nll.json").read_text()),
    )
    assert math.isclose(
        diff["all"]["diff"], tr["nll"]["all"]["nll"] - none["nll"]["all"]["nll"], rel_tol=1e-6
    )
    assert diff["all"]["diff"] != 0
    same = paired_difference(load_items(tmp_path / "none"), load_items(tmp_path / "none"))
    assert same["all"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "items": 6}


def test_eval_nll_cli_and_report(base_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "held.jsonl", make_records(8))
    out = tmp_path / "nll"
    assert main(["eval", "--model", str(base_dir), "--nll", str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "connection none" in printed and "all" in printed
    assert (
        main(["eval", "--model", str(base_dir), "--nll", str(data), "--output", str(tmp_path / "nll2")]) == 0
    )
    capsys.readouterr()
    assert main(["report", str(out), str(tmp_path / "nll2"), "--output", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert "paired difference" in table and "| all | 8 | +0.0000 |" in table
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_layer_histogram_counts_every_choice_and_spans_all_layers(tokenizer, tmp_path):
    from collections import Counter

    from cctuning.lab.plots import layer_grid
    from cctuning.lab.report import build_report, layer_histograms, load_run

    torch.manual_seed(1)
    cc = CCModel.from_base(
        tiny_model("llama", tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"})
    ).eval()
    d, num_layers = cc.arch.hidden_size, cc.arch.num_layers
    with torch.no_grad():
        cc.decision_maker.proj.weight.zero_()
        cc.decision_maker.proj.weight[0].normal_(0, 3.0)  # only layers 0 and 1 can win the argmax
        cc.decision_maker.proj.weight[1].normal_(0, 3.0)
    cc.set_transform(TransformMatrix(torch.eye(d) + 0.1 * torch.randn(d, d)))
    evaluate_nll(cc, tokenizer, write_jsonl(tmp_path / "h.jsonl", make_records(12)), "transform",
                 tmp_path / "run", batch_size=4, progress=False)  # fmt: skip
    items = load_items(tmp_path / "run")
    by_hand: dict[str, Counter] = {}
    for item in items:
        by_hand.setdefault(item["lang"], Counter())[str(item["layer"])] += 1
    hist = layer_histograms([("run", load_run(tmp_path / "run"))])["run"]
    assert hist["num_layers"] == num_layers
    assert hist["counts"] == {lang: dict(c) for lang, c in by_hand.items()}
    langs, grid = layer_grid(hist)
    assert langs == sorted(by_hand)
    for lang, row in zip(langs, grid):
        assert len(row) == num_layers  # every layer has a column, chosen or not
        total = sum(by_hand[lang].values())
        assert row == [by_hand[lang][str(k)] / total for k in range(num_layers)]
    # without a recorded depth, the columns stop at the highest layer chosen
    highest = max(int(k) for c in by_hand.values() for k in c)
    assert highest + 1 < num_layers  # so the test tells the two widths apart
    assert len(layer_grid({"num_layers": None, "counts": hist["counts"]})[1][0]) == highest + 1
    # an older run without num_layers: the depth comes from the evaluated CC-Tuning folder
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cctuning_config.json").write_text('{"num_layers": 7}')
    old = {"kind": "benchmarks", "layer_choice": {"sw": {"1": 2}}, "model": str(tmp_path / "model")}
    assert layer_histograms([("old", old)])["old"]["num_layers"] == 7
    build_report([str(tmp_path / "run")], tmp_path / "rep")
    assert (tmp_path / "rep" / "layers.png").read_bytes()[:4] == b"\x89PNG"


def old_items(model, tokenizer, rows, connection, batch_size, draws=0, seed=0):
    """The per-item values as ``score_records`` computed them before the fast path: batches in record
    order, right padding, one full forward per draw with the connection (a second full pass for
    ``transform``) and the LM head over every position."""
    from cctuning.data.collator import CCCollator
    from cctuning.model.ccmodel import positions_from_mask
    from cctuning.model.connection import connected_forward, layer_sampling

    enc = PromptEncoder(tokenizer, model.cc_config.prompt_format, 1024)
    english = connection == "english"
    feats = [
        enc.encode_example(r["instruction"], r["output"], r["instruction_en"] if english else None).features()
        for r in rows
    ]
    sampled = draws > 0 and connection != "none"
    out = []
    with layer_sampling(model, seed) if sampled else contextlib.nullcontext(), torch.no_grad():
        for start in range(0, len(rows), batch_size):
            b = CCCollator(tokenizer.pad_token_id, "right")(feats[start : start + batch_size])
            sums, layers = [], []
            for _ in range(draws if sampled else 1):
                fwd = connected_forward(
                    model, connection, b["input_ids"], b["attention_mask"], b["cc_position"],
                    b.get("en_input_ids"), b.get("en_attention_mask"), b.get("en_cc_position"),
                    position_ids=positions_from_mask(b["attention_mask"]), use_cache=False,
                )  # fmt: skip
                logits = fwd.logits
                target = b["labels"][:, 1:]
                nll = F.cross_entropy(
                    logits[:, :-1].transpose(1, 2).float(), target.clamp(min=0), reduction="none"
                )
                sums.append((nll * (target != -100)).sum(1))
                layers.append(fwd.layer_choice)
            for j in range(len(sums[0])):
                out.append(
                    {
                        "nll_sum": sum(float(s[j]) for s in sums) / len(sums),
                        "tokens": int((b["labels"][j, 1:] != -100).sum()),
                        "layers": [None if la is None else int(la[j]) for la in layers],
                    }
                )
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # a cache cut back; sliding-window layers
def test_the_fast_nll_path_equals_the_old_per_item_values(tokenizer, tmp_path, arch):
    """Left padding, length-sorted batches, the LM head on the scored columns only and the prompt's KV
    cache reused by the fused pass give the old per-item values (same layers, NLL to float rounding)."""
    torch.manual_seed(0)
    cc = CCModel.from_base(
        tiny_model(arch, tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"})
    ).eval()
    d = cc.arch.hidden_size
    with torch.no_grad():
        cc.decision_maker.proj.weight.normal_(0, 1.0)
    cc.set_transform(TransformMatrix(torch.eye(d) + 0.3 * torch.randn(d, d)))
    rows = make_records(7)
    for i, r in enumerate(rows):  # lengths that differ, in prompts and responses
        r["instruction"] = r["instruction"] + " ziada" * (3 * i % 5)
        r["output"] = r["output"] + " tena" * (2 * i % 7)
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    for connection in ("none", "transform", "english"):
        for batch_size, draws in ((1, 0), (3, 0), (3, 2)):
            out = tmp_path / f"{connection}-{batch_size}-{draws}"
            evaluate_nll(cc, tokenizer, data, connection, out, batch_size=batch_size, sample_layer=draws,
                         progress=False)  # fmt: skip
            new = load_items(out)
            old = old_items(cc, tokenizer, rows, connection, batch_size, draws)
            assert [i["tokens"] for i in new] == [o["tokens"] for o in old]
            for n, o in zip(new, old):
                assert math.isclose(n["nll_sum"], o["nll_sum"], rel_tol=1e-5, abs_tol=1e-5)
                assert n.get("layers", [n["layer"]]) == o["layers"]
    # the fused pass of transform starts at min p when the cache can be cut back, else at 0
    widths = []
    hook = cc.arch.layers[0].register_forward_pre_hook(lambda m, args, kw: widths.append(kw["hidden_states"].shape[1] if "hidden_states" in kw else args[0].shape[1]), with_kwargs=True)  # fmt: skip
    try:
        evaluate_nll(cc, tokenizer, data, "transform", batch_size=len(rows), progress=False)
    finally:
        hook.remove()
    enc = PromptEncoder(tokenizer, cc.cc_config.prompt_format, 1024)
    width = max(len(enc.encode_example(r["instruction"], r["output"]).input_ids) for r in rows)
    assert widths[-1] < width if arch == "llama" else widths[-1] == width


def test_padding_batches_group_similar_lengths_and_isolate_outliers():
    from cctuning.eval.nll import padding_batches

    lengths = [571, 280, 275, 277, 283, 289, 232, 225]  # SmolLM2 token counts of 8 XQuAD/de items
    assert padding_batches(lengths, 8) == [[7, 6, 2, 3, 1, 4, 5], [0]]
    assert padding_batches(lengths, 3) == [[7, 6, 2], [3, 1, 4], [5], [0]]
    for size in (1, 2, 3, 8):
        batches = padding_batches(lengths, size)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= size
            padded, real = len(b) * max(lengths[i] for i in b), sum(lengths[i] for i in b)
            assert len(b) == 1 or padded <= 1.25 * real


def test_aligned_batches_bound_their_padding_and_cover_every_row():
    """The batches of aligned scoring (every p in one column): each costs rows x (longest prompt +
    longest response), within 1.25 x its real tokens unless it is one row; similar prompts go together."""
    from cctuning.eval.nll import padding_batches

    rng = random.Random(3)
    # long prompts with short answers and short prompts with long answers: alike in length only
    prompts = [rng.choice([40, 100, 400, 1200]) + rng.randrange(5) for _ in range(60)]
    responses = [rng.choice([3, 5, 300]) + rng.randrange(3) for _ in range(60)]
    lengths = [p + r for p, r in zip(prompts, responses)]
    for size in (1, 4, 8):
        batches = padding_batches(lengths, size, responses=responses)
        assert sorted(i for b in batches for i in b) == list(range(60))
        for b in batches:
            assert len(b) <= size
            padded = len(b) * (max(prompts[i] for i in b) + max(responses[i] for i in b))
            assert len(b) == 1 or padded <= 1.25 * sum(lengths[i] for i in b)

    # left-padding batches of the same rows, costed aligned, pad more: the reason for the second mode
    def cost(batches):
        return sum(len(b) * (max(prompts[i] for i in b) + max(responses[i] for i in b)) for b in batches)

    assert cost(padding_batches(lengths, 8, responses=responses)) < cost(padding_batches(lengths, 8))


def test_aligned_transform_scoring_runs_the_prompts_once(tokenizer):
    """With every p in one column the transform connection's fused pass covers only the responses:
    layer 0 sees the prompts up to p once (longest prompt columns), then the longest response + 1."""
    from cctuning.data.collator import CCCollator
    from cctuning.eval.nll import batch_nll

    torch.manual_seed(0)
    cc = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer), CCConfig(prompt_format={"mode": "chat"}))
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size)))
    enc = PromptEncoder(tokenizer, cc.cc_config.prompt_format, 1024)
    exs = [enc.encode_example("Habari" + " ziada" * k, "Nzuri" + " tena" * (5 - k)) for k in range(5)]
    batch = CCCollator(tokenizer.pad_token_id, "aligned")([e.features() for e in exs])
    widths = []
    hook = cc.arch.layers[0].register_forward_pre_hook(lambda m, args, kw: widths.append(kw["hidden_states"].shape[1] if "hidden_states" in kw else args[0].shape[1]), with_kwargs=True)  # fmt: skip
    try:
        sums, counts, _ = batch_nll(cc.eval(), batch, "transform")[0]
    finally:
        hook.remove()
    prompts = [e.position + 1 for e in exs]
    responses = [len(e.input_ids) - p for e, p in zip(exs, prompts)]
    assert widths == [max(prompts), max(responses) + 1]
    assert counts.tolist() == [sum(x != -100 for x in e.labels) for e in exs]


def test_nll_of_a_benchmarks_gold_answers(base_dir, tmp_path, capsys):
    """``eval --nll XQuAD`` scores the gold answers of the bundled split (with --langs/--limit) and
    equals ``eval --nll`` on a file of the same records written by hand; MKQA takes its first alias;
    a multiple-choice benchmark is refused in one line."""
    import json

    from cctuning.cli import main
    from cctuning.eval.benchmarks import answer_records, load_benchmark

    by_hand = []
    for lang in ("ar", "en"):
        for item in load_benchmark("XQuAD", lang, limit=2):
            by_hand.append({"instruction": item.prompt, "output": item.answer,
                            "instruction_en": item.prompt_en, "lang": lang})  # fmt: skip
    assert answer_records("xquad", ["ar", "en"], limit=2) == by_hand
    mkqa = answer_records("MKQA", ["de"], limit=3)
    assert [r["output"] for r in mkqa] == [i.answer[0] for i in load_benchmark("MKQA", "de", limit=3)]
    file = write_jsonl(tmp_path / "answers.jsonl", by_hand)
    common = ["--model", str(base_dir), "--connection", "none", "--batch-size", "2", "--max-length", "512"]
    assert (
        main(
            [
                "eval",
                "--nll",
                "XQuAD",
                "--langs",
                "ar,en",
                "--limit",
                "2",
                "--output",
                str(tmp_path / "a"),
                *common,
            ]
        )
        == 0
    )
    assert main(["eval", "--nll", str(file), "--output", str(tmp_path / "b"), *common]) == 0
    a = json.loads((tmp_path / "a" / "nll.json").read_text())["nll"]
    b = json.loads((tmp_path / "b" / "nll.json").read_text())["nll"]
    assert set(a) == {"ar", "en", "all"} and a["all"]["items"] == 4
    assert a["all"]["nll"] == b["all"]["nll"] and a["ar"]["tokens"] == b["ar"]["tokens"]
    capsys.readouterr()
    assert main(["eval", "--nll", "XNLI", "--output", str(tmp_path / "c"), *common]) == 2
    assert "XNLI is multiple choice: score it with --scoring likelihood, not --nll" in capsys.readouterr().err


def _items(nll_sums, lang="sw"):
    return [{"line": i + 1, "lang": lang, "nll_sum": v, "tokens": 1} for i, v in enumerate(nll_sums)]


def _bootstrap_by_hand(a, b, reps, seed):
    """The paired bootstrap of the overall difference, written out: one language, so its draws are
    the first ``reps`` draws of ``random.Random(seed)`` (the per-language group comes first)."""
    rng = random.Random(seed)
    n = len(a)
    stats = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(
            sum(a[i]["nll_sum"] for i in idx) / sum(a[i]["tokens"] for i in idx)
            - sum(b[i]["nll_sum"] for i in idx) / sum(b[i]["tokens"] for i in idx)
        )
    stats.sort()
    return stats[int(0.025 * reps)], stats[int(0.975 * reps)]


def test_difference_over_seeds_with_one_seed_or_equal_seeds_is_the_paired_difference():
    rng = random.Random(3)
    a = _items([rng.uniform(1, 3) for _ in range(30)])
    b = _items([rng.uniform(1, 3) for _ in range(30)])
    one = paired_difference(a, b, reps=200, seed=5)
    # against a hand computation: the mean difference, and the bootstrap interval of the one group
    assert math.isclose(
        one["sw"]["diff"], sum(r["nll_sum"] for r in a) / 30 - sum(r["nll_sum"] for r in b) / 30
    )
    assert (one["sw"]["ci_low"], one["sw"]["ci_high"]) == _bootstrap_by_hand(a, b, 200, 5)
    for pairs in ([(a, b)], [(a, b), (a, b), (a, b)]):
        over = paired_difference_over_seeds(pairs, reps=200, seed=5)
        assert {k: {f: v[f] for f in ("diff", "ci_low", "ci_high", "items")} for k, v in over.items()} == one
        assert over["all"]["seeds"] == len(pairs)


def test_difference_over_seeds_holds_the_spread_over_seeds():
    """Two seeds whose differences are +0.5 and −0.5 on every item: no spread over items, so each
    seed's own interval is a point, but the pooled interval spans both seeds (drawn with
    replacement: (+0.5, +0.5) and (−0.5, −0.5) are among the draws)."""
    base = _items([2.0] * 40)
    up, down = _items([2.5] * 40), _items([1.5] * 40)
    for a in (up, down):
        d = paired_difference(a, base, reps=200)["all"]
        assert d["ci_low"] == d["ci_high"] == d["diff"]
    pooled = paired_difference_over_seeds([(up, base), (down, base)], reps=400)["all"]
    assert pooled["diff"] == 0.0
    assert (pooled["ci_low"], pooled["ci_high"]) == (-0.5, 0.5)


def test_difference_over_seeds_refuses_other_items():
    a = _items([1.0, 2.0])
    with pytest.raises(CCError, match="seeds were not made on the same items"):
        paired_difference_over_seeds([(a, a), (a[:1], a[:1])])
