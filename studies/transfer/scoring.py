"""Scoring on the study's items: the candidate answers' likelihood through the package's connected
evaluation path, accuracies and the majority baseline, and what the activations at p encode
(linear probes, the Transform Matrix's cosine per layer)."""

from __future__ import annotations

import torch

from cctuning.data.augment import inference_instruction
from cctuning.data.collator import CCCollator
from cctuning.data.encoding import PromptEncoder, PromptFormat
from cctuning.eval.nll import item_nll
from cctuning.inference.matrix import prompt_activations, transform_error
from cctuning.stats import accuracy_summary
from studies.transfer.world import World


# -- evaluation --------------------------------------------------------------------------------
def score_candidates(
    model, tokenizer, items: list[dict], connection: str, batch_size: int, withhold_english: bool = False
) -> list[dict]:
    """For each item, the teacher-forced NLL of every candidate answer (answer + end of sequence)
    under ``connection``, through :func:`cctuning.eval.nll.item_nll`; the prediction is the
    candidate of lowest NLL. The prompt is the one the package gives a model trained with its
    saved ``augment`` (:func:`prompt_instruction`). Returns one dict per item (prediction, correct,
    chosen layer)."""
    encoder = PromptEncoder(tokenizer, _prompt_format(model))
    english = connection == "english"
    augment = model.cc_config.augment
    features = [
        encoder.encode_example(
            prompt_instruction(item, augment, withhold_english),
            cand,
            item["instruction_en"] if english else None,
        ).features()
        for item in items
        for cand in item["candidates"]
    ]
    nll, layers = _sequence_nll(model, tokenizer, features, connection, batch_size)
    out, pos = [], 0
    for item in items:
        k = len(item["candidates"])
        scores = nll[pos : pos + k]
        best = min(range(k), key=lambda j: scores[j])
        out.append(
            {
                "prediction": item["candidates"][best],
                "correct": item["candidates"][best] == item["answer"],
                "nll": scores,
                "layer": layers[pos],  # the same prompt for every candidate: one choice per item
            }
        )
        pos += k
    return out


def prompt_instruction(item: dict, augment: str, withhold_english: bool = False) -> str:
    """The instruction an item is asked with, as the package builds it for a model trained with
    ``--augment augment`` (:func:`cctuning.data.augment.inference_instruction`): a
    ``bilingual-prompt`` model gets the English question and then the foreign one, or with
    ``withhold_english`` the foreign one alone; any other model the item's instruction."""
    english = None if withhold_english else item["instruction_en"]
    return inference_instruction(item["instruction"], english, augment)


def _sequence_nll(
    model, tokenizer, features: list[dict], connection: str, batch_size: int
) -> tuple[list[float], list[int | None]]:
    """Each sequence's summed response NLL and the Decision Maker's layer for it (None without a
    connection), in eval mode. The one place that calls into the package's evaluation internals."""
    collate = CCCollator(tokenizer.pad_token_id, "right")
    device = model.arch.embeddings.weight.device
    nll: list[float] = []
    layers: list[int | None] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
            sums, _, chosen = item_nll(model, batch, connection)
            nll += sums.tolist()
            layers += [None] * len(sums) if chosen is None else chosen.tolist()
    finally:
        model.train(was_training)
    return nll, layers


def _prompt_format(model):
    """The model's saved prompt format (a dict in older versions of CCConfig)."""
    fmt = model.cc_config.prompt_format
    return PromptFormat.from_dict(fmt) if isinstance(fmt, dict) else fmt


def english_items(items: list[dict]) -> list[dict]:
    """The same questions asked in English (for the stage-1 English accuracy)."""
    return [{**it, "instruction": it["instruction_en"]} for it in items]


