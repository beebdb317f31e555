"""Held-out response likelihood: a metric sensitive enough for small models.

For each record, the mean negative log-likelihood per token of the gold response given the
prompt, with teacher forcing. The connection applies at the prompt exactly as in generation: the
activations at p (of the non-English prompt, transformed, for ``transform``; of the English prompt
for ``english``) go through the Decision Maker and the choice is added after layer k at p; the
response tokens are then scored in the same forward. ``f_l[p]`` depends only on tokens up to p
(causal attention), so collecting it on the full sequence equals collecting it on the prompt.

Per language and overall: token-weighted mean NLL (``Σ nll / Σ tokens``), perplexity
``exp(NLL)`` and a bootstrap 95% interval over items (items resampled with replacement, seeded).
Per-item sums are saved so that two runs on the same items can be compared pairwise.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from cctuning.data.augment import inference_records, prompt_report
from cctuning.data.collator import CCCollator, pad_token_id, padding_batches
from cctuning.data.encoding import PromptEncoder, encode_example, warn_special_records
from cctuning.data.formats import DataOptions
from cctuning.data.records import load_records, system_prompt_of
from cctuning.errors import CCError
from cctuning.io import check_output_folder, folder_lock, write_json, write_text
from cctuning.model.arch import cap_to_context
from cctuning.model.ccmodel import positions_from_mask
from cctuning.model.connection import (
    can_crop,
    injected,
    layer_counts_by_language,
    layer_sampling,
    prefill_to_connection,
    resolve_connection,
)
from cctuning.stats import bootstrap_ratio, two_level_bootstrap
from cctuning.versions import versions

logger = logging.getLogger(__name__)

NLL_NAME = "nll.json"
NLL_ITEMS_NAME = "nll_items.jsonl"


def item_nll(model, batch: dict, connection: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row summed response NLL, response token counts and chosen layers for one batch (left or
    right padded, as :class:`~cctuning.data.collator.CCCollator` makes it)."""
    return batch_nll(model, batch, connection)[0]


