"""Fitting the Transform Matrix: the streaming normal equations against lstsq, ridge, per layer and
minimum-norm solutions, the fit on a model's activations, save and load."""

import random

import pytest
import torch

from cctuning.data.records import Record
from cctuning.errors import CCError
from cctuning.inference import CCGenerator, NormalEquations, TransformMatrix, fit_transform_matrix
from cctuning.model import CCConfig, CCModel
from cctuning.model.transform import apply_matrix
from cctuning.testing import tiny_model
from tests.conftest import connected_model
from tests.test_inference import ENGLISH, PROMPTS


def test_streaming_fit_recovers_a_known_map_and_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    d, layers = 6, 3
    true = torch.randn(d, d, generator=g, dtype=torch.float64)
    src = torch.randn(40, layers, d, generator=g, dtype=torch.float64)
    tgt = src @ true
    acc = NormalEquations(d, layers)
    for s, t in zip(src.split(7), tgt.split(7)):
        acc.add(s, t)
    torch.testing.assert_close(acc.solve(), true, atol=1e-9, rtol=1e-9)
    noisy = tgt + 0.1 * torch.randn(tgt.shape, generator=g, dtype=torch.float64)
    acc = NormalEquations(d, layers)
    for s, t in zip(src.split(9), noisy.split(9)):
        acc.add(s, t)
    S, T = src.reshape(-1, d), noisy.reshape(-1, d)
    torch.testing.assert_close(acc.solve(), torch.linalg.lstsq(S, T).solution, atol=1e-9, rtol=1e-9)
    lam = 2.5
    ridge = torch.linalg.solve(S.T @ S + lam * torch.eye(d, dtype=torch.float64), S.T @ T)
    torch.testing.assert_close(acc.solve(lam), ridge, atol=1e-9, rtol=1e-9)
    m = acc.solve()
    torch.testing.assert_close(
        torch.tensor(acc.mse(m), dtype=torch.float64), ((S @ m - T) ** 2).mean(), atol=1e-9, rtol=1e-6
    )


def test_per_layer_fit_and_underdetermined_min_norm():
    g = torch.Generator().manual_seed(1)
    d, layers = 5, 2
    maps = torch.randn(layers, d, d, generator=g, dtype=torch.float64)
    src = torch.randn(30, layers, d, generator=g, dtype=torch.float64)
    acc = NormalEquations(d, layers, per_layer=True)
    acc.add(src, apply_matrix(maps, src))
    torch.testing.assert_close(acc.solve(), maps, atol=1e-9, rtol=1e-9)
    # fewer rows than d (the official 10 prompts vs d=4096): minimum-norm solution, as lstsq/pinv
    few_s, few_t = (
        torch.randn(1, 2, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 2, 8, generator=g, dtype=torch.float64),
    )
    acc = NormalEquations(8, 2)
    acc.add(few_s, few_t)
    S, T = few_s.reshape(-1, 8), few_t.reshape(-1, 8)
    torch.testing.assert_close(acc.solve(), torch.linalg.pinv(S) @ T, atol=1e-8, rtol=1e-6)


def test_fit_transform_matrix_on_a_model_and_mismatch_error(tokenizer, tmp_path):
    cc = connected_model(tokenizer)
    records = [Record(instruction=p, output="x", instruction_en=e) for p, e in zip(PROMPTS * 4, ENGLISH * 4)]
    tm, report = fit_transform_matrix(cc, tokenizer, records, samples=20, batch_size=3, seed=1)
    assert report.pairs == 20 and report.fit_pairs == 18 and report.heldout_pairs == 2
    assert tm.matrix.shape == (cc.arch.hidden_size,) * 2
    assert report.fit["after"]["mse"] < report.fit["before"]["mse"]
    # the same normal equations, built by hand from the fit pairs' activations
    gen = CCGenerator(cc, tokenizer)
    rng = random.Random(1)
    chosen = sorted(rng.sample(range(20), 20))
    order = chosen[:]
    rng.shuffle(order)
    fit_idx = sorted(order[2:])

    def acts(texts):
        out = []
        for t in texts:
            enc = gen.encoder.encode_prompt(t)
            ids = torch.tensor([enc.ids])
            out.append(cc.collect_activations(ids, torch.ones_like(ids), torch.tensor([enc.position])))
        return torch.cat(out).double().reshape(-1, cc.arch.hidden_size)

    S = acts([records[i].instruction for i in fit_idx])
    T = acts([records[i].instruction_en for i in fit_idx])
    by_hand = torch.linalg.pinv(S.T @ S, hermitian=True) @ (S.T @ T)
    torch.testing.assert_close(tm.matrix.double() @ (S.T @ S), by_hand @ (S.T @ S), atol=1e-4, rtol=1e-3)
    tm.save(tmp_path)
    loaded = TransformMatrix.load(tmp_path)
    assert torch.equal(loaded.matrix, tm.matrix) and loaded.meta["pairs"] == 20
    small = CCModel.from_base(tiny_model("llama", tokenizer=tokenizer, hidden_size=16), CCConfig())
    with pytest.raises(CCError, match="does not fit this model"):
        small.set_transform(loaded)
