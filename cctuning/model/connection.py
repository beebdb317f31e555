"""Connection modes: the one place where a mode is resolved and its vectors produced.

A connection feeds the Decision Maker the per-layer activations ``f_l[p]`` of some pass and adds
its choice to ``h_k[p]`` of the non-English pass (docs/method.md §2.3, §2.5):

* ``english``: the English prompt's activations (training, and the oracle at inference);
* ``transform``: the model's own non-English activations mapped by the Transform Matrix
  (inference without English input);
* ``none``: no connection: the plain model.

Training (:meth:`CCModel.forward`), the held-out NLL, generation, the benchmark runner, the
experiment runner and the CLI all resolve the mode with :func:`resolve_connection` and produce the
vectors with :func:`injection`; the full-sequence paths run :func:`connected_forward`, whose output
carries the chosen layers (``output.layer_choice``). Generation and the held-out NLL run the prompt
once into a KV cache with :func:`prefill_to_connection` and continue from it with the injection.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import ModelOutput

from cctuning.errors import CCError
from cctuning.model.transform import MATRIX_NAME

logger = logging.getLogger(__name__)

CONNECTIONS = ("transform", "none", "english")


def default_connection(model) -> str:
    """``transform`` for a CC-Tuning model with a matrix, else ``none``."""
    return "transform" if model.uses_connection and model.transform is not None else "none"


def resolve_connection(model, connection: str | None = None, english: bool | None = None) -> str:
    """The mode to run (``None``: the default), checked against the model; ``english`` says whether
    English prompts are at hand (``None``: not known yet). The default of a CC-Tuning model without a
    Transform Matrix is ``none``, which is said once per model (:func:`warn_no_matrix`)."""
    if not connection and model.uses_connection and model.transform is None:
        warn_no_matrix(model)
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


def warn_no_matrix(model) -> None:
    """Warn, once per model, that a CC-Tuning model without a Transform Matrix runs with connection
    ``none`` by default: without the warning it looks like CC-Tuning ran."""
    if getattr(model, "_warned_no_matrix", False):
        return
    model._warned_no_matrix = True
    logger.warning(
        "this CC-Tuning model has no Transform Matrix (%s): running with connection 'none', the fine-tuned "
        "model without its connection; run `cctuning fit-matrix --model MODEL --data TRAIN_DATA` to fit "
        "one, or pass --connection none to choose this",
        MATRIX_NAME,
    )


def layer_counts(layers) -> dict[int, int]:
    """How often each layer was chosen, by layer (``None``, no single layer chosen, is not counted)."""
    counts: dict[int, int] = {}
    for layer in layers:
        if layer is not None:
            counts[int(layer)] = counts.get(int(layer), 0) + 1
    return dict(sorted(counts.items()))


def describe_layers(counts: dict) -> str:
    """``counts`` (layer → times chosen) in a few words: ``layer 3 ×5, layer 7 ×2``, or ``no layer
    chosen`` (connection none)."""
    if not counts:
        return "no layer chosen"
    ordered = sorted(counts.items(), key=lambda kv: int(kv[0]))
    return ", ".join(f"layer {layer} ×{n}" for layer, n in ordered)


def layer_counts_by_language(rows) -> dict[str, dict[str, int]]:
    """How often each layer was chosen, per language, from result rows (``lang``, and ``layer`` or,
    with sampled draws, ``layers``), as a results file records it (layer numbers as strings)."""
    per_lang: dict[str, list] = {}
    for row in rows:
        per_lang.setdefault(row.get("lang") or "?", []).extend(row.get("layers", [row["layer"]]))
    counts = {lang: layer_counts(layers) for lang, layers in per_lang.items()}
    return {lang: {str(k): v for k, v in c.items()} for lang, c in counts.items() if c}


def describe_layer_choice(connection: str, per_lang: dict) -> str:
    """One line: the connection and, per language, the layers chosen (:func:`describe_layers`)."""
    if not per_lang:
        return f"connection {connection}: no layer chosen"
    return f"connection {connection}, layers chosen: " + "; ".join(
        f"{lang}: {describe_layers(counts)}" for lang, counts in per_lang.items()
    )


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
    teacher-forced scoring). The output is the base model's with one field more, ``layer_choice``:
    the layer chosen per row (None without connection, or when no single layer is chosen)."""
    if connection == "none":
        return with_layer_choice(
            model, model.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs), None
        )
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
    with injected(model, inj):
        out = model.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return with_layer_choice(model, out, inj.layers)


@functools.cache
def _output_type(base_type: type) -> type:
    """``base_type`` (a transformers ``ModelOutput`` dataclass) with the field ``layer_choice`` added."""
    return dataclasses.make_dataclass(
        f"CC{base_type.__name__}",
        [("layer_choice", "torch.Tensor | None", dataclasses.field(default=None))],
        bases=(base_type,),
        namespace={"__module__": __name__},
    )


