"""Find, in any decoder-only Hugging Face model, the pieces the connection hooks into.

Like pyvene, an architecture is described by a tiny declarative map instead of a copied modeling
file: the decoder layers are found generically (``get_decoder().layers`` or the ``ModuleList``
with ``num_hidden_layers`` entries), and the "FFN activation" is the output of the sub-module of a
layer whose result is added to the residual stream (docs/method.md §2.1: after ``down_proj``, before
the residual add). For most models that is ``mlp``; models that normalise the MLP output before
the residual add (Gemma 2/3, OLMo 2) use ``post_feedforward_layernorm``. A mixture-of-experts block
counts as one FFN (its output: the routed experts' weighted sum, plus any shared expert); with a
parallel residual (GPT-NeoX, Phi-2) the FFN output is the MLP's term of the layer's sum, not the
layer's whole update (docs/method.md §2.1.1). Architectures with no FFN at all are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from cctuning.errors import CCError

# model_type -> attribute of one decoder layer whose output is what the MLP adds to the residual
FFN_OUTPUT_BY_MODEL_TYPE: dict[str, str] = {
    "gemma2": "post_feedforward_layernorm",
    "gemma3": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm",
    "olmo2": "post_feedforward_layernorm",
}
FFN_CANDIDATES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
# model_type -> why CC-Tuning cannot run on it
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    model_type: "a state-space model: its blocks have no feed-forward (MLP) sub-layer whose output "
    "CC-Tuning could read"
    for model_type in ("mamba", "mamba2", "falcon_mamba")
}
LAYER_LIST_NAMES = ("layers", "h", "blocks")

logger = logging.getLogger(__name__)


@dataclass
class Architecture:
    layers: nn.ModuleList
    ffn: list[nn.Module]
    embeddings: nn.Module
    decoder: nn.Module
    layers_path: str
    ffn_name: str
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model: nn.Module) -> int | None:
    """The positions ``model`` (a :class:`~cctuning.model.CCModel` or a transformers model) can attend
    over: its text config's ``max_position_embeddings`` (``n_positions`` for GPT-2), None if unknown."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def cap_to_context(max_length: int | None, model: nn.Module, what: str = "--max-length") -> int | None:
    """``max_length`` lowered to the model's context (logged when it is), or the context when
    ``max_length`` is None: no sequence longer than the positions the model has reaches it."""
    context = context_length(model)
    if context is None or (max_length is not None and max_length <= context):
        return max_length
    if max_length is not None:
        logger.info("%s %d capped to the model's context of %d tokens", what, max_length, context)
    return context


def locate(model: nn.Module, layers_path: str | None = None, ffn_name: str | None = None) -> Architecture:
    """Find the decoder layers, their FFN output modules and the input embeddings of ``model``."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", "")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise CCError(
            f"{type(model).__name__} (model_type '{model_type}') is not supported: "
            f"{UNSUPPORTED_MODEL_TYPES[model_type]}"
        )
    layers, found_path = _find_layers(model, layers_path, getattr(config, "num_hidden_layers", None))
    chosen = _find_ffn(layers, model_type, ffn_name)
    ffn = [getattr(layer, chosen) for layer in layers]
    # the English pass only needs the layers: run the decoder without the LM head when we can
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    hidden = getattr(config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    return Architecture(
        layers=layers,
        ffn=ffn,
        embeddings=model.get_input_embeddings(),
        decoder=decoder,
        layers_path=found_path,
        ffn_name=chosen,
        hidden_size=int(hidden),
    )


def _find_layers(
    model: nn.Module, layers_path: str | None, n_layers: int | None
) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their dotted path: ``layers_path`` when given, else the decoder's layer
    list, else the one ``nn.ModuleList`` of ``n_layers`` modules."""
    if layers_path:
        layers = _get(model, layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise CCError(f"--layers-path '{layers_path}' does not name an nn.ModuleList in this model")
        return layers, layers_path
    named = dict(model.named_modules())
    layers = None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in LAYER_LIST_NAMES:
        cand = getattr(decoder, name, None) if decoder is not None else None
        if isinstance(cand, nn.ModuleList) and len(cand) > 0:
            layers = cand
            break
    if layers is None:
        for module in named.values():
            if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
                layers = module
                break
    if layers is None:
        raise CCError(
            f"cannot find the decoder layers of {type(model).__name__}: looked for "
            f"get_decoder().{{{','.join(LAYER_LIST_NAMES)}}} and for an nn.ModuleList of "
            f"num_hidden_layers={n_layers} modules; pass --layers-path (e.g. model.layers)"
        )
    return layers, next(n for n, m in named.items() if m is layers)


def _find_ffn(layers: nn.ModuleList, model_type: str, ffn_name: str | None) -> str:
    """The attribute name of the feed-forward block, present in every layer."""
    candidates = (
        [ffn_name] if ffn_name else [FFN_OUTPUT_BY_MODEL_TYPE.get(model_type, "")] + list(FFN_CANDIDATES)
    )
    chosen = next((c for c in candidates if c and isinstance(getattr(layers[0], c, None), nn.Module)), None)
    if chosen is None:
        raise CCError(
            f"cannot find the feed-forward block of {type(layers[0]).__name__} (model_type '{model_type}'): "
            f"looked for the attributes {', '.join(c for c in candidates if c)}; pass --ffn-module NAME"
        )
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, chosen, None), nn.Module)]
    if missing:
        raise CCError(
            f"decoder layer {missing[0]} of {len(layers)} has no '{chosen}' (layers without it: "
            f"{', '.join(map(str, missing))}): CC-Tuning needs a feed-forward block in every layer"
        )
    return chosen
