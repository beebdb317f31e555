"""Generation with the simulated connection (fitting the Transform Matrix: tests/test_matrix.py)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from cctuning.cli import main
from cctuning.errors import CCError
from cctuning.inference import CCGenerator, TransformMatrix
from cctuning.inference.generate import stop_token_ids
from cctuning.model import CCModel
from cctuning.model.connection import connected_forward
from tests.conftest import connected_model, flags

PROMPTS = [
    "Habari ya asubuhi, rafiki yangu? Tafadhali jibu swali hili.",
    "请回答下面的问题。",
    "ما هي عاصمة مصر؟",
    "hi",
    "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।",
]
ENGLISH = [
    "Good morning, my friend? Please answer.",
    "Please answer the question below.",
    "What is the capital of Egypt?",
    "hi",
    "Hello, how are you?",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("connection", ["transform", "english", "none"])
def test_fast_path_equals_naive_two_prefill_path(tokenizer, arch, connection):
    cc = connected_model(tokenizer, arch)
    gen = CCGenerator(cc, tokenizer, max_new_tokens=6, batch_size=5)
    english = ENGLISH if connection == "english" else None
    fast = gen.generate(PROMPTS, connection, english, return_first_logits=True)
    naive = gen.generate(PROMPTS, connection, english, naive=True, return_first_logits=True)
    single = [
        CCGenerator(cc, tokenizer, 6, 1).generate(
            [p], connection, [e] if english else None, naive=True, return_first_logits=True
        )[0]
        for p, e in zip(PROMPTS, ENGLISH)
    ]
    for f, n, s in zip(fast, naive, single):
        torch.testing.assert_close(f.first_logits, n.first_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.first_logits, s.first_logits, atol=1e-5, rtol=1e-5)
        assert f.token_ids == n.token_ids == s.token_ids
        assert f.layer == n.layer == s.layer
    if connection != "none":
        plain = gen.generate(PROMPTS, "none", return_first_logits=True)
        assert all((f.first_logits - p.first_logits).abs().max() > 1e-3 for f, p in zip(fast, plain))


def test_batched_output_equals_one_by_one(tokenizer):
    cc = connected_model(tokenizer, "qwen2", seed=1)
    batched = CCGenerator(cc, tokenizer, 8, batch_size=3).generate(PROMPTS)
    alone = [CCGenerator(cc, tokenizer, 8, batch_size=1).generate([p])[0] for p in PROMPTS]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.layer for b in batched] == [a.layer for a in alone]


def test_layer_choice_is_the_decision_makers_argmax_on_transformed_activations(tokenizer):
    cc = connected_model(tokenizer)
    gen = CCGenerator(cc, tokenizer, 2, batch_size=5)
    outs = gen.generate(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        enc = gen.encoder.encode_prompt(prompt)
        ids = torch.tensor([enc.ids])
        acts = cc.collect_activations(ids, torch.ones_like(ids), torch.tensor([enc.position]))
        transformed = acts @ cc.transform.matrix
        emb = cc.base.get_input_embeddings()(ids[:, enc.position])
        logits = (transformed.mean(1) + emb) @ cc.decision_maker.proj.weight.T
        assert out.layer == int(logits.argmax())


def test_english_oracle_with_identical_prompts_and_identity_matrix_equals_transform(tokenizer):
    cc = connected_model(tokenizer)
    cc.set_transform(TransformMatrix(torch.eye(cc.arch.hidden_size)))
    gen = CCGenerator(cc, tokenizer, 6, batch_size=2)
    a = gen.generate(PROMPTS, "transform", return_first_logits=True)
    b = gen.generate(PROMPTS, "english", english=PROMPTS, return_first_logits=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.first_logits, y.first_logits, atol=1e-5, rtol=1e-5)
        assert x.token_ids == y.token_ids and x.layer == y.layer


def test_generation_stops_on_stop_ids_and_strips_special_tokens(tokenizer):
    cc = connected_model(tokenizer)
    gen = CCGenerator(cc, tokenizer, 12, batch_size=5)
    assert stop_token_ids(tokenizer, cc, gen.encoder) >= {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    free = gen.generate(PROMPTS, "none")
    assert all(len(o.token_ids) == 12 for o in free), (
        "the random tiny model never emits a stop id by chance here"
    )
    stop_at = free[0].token_ids[3]
    gen.stop_ids = gen.stop_ids | {stop_at}
    cut = gen.generate(PROMPTS, "none")
    for f, c in zip(free, cut):
        expected = f.token_ids[: f.token_ids.index(stop_at)] if stop_at in f.token_ids else f.token_ids
        assert c.token_ids == expected
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert "<|im_start|>" not in tokenizer.decode([special, *free[0].token_ids], skip_special_tokens=True)


def test_sampled_layer_choice_is_reproducible_with_a_seed(tokenizer):
    cc = connected_model(tokenizer)
    with torch.no_grad():
        cc.decision_maker.proj.weight.mul_(0.0)  # uniform logits: the choice is pure Gumbel noise
    cc.cc_config.sample_layer = True
    layers = []
    for _ in range(2):
        cc.generator = torch.Generator().manual_seed(3)
        layers.append([o.layer for o in CCGenerator(cc, tokenizer, 1, batch_size=5).generate(PROMPTS * 4)])
    assert layers[0] == layers[1] and len(set(layers[0])) > 1


@pytest.mark.slow
def test_fit_matrix_and_generate_cli_on_a_trained_model(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cc"
    assert (
        main(["train", *flags(model=base_dir, data=data_file, output=out, max_steps="2", batch_size="4")])
        == 0
    )
    assert main(["generate", "--model", str(out), "--prompt", "Habari?", "--connection", "transform"]) == 2
    assert "fit-matrix" in capsys.readouterr().err  # no matrix yet
    assert main(["generate", "--model", str(out), "--prompt", "Habari?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()  # without a matrix the default is plain generation
    assert main(["fit-matrix", "--model", str(out), "--data", str(data_file), "--samples", "10"]) == 0
    printed = capsys.readouterr().out
    assert "fitted on 9 pairs, 1 held out" in printed and "held-out" in printed
    meta = json.loads((out / "transform_matrix.json").read_text())
    assert meta["pairs"] == 10 and meta["hidden_size"] == 32
    gens = tmp_path / "gens.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--input",
                str(data_file),
                "--output",
                str(gens),
                "--max-new-tokens",
                "4",
                "--connection",
                "english",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(rows) == 12 and all(r["connection"] == "english" and isinstance(r["layer"], int) for r in rows)
    # the Python API gives the same texts
    model = CCModel.from_pretrained(out)
    api = CCGenerator(model, tokenizer=AutoTokenizer.from_pretrained(out), max_new_tokens=4).generate(
        [r["instruction"] for r in rows],
        "english",
        english=[json.loads(line)["instruction_en"] for line in data_file.read_text().splitlines()],
    )
    assert [a.text for a in api] == [r["generation"] for r in rows]


def test_decoding_fuses_at_the_prefill_only(tokenizer):
    """transformers' ``generate`` after our prefill equals a hand-written greedy loop: one forward over
    the prompt with the connection at p, then plain cached steps."""
    cc = connected_model(tokenizer, "llama", seed=2)
    gen = CCGenerator(cc, tokenizer, 8, batch_size=5)
    for prompt, out in zip(PROMPTS, gen.generate(PROMPTS, "transform")):
        enc = gen.encoder.encode_prompt(prompt)
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            res = connected_forward(cc, "transform", ids, None, torch.tensor([enc.position]), use_cache=True)
            tokens = []
            for _ in range(8):
                nxt = int(res.logits[0, -1].argmax())
                if nxt in gen.stop_ids:
                    break
                tokens.append(nxt)
                res = cc.base(
                    input_ids=torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True
                )
        assert out.token_ids == tokens


def test_generation_options_are_transformers_own(tokenizer):
    """Sampling and repetition penalty go through ``generate``: with connection none the output is
    ``model.base.generate``'s with the same options and seed."""
    cc = connected_model(tokenizer, "llama", seed=2)
    gen = CCGenerator(cc, tokenizer, 8, batch_size=1)
    options = [{"repetition_penalty": 3.0}, {"do_sample": True, "temperature": 0.7, "top_k": 20}]
    for kwargs in options:
        torch.manual_seed(5)
        ours = gen.generate(PROMPTS[:2], "none", generation_kwargs=kwargs)
        torch.manual_seed(5)
        for prompt, out in zip(PROMPTS[:2], ours):
            ids = torch.tensor([gen.encoder.encode_prompt(prompt).ids])
            ref = cc.base.generate(
                ids, max_new_tokens=8, eos_token_id=sorted(gen.stop_ids), pad_token_id=gen.pad_id, **kwargs
            )[0, ids.shape[1] :].tolist()
            assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) in (
                len(ref),
                len(ref) - 1,
            )
    greedy = gen.generate(PROMPTS, "transform")
    penalised = gen.generate(PROMPTS, "transform", generation_kwargs={"repetition_penalty": 3.0})
    assert any(g.token_ids != p.token_ids for g, p in zip(greedy, penalised))
    with pytest.raises(CCError, match="num_beams"):
        gen.generate(PROMPTS, "none", generation_kwargs={"num_beams": 2})