def layer_histogram(layers: list[int | None], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for layer in layers:
        if layer is not None:
            counts[layer] += 1
    return counts


def correct(rows: list[dict]) -> list[bool]:
    """The ``correct`` flags of :func:`score_candidates`'s rows."""
    return [bool(r["correct"]) for r in rows]


def majority_baseline(world: World, items: list[dict]) -> dict:
    """Accuracy of answering every question with its relation's most frequent answer among the
    training entities' facts (what a model can get from the foreign data's answer prior alone)."""
    best = {}
    for r, rel in enumerate(world.relations):
        counts = [0] * len(world.answers[rel])
        for e in world.train_entities:
            counts[world.facts[e, r]] += 1
        best[rel] = world.answers[rel][max(range(len(counts)), key=counts.__getitem__)]
    return accuracy_summary([best[it["relation"]] == it["answer"] for it in items])


# -- what the activations at p encode ----------------------------------------------------------
def ridge_probe(
    train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, classes: int, ridge: float = 1e-2
) -> torch.Tensor:
    """A linear least-squares probe (one-hot targets, bias, ridge ``λ · mean(diag XᵀX)``) fitted on
    ``train_x`` (N, d); returns the scores of ``test_x`` (M, classes)."""
    x = torch.cat([train_x.double(), torch.ones(len(train_x), 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(torch.tensor(train_y), classes).double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), x.T @ y)
    test = torch.cat([test_x.double(), torch.ones(len(test_x), 1, dtype=torch.float64)], dim=1)
    return test @ w


def probe_accuracy(train_x, train_items: list[dict], test_x, test_items: list[dict]) -> float:
    """Accuracy of a probe fitted on ``train_x`` (answers of ``train_items``) at picking the gold
    answer of ``test_items`` among their relation's candidates."""
    words = sorted({w for it in train_items + test_items for w in it["candidates"]})
    index = {w: i for i, w in enumerate(words)}
    scores = ridge_probe(train_x, [index[it["answer"]] for it in train_items], test_x, len(words))
    hits = 0
    for row, it in zip(scores, test_items):
        best = max(it["candidates"], key=lambda w: float(row[index[w]]))
        hits += best == it["answer"]
    return hits / len(test_items)


def activation_diagnostics(model, tokenizer, matrix, train_items, held_items) -> dict:
    """Per layer: the Transform Matrix's cosine on the held-out entities' prompts (before and after
    mapping), and linear probes of the answer at p, fitted on the training entities' prompts and
    tested on the held-out ones: English → English (the oracle's vectors), English → transformed
    foreign (the transform's vectors, read as English ones), foreign → foreign."""
    encoder = PromptEncoder(tokenizer, _prompt_format(model))
    pad = tokenizer.pad_token_id

    def acts(items, key):
        return prompt_activations(model, encoder, [it[key] for it in items], 64, pad)

    with torch.no_grad():
        en_train, fo_train = acts(train_items, "instruction_en"), acts(train_items, "instruction")
        en_held, fo_held = acts(held_items, "instruction_en"), acts(held_items, "instruction")
    mapped = matrix.apply(fo_held)
    out = []
    for layer in range(en_held.shape[1]):
        sl = slice(layer, layer + 1)
        out.append(
            {
                "layer": layer,
                "cosine_before": transform_error(None, fo_held[:, sl], en_held[:, sl])["cosine"],
                "cosine_after": transform_error(matrix.matrix, fo_held[:, sl], en_held[:, sl])["cosine"],
                "probe_english": probe_accuracy(
                    en_train[:, layer], train_items, en_held[:, layer], held_items
                ),
                "probe_transformed": probe_accuracy(
                    en_train[:, layer], train_items, mapped[:, layer], held_items
                ),
                "probe_foreign": probe_accuracy(
                    fo_train[:, layer], train_items, fo_held[:, layer], held_items
                ),
            }
        )
    return {
        "cosine_before": transform_error(None, fo_held, en_held)["cosine"],
        "cosine_after": transform_error(matrix.matrix, fo_held, en_held)["cosine"],
        "per_layer": out,
    }