def batch_nll(
    model, batch: dict, connection: str, draws: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """:func:`item_nll` of one batch, ``draws`` times (the Decision Maker chooses again each time; the
    activations at p and the prompt's KV cache are computed once).

    What is computed is what the plain forward computes, less what the response NLL does not need:

    * the LM head runs only from the first column where some row is scored (``logits_to_keep``), not
      over the whole vocabulary at every prompt position;
    * the prompt prefix is run once (:func:`~cctuning.model.connection.prefill_to_connection`):
      ``transform`` with a cache that can be cut back: one pass over ``[0, max p]`` fills a KV cache
      and captures ``f_l[p]``, the cache is cut back to ``min p`` and only the tail from there runs
      again, fused, instead of a second full pass (a cache that cannot be cut back, e.g.
      sliding-window layers, and ``english``: the fused pass runs over the whole sequence).

    With left padding (what :func:`score_records` uses) every row's response ends in the last column,
    so the scored columns are few."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions = positions_from_mask(mask)
    start = _first_scored_column(labels)
    keep = {"logits_to_keep": ids.shape[1] - start} if _keeps_logits(model) else {}
    with torch.no_grad():
        if connection == "none":
            out = model.base(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep
            )
            return [(*_response_nll(out.logits, labels), None)] * draws
        column = batch["cc_position"]
        english = (batch.get("en_input_ids"), batch.get("en_attention_mask"), batch.get("en_cc_position"))
        prefill = prefill_to_connection(model, connection, ids, mask, positions, column, english)
        first = prefill.start
        tail = {} if not keep else {"logits_to_keep": min(keep["logits_to_keep"], ids.shape[1] - first)}
        runs = []
        for _ in range(draws):
            inj = prefill.injection(model, connection, ids, column)
            with injected(model, inj):
                out = model.base(
                    input_ids=ids[:, first:],
                    attention_mask=mask,
                    position_ids=positions[:, first:],
                    past_key_values=prefill.cache,
                    use_cache=prefill.cache is not None,
                    **tail,
                )
            prefill.rewind()  # back to the prompt prefix for the next draw
            runs.append((*_response_nll(out.logits, labels), inj.layers))
    return runs


def _first_scored_column(labels: torch.Tensor) -> int:
    """The first column whose logits predict a scored token (a label at column t is predicted at t - 1)."""
    scored = (labels[:, 1:] != -100).any(0).nonzero()
    return int(scored[0]) if len(scored) else labels.shape[1] - 1


def _keeps_logits(model) -> bool:
    """Whether the base model's forward takes ``logits_to_keep`` (most transformers causal LMs)."""
    base = model.base.get_base_model() if model.uses_lora else model.base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of the labelled tokens, from the logits of the last ``logits.shape[1]``
    columns (float32; positions that are not scored count 0 even where padding made them NaN)."""
    kept = logits.shape[1]
    shifted, target = logits[:, :-1].float(), labels[:, labels.shape[1] - kept + 1 :]
    valid = target != -100
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.clamp(min=0).reshape(-1), reduction="none"
    ).view(target.shape)
    return torch.where(valid, nll, 0.0).sum(1), valid.sum(1)


def summarize(items: list[dict], reps: int = 1000, seed: int = 0) -> dict:
    """Per-language and overall NLL, perplexity and bootstrap interval from per-item sums."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["lang"] or "?", []).append(it)
    out = {}
    for name, rows in sorted(groups.items()) + [("all", items)]:
        nll, tok = [r["nll_sum"] for r in rows], [r["tokens"] for r in rows]
        mean = sum(nll) / max(1, sum(tok))
        low, high = bootstrap_ratio(nll, tok, reps, seed)
        out[name] = {
            "nll": mean,
            "ppl": math.exp(mean),
            "ci_low": low,
            "ci_high": high,
            "items": len(rows),
            "tokens": sum(tok),
        }
    return out


def encode_nll_records(
    model,
    tokenizer,
    data: str | Path,
    connection: str,
    max_length: int,
    data_options: DataOptions | None = None,
    allow_special_tokens: bool = False,
    withhold_english: bool = False,
):
    """The records of ``data`` (read as ``data_options`` say), their features (with the English
    prompts for ``english``), how much of each the token budget cut (``response_cut``,
    ``instruction_cut`` in tokens) and how many prompts of a model trained with ``--augment
    bilingual-prompt`` went without their English (:func:`~cctuning.data.augment.inference_records`;
    ``withhold_english``: all of them). Special-token strings in the records are plain text unless
    ``allow_special_tokens``."""
    records = load_records(data, require_english=connection == "english", options=data_options)
    system_prompt_of(records, model.cc_config.prompt_format.system_prompt, model=True)
    encoder = PromptEncoder(tokenizer, model.cc_config.prompt_format, max_length, allow_special_tokens)
    english = ("instruction_en",) if connection == "english" else ()
    warn_special_records(encoder, records, data, ("instruction", "output", *english))
    prompted, fallbacks = inference_records(records, model.cc_config.augment, str(data), withhold_english)
    features, cuts = [], []
    for rec in prompted:
        ex = encode_example(encoder, rec, with_english=connection == "english")
        features.append(ex.features())
        cuts.append({"response_cut": ex.response_cut, "instruction_cut": ex.instruction_cut})
    return records, features, cuts, fallbacks


def score_records(
    model,
    records,
    features: list[dict],
    connection: str,
    pad_id: int,
    batch_size: int,
    progress: bool,
    draws: int = 0,
    seed: int = 0,
) -> list[dict]:
    """One item per record (file line, language, summed response NLL, response tokens, chosen layer),
    scored ``batch_size`` records at a time in eval mode. With ``draws`` = K > 0 the layer is sampled
    with seeded Gumbel noise (the official inference) K times per item and the item's NLL is the mean
    over the draws (``layers`` lists the K choices, ``layer`` is the most frequent).

    Batches are left-padded (every response ends in the last column, so :func:`batch_nll` runs the LM
    head on few columns), or for ``transform`` aligned at p (the prompts are run once up to p, the
    fused pass covers only the responses), and, unless the layer is sampled, made of records of
    similar lengths (:func:`padding_batches`: at most 25 % padding); the items come back in record
    order. Sampled runs keep the record
    order in their batches, so that each item meets the same Gumbel draws whatever the speed-ups."""
    was_training = model.training
    model.eval()
    device = model.arch.embeddings.weight.device
    sampled = draws > 0 and connection != "none"
    collate, chunks = _plan_batches(model, features, connection, pad_id, batch_size, sampled)
    items: list[dict | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc=f"nll ({connection})", unit="item", disable=not progress)
    try:
        with layer_sampling(model, seed) if sampled else contextlib.nullcontext():
            for chunk in chunks:
                batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk]).items()}
                runs = batch_nll(model, batch, connection, draws if sampled else 1)
                counts = runs[0][1]
                for j, index in enumerate(chunk):
                    rec = records[index]
                    layers = [None if r[2] is None else int(r[2][j]) for r in runs]
                    item = {
                        **({"row": rec.row} if rec.row is not None else {"line": rec.line}),
                        "lang": rec.lang,
                        "nll_sum": sum(float(r[0][j]) for r in runs) / len(runs),
                        "tokens": int(counts[j]),
                        "layer": max(set(layers), key=layers.count) if sampled else layers[0],
                    }
                    if sampled:
                        item["layers"] = layers
                    items[index] = item
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return items


