"""The benchmark's arithmetic, against values computed by hand: FLOPs of training steps, MFU, the
comparison of two runs, the targets in the Markdown. No timings."""

import pytest
import torch

from bench.compare import compare, ratio_figures
from bench.flops import _sdpa_backward_flops, _sdpa_flops, count_flops
from bench.report import holds, markdown, precision_rows
from bench.train_flops import analytic_step_flops, decoder_dims, forward_flops, mfu


def test_a_linear_stack_costs_six_flops_per_parameter_and_token():
    """Forward 2·P·N, backward 4·P·N (the gradients of the input and of the weight of every layer)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32, bias=False),
        torch.nn.Linear(32, 8, bias=False),
        torch.nn.Linear(8, 4, bias=False),
    )
    params = 16 * 32 + 32 * 8 + 8 * 4
    tokens = 3 * 5
    x = torch.randn(3, 5, 16, requires_grad=True)
    assert count_flops(lambda: net(x).sum().backward()) == 6 * params * tokens
    assert count_flops(lambda: net(x)) == 2 * params * tokens


def test_attention_is_counted_forward_and_backward():
    """4·Lq·Lk·d per head forward (scores and weighted sum), twice that backward."""
    b, h, lq, lk, d = 2, 3, 5, 5, 8
    assert _sdpa_flops((b, h, lq, d), (b, h, lk, d), (b, h, lk, d)) == 4 * b * h * lq * lk * d
    assert (
        _sdpa_backward_flops((b, h, lq, d), (b, h, lq, d), (b, h, lk, d), (b, h, lk, d))
        == 8 * b * h * lq * lk * d
    )
    q, k, v = (torch.randn(b, h, lq, d, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    assert count_flops(step) == 12 * b * h * lq * lk * d


def test_the_analytic_forward_of_a_small_decoder_by_hand():
    dims = {
        "layers": 2,
        "hidden": 8,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 4,
        "intermediate": 16,
        "vocab": 10,
    }
    # per token and layer: q 2·8·8, k and v 2·8·4 each, o 2·8·8, MLP 3·2·8·16 = 128+128+128+768 = 1152
    # attention per layer: 4 · rows · heads · L² · head_dim = 4·3·2·25·4 = 2400; LM head 2·8·10 per token
    tokens = 3 * 5
    expected = 2 * (tokens * 1152 + 2400) + tokens * 160
    assert forward_flops(dims, 3, 5) == expected
    assert forward_flops(dims, 3, 5, lm_head=False) == expected - tokens * 160
    english = forward_flops(dims, 3, 4, lm_head=False)
    decision_maker = 3 * 2 * 3 * 8 * 2  # Linear(hidden 8, layers 2) on 3 rows, forward and backward
    assert analytic_step_flops(dims, (3, 5)) == 3 * expected
    assert analytic_step_flops(dims, (3, 5), (3, 4)) == 3 * expected + english + decision_maker
    assert (
        analytic_step_flops(dims, (3, 5), (3, 4), english_grad=True)
        == 3 * expected + 3 * english + decision_maker
    )


def test_the_analytic_count_equals_the_counted_steps_of_a_random_llama():
    """SFT and CC-Tuning steps of the tiny Llama on the bundled mix: the FLOP counter's total (matrix
    products and attention, forward and backward) equals :func:`analytic_step_flops` exactly."""
    from bench.common import load_base
    from bench.train import encode_batches
    from bench.train_flops import PrecisionRunner, _count

    loaded = load_base("tiny")
    assert decoder_dims(loaded.base.config)["layers"] == 3
    batches = encode_batches(loaded.tokenizer, 2, 2, 64, 0)
    flops = _count(loaded, PrecisionRunner(loaded, 1e-5), batches)
    for method in ("sft", "cc"):
        assert flops[method]["counted"] == flops[method]["analytic"] > 0
    assert flops["cc"]["counted"] > flops["sft"]["counted"]


def test_mfu_is_achieved_over_peak():
    assert mfu(2e9, 0.5, 8.0) == pytest.approx(0.5)
    assert mfu(1e12, 2.0, 1000.0) == pytest.approx(0.5)


def _fig(median, low, high):
    return {"median": median, "min": low, "max": high, "repeats": 3}


def test_compare_lists_each_ratio_old_to_new_and_which_moved():
    old = {
        "date": "2026-11-23T13:33:53+00:00",
        "train_step_ratio": {"tiny": _fig(1.31, 1.29, 1.54)},
        "generate_ratio_b1": {"tiny": _fig(1.03, 0.73, 1.24)},
        "naive_generate_ratio_b8": {"tiny": _fig(1.19, 1.12, 1.35)},
        "train_step": {"tiny": {"ratio": _fig(1.31, 1.29, 1.54), "seconds_per_step": {"sft": _fig(1, 1, 1)}}},
        "eval_items_per_s": {"tiny": {"generate": {"b1": _fig(33, 32, 35), "speedup": _fig(4.0, 3.8, 4.2)}}},
    }
    new = {
        "train_step_ratio": {"tiny": _fig(1.25, 1.20, 1.30)},  # overlaps 1.29–1.54: not moved
        "generate_ratio_b1": {"tiny": _fig(1.50, 1.40, 1.60)},  # above 0.73–1.24: moved
        "eval_items_per_s": {"tiny": {"generate": {"b1": _fig(40, 39, 41), "speedup": _fig(2.0, 1.9, 2.1)}}},
        "nll": {"tiny": {"datasets": {"heldout": {"ratio": _fig(1.05, 1.0, 1.1)}}}},
    }
    assert ("train_step", "tiny", "ratio") not in ratio_figures(old)  # a mirror of train_step_ratio
    assert ("eval_items_per_s", "tiny", "generate", "b1") not in ratio_figures(old)  # items/s: not a ratio
    result = compare(old, new)
    rows = {r["figure"]: r for r in result["rows"]}
    assert set(rows) == {
        "train_step_ratio · tiny",
        "generate_ratio_b1 · tiny",
        "eval_items_per_s · tiny · generate · speedup",
    }
    assert not rows["train_step_ratio · tiny"]["moved"]
    assert rows["train_step_ratio · tiny"]["change"] == pytest.approx(1.25 / 1.31 - 1, abs=1e-4)
    assert (
        rows["generate_ratio_b1 · tiny"]["moved"]
        and rows["eval_items_per_s · tiny · generate · speedup"]["moved"]
    )
    assert result["new_only"] == ["nll · tiny · datasets · heldout · ratio"]
    assert result["gone"] == ["naive_generate_ratio_b8 · tiny"]
    assert result["date"] == old["date"]


def test_targets_are_stated_as_holding_or_not():
    assert holds(_fig(1.09, 1.0, 1.2), 1.10) == "yes"
    assert holds(_fig(1.11, 1.0, 1.2), 1.10) == "**no**"
    assert holds("skipped: no preset", 1.10) == "" and holds(_fig(1.0, 1.0, 1.0), None) == ""
    results = {
        "date": "2026-12-08T00:00:00+00:00",
        "machine": {
            "nproc": 2,
            "cpu_model": "x",
            "memory_gb": 1,
            "torch": "t",
            "transformers": "t",
            "python": "3",
            "torch_threads": 2,
        },  # fmt: skip
        "models": {"tiny": "random"},
        "skipped": {},
        "train_step_ratio": {"tiny": _fig(1.40, 1.35, 1.45)},
        "train_step_floor": {"tiny": 1.2},
        "train_step_ratio_english_grad": {},
        "train_step_floor_english_grad": {},
        "generate_ratio_b1": {"tiny": _fig(1.02, 1.0, 1.05)},
    }
    text = markdown(results)
    # 1.40 against 1.15 × 1.2 = 1.38: does not hold; generation 1.02 ≤ 1.10 holds
    assert (
        "| 1 | train step time, CC / SFT | tiny | 1.40 (1.35–1.45) | floor 1.200; target ≤ 1.15× floor = 1.380 | **no** (1.17× floor) |"
        in text
    )
    assert "| target ≤ 1.10 | yes |" in text


def test_the_precision_table_puts_each_time_ratio_beside_its_nll_difference():
    diff = {"diff": 0.0011, "ci_low": -0.0048, "ci_high": 0.0047}
    results = {"precision": {"smollm2-135m": {
        "train": {"seconds_per_step": {"fp32": _fig(31.1, 30, 32)}, "setup": {"batch_size": 8, "max_length": 256},
                  "ratio_autocast": _fig(0.54, 0.51, 0.57), "ratio_bf16": _fig(0.47, 0.45, 0.50)},
        "nll": {"records": 32, "fp32": 2.0809, "same_layers": True, "bf16_minus_fp32": diff,
                "autocast_minus_fp32": {"diff": -0.0002, "ci_low": -0.003, "ci_high": 0.0025}},
    }}}  # fmt: skip
    row = precision_rows(results)[-1]
    assert (
        "| 0.54 (0.51–0.57) | -0.0002 (-0.0030 to +0.0025) | 0.47 (0.45–0.50) | +0.0011 (-0.0048 to +0.0047) |"
        in row
    )
