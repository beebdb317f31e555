"""Connection modes: the one place where a mode is resolved and its vectors produced.

A connection feeds the Decision Maker the per-layer activations ``f_l[p]`` of some pass and adds
its choice to ``h_k[p]`` of the non-English pass (docs/method.md §2.3, §2.5):

* ``english``: the English prompt's activations (training, and the oracle at inference);
* ``transform``: the model's own non-English activations mapped by the Transform Matrix
  (inference without English input);
* ``none``: no connection: the plain model.

Training (:meth:`CCModel.forward`), the held-out NLL, generation, the benchmark runner, the
experiment runner and the CLI all resolve the mode with :func:`resolve_connection` and produce the
vectors with :func:`injection`; the full-sequence paths run :func:`connected_forward`. Generation
collects the activations from its KV-cache prefill itself and hands them to :func:`injection`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cctuning.errors import CCError

CONNECTIONS = ("transform", "none", "english")


def default_connection(model) -> str:
    """``transform`` for a CC-Tuning model with a matrix, else ``none``."""
    return "transform" if model.uses_connection and model.transform is not None else "none"


def resolve_connection(model, connection: str | None = None, english: bool | None = None) -> str:
    """The mode to run (``None``: the default), checked against the model; ``english`` says whether
    English prompts are at hand (``None``: not known yet)."""
    connection = connection or default_connection(model)
    if connection not in CONNECTIONS:
        raise CCError(f"unknown connection '{connection}' (use {', '.join(CONNECTIONS)})")
    if connection != "none" and not model.uses_connection:
        raise CCError(
            f"connection '{connection}' needs a CC-Tuning model; this one is method "
            f"'{model.cc_config.method}' (use --connection none)"
        )
    if connection == "transform" and model.transform is None:
        raise CCError(
            "this model has no transform matrix: run `cctuning fit-matrix` first, or use --connection none"
        )
    if connection == "english" and english is False:
        raise CCError("connection 'english' needs the English prompt (instruction_en) of every input")
    return connection


@dataclass
class Injection:
    """What is added after layer k: ``vectors[b]`` at ``positions[b]``, fused by the model's fusion."""

    positions: torch.Tensor  # (batch,)
    vectors: torch.Tensor  # (batch, d): the chosen (or mixed) activation
    weights: torch.Tensor  # (batch, L): the layer weights of the choice
    layers: torch.Tensor | None  # (batch,): the chosen layer, None when no single layer is chosen


def map_activations(model, connection: str, activations: torch.Tensor) -> torch.Tensor:
    """``transform`` maps the model's own activations to English-like ones; ``english`` uses them as is."""
    return model.transform.apply(activations) if connection == "transform" else activations


def injection(
    model, connection: str, activations: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor
) -> Injection:
    """Map the collected ``f_l[p]`` for ``connection`` and let the Decision Maker (or an ablation)
    choose. ``input_ids[b, positions[b]]`` is the token at p, whose embedding the Decision Maker reads."""
    fused, weights = model.choose(input_ids, positions, map_activations(model, connection, activations))
    return Injection(positions, fused, weights, model.chosen_layers(weights))


@contextmanager
def injected(model, inj: Injection):
    """Within the block, forwards of ``model.base`` carry the injection."""
    with model.hooks.injecting(inj.positions, inj.vectors, model.fusion, inj.weights):
        yield


@contextmanager
def layer_sampling(model, seed: int):
    """Within the block the Decision Maker samples its layer with Gumbel noise, as the official
    inference code does, from a generator seeded with ``seed`` (outside it: the argmax)."""
    saved = (model.cc_config.sample_layer, model.generator)
    model.cc_config.sample_layer = True
    model.generator = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        model.cc_config.sample_layer, model.generator = saved


def source_activations(
    model,
    connection: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    en_input_ids: torch.Tensor | None = None,
    en_attention_mask: torch.Tensor | None = None,
    en_positions: torch.Tensor | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """``f_l[p]`` (batch, L, d) of the pass the connection reads, before any mapping: the English
    prompt for ``english``, the non-English sequence itself for ``transform`` (``f_l[p]`` depends
    only on the tokens up to p, so the full sequence gives the prompt's values)."""
    if connection == "english":
        if en_input_ids is None or en_positions is None:
            raise CCError("connection 'english' needs the English prompt (instruction_en) of every input")
        return model.collect_activations(en_input_ids, en_attention_mask, en_positions, grad)
    return model.collect_activations(input_ids, attention_mask, positions, grad)


def connected_forward(
    model,
    connection: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    en_input_ids: torch.Tensor | None = None,
    en_attention_mask: torch.Tensor | None = None,
    en_positions: torch.Tensor | None = None,
    english_grad: bool = False,
    **kwargs,
):
    """One full-sequence forward of ``model.base`` with the connection at ``positions`` (training,
    teacher-forced scoring). Sets ``model.last_layer_choice``."""
    if connection == "none":
        model.last_layer_choice = None
        return model.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    acts = source_activations(
        model,
        connection,
        input_ids,
        attention_mask,
        positions,
        en_input_ids,
        en_attention_mask,
        en_positions,
        english_grad,
    )
    inj = injection(model, connection, acts, input_ids, positions)
    model.last_layer_choice = inj.layers
    with injected(model, inj):
        return model.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
