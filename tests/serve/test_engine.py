"""The engine of ``cctuning serve`` against ``CCGenerator.generate`` (what ``cctuning generate`` runs):
the same greedy tokens, text and layer for a prompt served alone, in a batch of 8, joining a running
batch, and beside other connections; seeded sampling independent of the batch; stop strings,
cancellation, a full queue and a failing step."""

import time

import pytest
import torch

from cctuning.inference import CCGenerator
from cctuning.serve.batch import sample
from cctuning.serve.engine import Engine, QueueFull
from cctuning.serve.sequence import held_back
from tests.conftest import connected_model
from tests.serve.conftest import ENGLISH, PROMPTS, sequence, wait

NEW = 8


@pytest.fixture(scope="module")
def engines(tokenizer):
    """A connected tiny model per architecture, its generator and a running engine, made once
    (llama: a cache that can be padded, so sequences join a running batch; gemma3_text:
    sliding-window layers, so they wait for it to finish)."""
    made = {}

    def get(arch):
        if arch not in made:
            gen = CCGenerator(
                connected_model(tokenizer, arch, seed=2), tokenizer, max_new_tokens=NEW, batch_size=8
            )
            made[arch] = (arch, gen, Engine(gen, max_batch_size=8, queue_size=32).start())
        return made[arch]

    yield get
    for _, _, engine in made.values():
        engine.stop()


@pytest.fixture(params=["llama", "gemma3_text"])
def setup(request, engines):
    return engines(request.param)


def expected(gen, connection, new=NEW):
    english = ENGLISH if connection == "english" else None
    return gen.generate(PROMPTS, connection, english, max_new_tokens=new)


def assert_same(seqs, generations, new=NEW):
    for seq, gen in zip(seqs, generations):
        assert seq.tokens == gen.token_ids
        assert seq.text == gen.text == seq.sink.streamed
        assert seq.layer == gen.layer
        assert seq.finish_reason == ("length" if len(gen.token_ids) == new else "stop")


@pytest.mark.parametrize(
    "arch, connection",
    [("llama", "transform"), ("llama", "english"), ("llama", "none"), ("gemma3_text", "transform")],
)
def test_alone_and_in_a_batch_of_8_equal_generate(engines, arch, connection):
    arch, gen, engine = engines(arch)
    want = expected(gen, connection)
    english = ENGLISH if connection == "english" else [None] * 8
    alone = []
    for prompt, en in zip(PROMPTS, english):
        alone.append(sequence(gen, prompt, connection, en))
        engine.submit(alone[-1:])
        wait(alone[-1:])
    assert_same(alone, want)
    engine.stats.largest_batch = 0
    batch = [sequence(gen, p, connection, e) for p, e in zip(PROMPTS, english)]
    engine.submit(batch)
    wait(batch)
    assert engine.stats.largest_batch == 8
    assert_same(batch, want)
    if connection != "none":  # the connection changed something, so the comparison can fail
        assert [s.tokens for s in batch] != [g.token_ids for g in expected(gen, "none")]


def test_sequences_join_a_running_batch_and_connections_mix(setup):
    """Four sequences run; four more (another connection each) arrive after their first step and join
    the batch (llama) or wait for it (gemma3_text); every answer is generate's."""
    arch, gen, engine = setup
    connections = ["transform", "none", "english", "transform"] * 2
    long = 40  # the first four are still running when the others arrive
    first = [sequence(gen, PROMPTS[i], connections[i], ENGLISH[i], max_tokens=long) for i in range(4)]
    engine.stats.largest_batch = 0
    engine.submit(first)
    deadline = time.monotonic() + 60
    while not all(s.tokens or s.done for s in first) and time.monotonic() < deadline:
        time.sleep(0.001)
    later = [sequence(gen, PROMPTS[i], connections[i], ENGLISH[i]) for i in range(4, 8)]
    engine.submit(later)
    wait(first + later)
    for connection in ("transform", "none", "english"):
        want = expected(gen, connection, long)[:4] + expected(gen, connection)[4:]
        pairs = [(s, w) for s, w, c in zip(first + later, want, connections) if c == connection]
        for (seq, w), new in zip(pairs, [long if seq in first else NEW for seq, _ in pairs]):
            assert_same([seq], [w], new)
    if arch == "llama":
        assert engine.stats.largest_batch > 4, "the later sequences did not join the running batch"


