"""Checks that a loaded or trained model can work at all: finite weights, logits that tell tokens apart.

* :func:`check_finite_weights`: every floating parameter finite (one NaN would make every output NaN,
  which ``generate`` turns into empty text and ``eval --nll`` into ``nan``); a one-line error naming
  the folder and the first tensor that is not. Cost: one ``aminmax`` per tensor (NaN propagates
  through it), a single synchronisation for the whole model.
* :func:`constant_logits`: whether a model gives every token of its vocabulary the same logit on a
  probe prompt (a dead model: finite weights, no prediction), for the warnings of ``train`` and
  ``fit-matrix``.
"""

from __future__ import annotations

import torch
from torch import nn

from cctuning.errors import CCError

#: the prompt :func:`constant_logits` runs
PROBE_PROMPT = "The capital of France is Paris. The capital of Kenya is"


def _checked(module: nn.Module, only=None) -> list[tuple[str, torch.Tensor]]:
    """The floating parameters of ``module`` that hold values here (not on the meta device, not an
    empty shard), optionally those whose name passes ``only``."""
    return [
        (name, p)
        for name, p in module.named_parameters()
        if p.is_floating_point() and p.numel() and p.device.type != "meta" and (only is None or only(name))
    ]


@torch.no_grad()
def first_non_finite(module: nn.Module, only=None) -> str | None:
    """The name of the first floating parameter of ``module`` holding NaN or an infinity, or None."""
    params = _checked(module, only)
    if not params:
        return None
    device = params[0][1].device  # one synchronisation: the ends of every tensor gathered there first
    ends = torch.stack([torch.stack(torch.aminmax(p.detach())).float().to(device) for _, p in params]).cpu()
    if bool(torch.isfinite(ends).all()):
        return None
    bad = (~torch.isfinite(ends)).any(dim=1).nonzero()[0].item()
    return params[bad][0]


def check_finite_weights(module: nn.Module, where, only=None) -> None:
    """A one-line error naming ``where`` (the folder) and the first tensor that is not finite."""
    name = first_non_finite(module, only)
    if name is not None:
        raise CCError(
            f"{where}: the weights hold NaN or infinite values (first: {name}); the model cannot work "
            "(a diverged run, or a damaged file): retrain it or restore the folder"
        )


@torch.no_grad()
def constant_logits(model: nn.Module, tokenizer, prompt: str = PROBE_PROMPT) -> bool:
    """Whether ``model`` (a CCModel or a Hugging Face causal LM) gives the same logit to every token of
    its vocabulary at every position of ``prompt`` (or logits that are not finite): a dead model, which
    generates one token forever and scores every text alike. Runs one plain forward in eval mode."""
    base = getattr(model, "base", model)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        return False
    device = next(base.parameters()).device
    training = base.training
    base.eval()
    try:
        logits = base(input_ids=ids.to(device), use_cache=False).logits.float()
    finally:
        base.train(training)
    if not bool(torch.isfinite(logits).all()):
        return True
    spread = logits.amax(-1) - logits.amin(-1)
    return bool((spread <= 1e-6 * logits.abs().amax(-1).clamp(min=1.0)).all())