def _plan_batches(model, features: list[dict], connection: str, pad_id: int, batch_size: int, in_order: bool):
    """The collator and the batches (record indices) of :func:`score_records`: in record order when
    ``in_order``, else :func:`padding_batches`. ``transform``, where the cache can be cut back, puts
    every row's p in one column (aligned padding): the prompts then run once up to p and the fused
    pass covers the responses only, where left padding would run max - min response length columns
    twice."""
    aligned = connection == "transform" and can_crop(DynamicCache(config=model.base.config))
    collate = CCCollator(pad_id, "aligned" if aligned else "left")
    if in_order:
        return collate, [
            list(range(s, min(s + batch_size, len(features)))) for s in range(0, len(features), batch_size)
        ]
    lengths = [len(f["input_ids"]) for f in features]
    responses = [n - f["cc_position"] for n, f in zip(lengths, features)] if aligned else None
    return collate, padding_batches(lengths, batch_size, responses=responses)


def write_nll(output: str | Path, report: dict, items: list[dict]) -> None:
    """``nll.json`` (the report) and ``nll_items.jsonl`` (the per-item sums) in ``output``."""
    out = Path(output)
    write_json(out / NLL_NAME, report)
    write_text(out / NLL_ITEMS_NAME, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))


def evaluate_nll(
    model,
    tokenizer,
    data: str | Path,
    connection: str | None = None,
    output: str | Path | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    seed: int = 0,
    reps: int = 1000,
    progress: bool = True,
    model_name: str | None = None,
    sample_layer: int = 0,
    min_response_tokens: int = 4,
    data_options: DataOptions | None = None,
    allow_special_tokens: bool = False,
    withhold_english: bool = False,
) -> dict:
    """Score the gold responses of ``data`` (training records, in any format and source
    :func:`~cctuning.data.records.load_records` reads as ``data_options`` say) and write
    ``nll.json``.

    ``sample_layer`` = K > 0: the official stochastic layer choice, K seeded draws per item, averaged.
    Every cut the token budget made is recorded per item and counted in the report; an item whose
    response was cut to fewer than ``min_response_tokens`` tokens is flagged (``short``) and counted,
    and a warning names how many there are (its NLL rests on few tokens). Special-token strings in the
    records are plain text unless ``allow_special_tokens``. A model trained with ``--augment
    bilingual-prompt`` is prompted with each record's English and then its instruction, or without the
    English where a record lacks it or ``withhold_english`` (counted in the report, with a warning)."""
    if batch_size <= 0:
        raise CCError(f"batch size must be > 0, got {batch_size}")
    if max_length <= 0:
        raise CCError(f"--max-length must be > 0 tokens, got {max_length}")
    if sample_layer < 0:
        raise CCError(f"--sample-layer takes the number of draws (≥ 0), got {sample_layer}")
    connection = resolve_connection(model, connection)
    if output is not None:
        check_output_folder(output)
    with folder_lock(output, "cctuning eval --nll") if output is not None else contextlib.nullcontext():
        return _evaluate_nll(
            model, tokenizer, data, connection, output, batch_size, max_length, seed, reps, progress,
            model_name, sample_layer, min_response_tokens, data_options, allow_special_tokens, withhold_english,
        )  # fmt: skip


def _evaluate_nll(
    model, tokenizer, data, connection, output, batch_size, max_length, seed, reps, progress,
    model_name, sample_layer, min_response_tokens, data_options=None, allow_special_tokens=False,
    withhold_english=False,
) -> dict:  # fmt: skip
    max_length = cap_to_context(max_length, model)  # no item longer than the model's positions
    records, features, cuts, fallbacks = encode_nll_records(
        model, tokenizer, data, connection, max_length, data_options, allow_special_tokens, withhold_english
    )
    started = time.time()
    items = score_records(
        model,
        records,
        features,
        connection,
        pad_token_id(tokenizer),
        batch_size,
        progress,
        sample_layer,
        seed,
    )
    cut_summary = truncation_summary(items, cuts, max_length, min_response_tokens)
    if cut_summary["short_items"]:
        logger.warning(
            "%s: %d of %d responses were cut to fewer than %d tokens by the budget of %d tokens "
            "(flagged 'short' in %s); raise --max-length to score them whole",
            data,
            cut_summary["short_items"],
            len(items),
            min_response_tokens,
            max_length,
            NLL_ITEMS_NAME,
        )
    report = {
        "data": str(data),
        **({"data_options": data_options.describe()} if data_options and data_options.describe() else {}),
        "connection": connection,
        "method": model.cc_config.method,
        **prompt_report(model.cc_config.augment, withhold_english, fallbacks),
        "model": model_name,
        "seed": seed,
        "bootstrap_reps": reps,
        "sample_layer": sample_layer,
        "truncation": cut_summary,
        "num_layers": model.arch.num_layers,
        "layer_choice": layer_counts_by_language(items),
        "nll": summarize(items, reps, seed),
        "seconds": round(time.time() - started, 2),
        "versions": versions(),
    }
    if output is not None:
        write_nll(output, report, items)
    return report