def test_prompts_of_different_lengths_are_prefilled_apart_and_answer_as_generate(engines):
    """A burst of short prompts and one long one: the long one gets a prefill of its own (the short
    ones are not padded to its width), the short ones share theirs, and every answer is generate's."""
    arch, gen, engine = engines("llama")
    prompts = PROMPTS[:4] + [" ".join(PROMPTS)]
    lengths = [len(gen.encoder.encode_prompt(p).ids) for p in prompts]
    assert max(lengths) > 2 * max(lengths[:4])  # so that one prefill would pad the short ones
    widths = []
    hook = gen.model.arch.layers[0].register_forward_pre_hook(lambda m, args, kw: widths.append(tuple((kw["hidden_states"] if "hidden_states" in kw else args[0]).shape[:2])), with_kwargs=True)  # fmt: skip
    seqs = [sequence(gen, p, "transform") for p in prompts]
    try:
        engine.submit(seqs)
        wait(seqs)
    finally:
        hook.remove()
    prefills = [w for w in widths if w[1] > 1]  # decoding steps feed one column
    assert (1, max(lengths)) in prefills
    assert all(rows * width <= 1.25 * sum(lengths[:4]) for rows, width in prefills if width < max(lengths))
    assert sum(rows for rows, width in prefills if width > 1) >= len(prompts)
    assert_same(seqs, gen.generate(prompts, "transform", max_new_tokens=NEW))


def test_seeded_sampling_does_not_depend_on_the_batch(engines):
    arch, gen, engine = engines("llama")
    options = dict(temperature=0.9, top_p=0.95, seed=11, max_tokens=NEW)
    alone = sequence(gen, PROMPTS[0], "transform", **options)
    engine.submit([alone])
    wait([alone])
    crowd = [sequence(gen, PROMPTS[0], "transform", **options)] + [
        sequence(gen, p, "transform", temperature=0.9, seed=i) for i, p in enumerate(PROMPTS[1:])
    ]
    other = sequence(gen, PROMPTS[0], "transform", **{**options, "seed": 12})
    engine.submit(crowd + [other])
    wait(crowd + [other])
    assert crowd[0].tokens == alone.tokens
    assert other.tokens != alone.tokens
    assert alone.tokens != expected(gen, "transform")[0].token_ids  # sampled, not greedy


def test_stop_strings_cut_the_text_and_streaming_holds_them_back(engines):
    arch, gen, engine = engines("llama")
    free = expected(gen, "none")
    index = next(i for i, g in enumerate(free) if len(g.text) >= 6)
    text = free[index].text
    stop = text[3:6]  # the text stops before it, wherever it first appears
    seq = sequence(gen, PROMPTS[index], "none", stop=("\x00never", stop))
    engine.submit([seq])
    wait([seq])
    assert seq.text == text[: text.find(stop)] == seq.sink.streamed
    assert seq.finish_reason == "stop"
    assert held_back("abc\ufffd", ()) == 1 and held_back("say STO", ("STOP",)) == 3


def test_cancelled_sequence_leaves_the_batch_and_queue_is_bounded(engines):
    arch, gen, engine = engines("llama")
    long = sequence(gen, PROMPTS[3], "transform", max_tokens=400)
    before = engine.batch.cancelled
    engine.submit([long])
    while not long.tokens:
        time.sleep(0.001)
    long.cancelled = True
    deadline = time.monotonic() + 30
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.load() == {"running": 0, "waiting": 0}
    assert engine.batch.cancelled == before + 1 and len(long.tokens) < 400
    assert not any(e.kind == "end" for e in long.sink.events)
    idle = Engine(gen, max_batch_size=2, queue_size=3)  # not started: nothing leaves its queue
    idle.submit([sequence(gen, "a", "none"), sequence(gen, "b", "none")])
    with pytest.raises(QueueFull, match="queue is full"):
        idle.submit([sequence(gen, "c", "none"), sequence(gen, "d", "none")])  # all or none
    idle.submit([sequence(gen, "c", "none")])
    assert len(idle.pending) == 3 and idle.stats.refused == 2


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(engines, monkeypatch):
    arch, gen, engine = engines("llama")
    original = engine.batch.step

    def broken():
        monkeypatch.setattr(engine.batch, "step", original)
        raise RuntimeError("out of memory\nmore details")

    monkeypatch.setattr(engine.batch, "step", broken)
    failed = sequence(gen, PROMPTS[0], "transform")
    engine.submit([failed])
    wait([failed])
    assert failed.sink.events[-1].kind == "error" and failed.sink.events[-1].text.endswith("out of memory")
    assert engine.alive and engine.load()["running"] == 0
    ok = sequence(gen, PROMPTS[0], "transform")
    engine.submit([ok])
    wait([ok])
    assert ok.tokens == expected(gen, "transform")[0].token_ids


def test_nucleus_sampling_draws_from_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    generator = torch.Generator().manual_seed(0)
    draws = [sample(probs.log(), 1.0, 0.8, generator) for _ in range(3000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are outside
    assert draws.count(0) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.03)
    cold = [sample(probs.log(), 0.25, 1.0, generator) for _ in range(3000)]  # p^4, renormalised
    assert cold.count(0) / len(cold) == pytest.approx(0.5**4 / (probs**4).sum().item(), abs=0.03)
