"""Does the foreign side know *which entity* a question is about? Linear probes of the entity at p
(the understood world, docs/transfer.md): fitted on the held-out entities' context-relation
prompts and tested on their evaluated questions (other prompts of the same entities, so a hit is
identification, not memorisation), on the foreign activations, the English ones and the
Transform Matrix's image of the foreign ones. Two kinds of activation: the MLP outputs ``f_l[p]``
(what the Decision Maker and the Transform Matrix see) and the hidden state at p after each decoder
layer (the residual stream, what interpretability probes usually read)."""

from __future__ import annotations

import torch

from cctuning.data.encoding import PromptEncoder
from cctuning.inference.matrix import prompt_activations, prompt_batches
from cctuning.model.ccmodel import positions_from_mask
from studies.transfer.scoring import _prompt_format, ridge_probe
from studies.transfer.world import World


def entity_accuracy(
    train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int]
) -> float:
    """Accuracy of a ridge probe of the entity (one class per entity) fitted on ``train_x``."""
    classes = max(train_y + test_y) + 1
    scores = ridge_probe(train_x, train_y, test_x, classes)
    return float((scores.argmax(dim=1) == torch.tensor(test_y)).double().mean())


def prompt_hidden_states(
    model, encoder, texts: list[str], batch_size: int, pad_token_id: int
) -> torch.Tensor:
    """The hidden state at p after each decoder layer, (len(texts), L, d) float32, in input order."""
    out = torch.empty(len(texts), model.arch.num_layers, model.arch.hidden_size)
    for idx, ids, mask, positions in prompt_batches(encoder, texts, batch_size, pad_token_id):
        hidden = model.arch.decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[1:]
        rows = torch.arange(len(idx))
        out[idx] = torch.stack([h[rows, positions] for h in hidden], dim=1).float()
    return out


def _prompts(world: World) -> dict[str, list]:
    """The probe's prompts: the held-out entities' context-relation questions (fit) and their
    evaluated questions (test), in both languages, and each one's entity class."""
    held = world.heldout_entities
    contexts = range(len(world.context_relations))
    relations = range(len(world.relations))
    return {
        "fit_en": [world.context_english_question(e, c) for e in held for c in contexts],
        "fit_fo": [world.context_foreign_question(e, c) for e in held for c in contexts],
        "test_en": [world.english_question(e, r) for e in held for r in relations],
        "test_fo": [world.foreign_question(e, r) for e in held for r in relations],
        "fit_y": [i for i in range(len(held)) for _ in contexts],
        "test_y": [i for i in range(len(held)) for _ in relations],
    }


def entity_probes(model, tokenizer, world: World, matrix=None) -> dict | None:
    """Per layer, the entity probe's accuracy on the held-out entities' evaluated questions:
    ``foreign`` (fitted and tested on foreign activations ``f_l[p]``), ``english`` (the same in
    English), with ``matrix``, ``transformed`` (the English-fitted probe read on the matrix's image of
    the foreign activations), and ``foreign_hidden`` / ``english_hidden``: the same probes on the
    hidden state at p after the layer. None in a world without context relations."""
    if not world.context_relations:
        return None
    texts = _prompts(world)
    encoder = PromptEncoder(tokenizer, _prompt_format(model))
    with torch.no_grad():
        keys = ("fit_en", "fit_fo", "test_en", "test_fo")
        acts = {k: prompt_activations(model, encoder, texts[k], 64, tokenizer.pad_token_id) for k in keys}
        hidden = {k: prompt_hidden_states(model, encoder, texts[k], 64, tokenizer.pad_token_id) for k in keys}
    mapped = matrix.apply(acts["test_fo"]) if matrix is not None else None
    fit_y, test_y = texts["fit_y"], texts["test_y"]
    per_layer = []
    for layer in range(acts["test_fo"].shape[1]):
        row = {
            "layer": layer,
            "foreign": entity_accuracy(acts["fit_fo"][:, layer], fit_y, acts["test_fo"][:, layer], test_y),
            "english": entity_accuracy(acts["fit_en"][:, layer], fit_y, acts["test_en"][:, layer], test_y),
        }
        for side, fit, test in (("foreign", "fit_fo", "test_fo"), ("english", "fit_en", "test_en")):
            row[f"{side}_hidden"] = entity_accuracy(
                hidden[fit][:, layer], fit_y, hidden[test][:, layer], test_y
            )
        if mapped is not None:
            row["transformed"] = entity_accuracy(acts["fit_en"][:, layer], fit_y, mapped[:, layer], test_y)
        per_layer.append(row)
    return {
        "classes": len(world.heldout_entities),
        "best_foreign": max(row["foreign"] for row in per_layer),
        "best_foreign_hidden": max(row["foreign_hidden"] for row in per_layer),
        "per_layer": per_layer,
    }