def truncation_summary(
    items: list[dict], cuts: list[dict], max_length: int, min_response_tokens: int
) -> dict:
    """Record each item's cuts on it, flag it ``short`` when its response was cut to fewer than
    ``min_response_tokens`` tokens, and count both for the report."""
    for item, cut in zip(items, cuts):
        item.update(cut)
        item["short"] = bool(cut["response_cut"]) and item["tokens"] < min_response_tokens
    return {
        "max_length": max_length,
        "responses_cut": sum(1 for c in cuts if c["response_cut"]),
        "response_tokens_cut": sum(c["response_cut"] for c in cuts),
        "instructions_cut": sum(1 for c in cuts if c["instruction_cut"]),
        "instruction_tokens_cut": sum(c["instruction_cut"] for c in cuts),
        "min_response_tokens": min_response_tokens,
        "short_items": sum(1 for i in items if i["short"]),
    }


def load_items(run_dir: str | Path) -> list[dict]:
    file = Path(run_dir) / NLL_ITEMS_NAME
    if not file.is_file():
        raise CCError(f"{run_dir}: no {NLL_ITEMS_NAME}")
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _item_key(r: dict) -> tuple:
    # an item is its file line (JSON/JSONL) or its row (a table) and its language
    return (r.get("line", -1), r.get("row", -1), r["lang"])


def paired_difference(a: list[dict], b: list[dict], reps: int = 1000, seed: int = 0) -> dict:
    """Per language and overall: NLL(a) − NLL(b) on the same items, with a paired bootstrap 95% interval
    (the same resampled items for both runs). Negative means run a fits the responses better."""
    out = paired_difference_over_seeds([(a, b)], reps=reps, seed=seed)
    for v in out.values():
        del v["seeds"]
    return out


def paired_difference_over_seeds(
    pairs: list[tuple[list[dict], list[dict]]], reps: int = 1000, seed: int = 0
) -> dict:
    """Per language and overall: the mean over seeds of NLL(a) − NLL(b), where ``pairs`` holds one
    (a, b) pair of item lists per training seed, all on the same items. The 95% interval is a
    two-level bootstrap: each replicate draws the seeds with replacement, then the items with
    replacement (the same items for every seed drawn, and for a and b), and averages the drawn
    seeds' differences; so it holds both the spread over items and the spread over seeds (coarse with
    few seeds: two seeds give three distinct draws). With one pair it is :func:`paired_difference`.
    Negative means the a runs fit the responses better."""
    if not pairs:
        raise CCError("no NLL runs to compare")
    indexed = []
    for a, b in pairs:
        key_a, key_b = {_item_key(r): r for r in a}, {_item_key(r): r for r in b}
        if set(key_a) != set(key_b):
            raise CCError("the two NLL runs were not made on the same items")
        indexed.append((key_a, key_b))
    if any(set(ka) != set(indexed[0][0]) for ka, _ in indexed):
        raise CCError("the NLL runs of the seeds were not made on the same items")
    keys = sorted(indexed[0][0], key=lambda k: (str(k[2]), k[0], k[1]))
    groups: dict[str, list] = {}
    for k in keys:
        groups.setdefault(k[2] or "?", []).append(k)
    rng = random.Random(seed)  # the items' draws: one pair gives paired_difference's exact draws
    seed_rng = random.Random(f"seeds-{seed}")
    out = {}
    for name, ks in sorted(groups.items()) + [("all", keys)]:
        runs = [
            (
                [(ka[k]["nll_sum"], ka[k]["tokens"]) for k in ks],
                [(kb[k]["nll_sum"], kb[k]["tokens"]) for k in ks],
            )
            for ka, kb in indexed
        ]
        out[name] = two_level_bootstrap(runs, reps, rng, seed_rng)
    return out