def with_layer_choice(model, output, layers: torch.Tensor | None):
    """The base model's ``output`` with ``layer_choice`` = ``layers`` (a tuple output, from
    ``return_dict=False``, is returned as it is). ``layers`` is also kept for the deprecated
    ``CCModel.last_layer_choice``, which nothing in cctuning reads."""
    model._last_layer_choice = layers
    if not isinstance(output, ModelOutput):
        return output
    return _output_type(type(output))(**output, layer_choice=layers)


def deprecated_last_layer_choice(model) -> torch.Tensor | None:
    """What ``CCModel.last_layer_choice`` returns, with a DeprecationWarning (kept for one release)."""
    warnings.warn(
        "CCModel.last_layer_choice is deprecated and will be removed in the next release: read "
        "layer_choice from the forward's output (connected_forward, CCModel.forward) or Injection.layers",
        DeprecationWarning,
        stacklevel=3,
    )
    return model._last_layer_choice


# -- the prompt prefill of generation and scoring -----------------------------------------------------
def can_crop(cache) -> bool:
    """Whether every layer of ``cache`` can be cut back to fewer tokens (``DynamicLayer``; not
    sliding-window or recurrent layers, which keep only a window or a state of the past)."""
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", []))


@dataclass
class Prefill:
    """What a fused pass continues from: the KV cache of the columns ``[0, start)`` (None: no cache, the
    fused pass runs from column 0) and ``activations``, the ``f_l[p]`` (batch, L, d) that the
    connection reads, before any mapping."""

    cache: DynamicCache | None
    start: int
    activations: torch.Tensor | None  # None for connection none

    def injection(
        self, model, connection: str, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> Injection:
        """The connection's choice for the fused pass over the columns from ``start`` (``positions``:
        p per row, counted in the whole batch's columns; the injection's positions count from ``start``)."""
        return injection(
            model, connection, self.activations, input_ids[:, self.start :], positions - self.start
        )

    def rewind(self) -> None:
        """Cut the cache back to ``[0, start)`` after a fused pass, for another one (the held-out NLL's
        draws); only a cache that :func:`can_crop` is ever kept for more than one pass."""
        if self.cache is not None:
            if not can_crop(self.cache):
                raise RuntimeError("this KV cache cannot be cut back: it serves one fused pass only")
            _crop_to(self.cache, self.start)


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` tokens of a cache that :func:`can_crop`."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _decode(model, input_ids, attention_mask, position_ids, cache) -> None:
    """One chunk through the decoder (no LM head), appended to ``cache``."""
    model.arch.decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )


@torch.no_grad()
def prefill_to_connection(
    model,
    connection: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    positions: torch.Tensor,
    english: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    always_cache: bool = False,
) -> Prefill:
    """Run a batch's prompts up to the connection and capture ``f_l[p]`` (``positions``: p per row in the
    batch's columns; ``english``: the English prompts' ids, mask and p for connection ``english``).

    With causal attention the columns before ``min p`` are the same in the collecting pass and in the
    fused pass, so they are run once into a KV cache where that saves work. The one rule:

    * ``transform``, with a cache that :func:`can_crop`: one decoder pass over ``[0, max p]`` fills the
      cache and captures ``f_l[p]`` of every row; the cache is then cut back to ``min p``;
    * otherwise, with ``always_cache`` (generation, which continues from a cache in any case): the
      columns ``[0, min p)`` are run into the cache; ``transform`` captures ``f_l[p]`` by running the
      rest of the sequence on a copy of it, so this cache is never cut back;
    * otherwise (teacher-forced scoring): no cache, the fused pass runs from column 0; ``transform``
      captures ``f_l[p]`` in a pass over ``[0, max p]`` (``f_l[p]`` depends on the tokens up to p only).

    ``english`` reads ``f_l[p]`` from the English prompts' own pass in every case."""
    cache = DynamicCache(config=model.base.config)
    english = english or (None, None, None)
    first, end = int(positions.min()), int(positions.max()) + 1
    if connection == "transform" and can_crop(cache):
        with model.hooks.capturing(positions):
            _decode(model, input_ids[:, :end], attention_mask[:, :end], position_ids[:, :end], cache)
            acts = model.hooks.stacked()
        _crop_to(cache, first)
        return Prefill(cache, first, acts)
    if not always_cache:
        end = end if connection == "transform" else input_ids.shape[1]
        acts = source_activations(
            model,
            connection,
            input_ids[:, :end],
            attention_mask[:, :end],
            positions,
            *english,
        )
        return Prefill(None, 0, acts)
    if first > 0:
        _decode(model, input_ids[:, :first], attention_mask[:, :first], position_ids[:, :first], cache)
    if connection != "transform":
        acts = source_activations(model, connection, input_ids, attention_mask, positions, *english)
        return Prefill(cache, first, acts)
    with model.hooks.capturing(positions - first):
        _decode(model, input_ids[:, first:], attention_mask, position_ids[:, first:], copy.deepcopy(cache))
        acts = model.hooks.stacked()
    return Prefill(cache, first, acts)
