"""The Decision Maker: which layer's English FFN activation to add (docs/method.md §2.3).

``Linear(hidden, num_layers, bias=False)`` with N(0, 0.02²) init, input
``mean_l(a_l) + embedding(x)[p]``, hard Gumbel-softmax with straight-through gradients while
training. At inference the choice is a deterministic argmax by default; sampling (the official
code's behaviour, §2.7.7) is available with a seeded generator.

``input_norm="rms"`` (ours, opt-in, §5): the input is ``mean_l(a_l / rms(a_l)) + e / rms(e)``, so
that one near-constant layer of large norm (SmolLM2's last FFN output is 35× the residual) does
not dominate the mean and every layer and the token embedding count alike.

Precision: the input ``z``, the logits ``W z``, the Gumbel noise and the softmax are float32 whatever
the model's dtype and under autocast (``--bf16``), so that a bf16 model chooses the layer as its
float32 twin would on the same activations (bf16 logits keep about 3 significant digits, enough to
flip a near tie). The weight ``W`` keeps the model's dtype. The official code ran all of it in bf16
(docs/method.md §2.3). The chosen vector is returned in the activations' dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cctuning.errors import CCError

DM_INPUTS = ("raw", "rms")


def float32_compute(device: torch.device):
    """A block in which autocast is off on ``device``: what runs inside stays in the dtype given."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Float32Linear(nn.Linear):
    """A linear layer computed in float32 whatever its weight's dtype (bf16, fp16) and under autocast.

    The weight keeps the model's dtype (sharding engines such as FSDP flatten a unit's parameters
    into one tensor of one dtype), and the layer is still called as a module (ZeRO-3 gathers a
    module's parameters around its own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_compute(x.device):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias)


def _rms_normalised(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps).to(x.dtype)


def hard_gumbel_softmax(
    logits: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One-hot forward, ``softmax((logits + G) / tau)`` backward (as ``F.gumbel_softmax(hard=True)``),
    but with an optional generator so that sampled layer choices are reproducible."""
    noise = torch.empty_like(logits, dtype=torch.float32)
    if generator is not None and generator.device != noise.device:
        noise = noise.cpu()
    noise = -noise.exponential_(generator=generator).log()
    y_soft = ((logits.float() + noise.to(logits.device)) / tau).softmax(-1)
    index = y_soft.argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return (y_hard - y_soft.detach() + y_soft).to(logits.dtype)


class DecisionMaker(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, init_std: float = 0.02, input_norm: str = "raw"):
        super().__init__()
        if input_norm not in DM_INPUTS:
            raise CCError(f"unknown Decision Maker input '{input_norm}' (use {', '.join(DM_INPUTS)})")
        self.input_norm = input_norm
        self.proj = Float32Linear(hidden_size, num_layers, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)

    def logits(self, activations: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``activations``: (batch, L, d) per-layer activations; ``embedding``: (batch, d) at p. The
        input, the projection and so the logits are float32 whatever the model's dtype."""
        activations, embedding = activations.float(), embedding.float()
        if self.input_norm == "rms":
            activations, embedding = _rms_normalised(activations), _rms_normalised(embedding)
        z = activations.mean(dim=1) + embedding
        return self.proj(z)

    def forward(
        self,
        activations: torch.Tensor,
        embedding: torch.Tensor,
        sample: bool,
        tau: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(fused, weights)``: the selected activation (batch, d) and the one-hot (batch, L)."""
        logits = self.logits(activations, embedding)
        with float32_compute(logits.device):
            if sample:
                weights = hard_gumbel_softmax(logits, tau, generator)
            else:
                weights = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        fused = (weights.unsqueeze(-1).to(activations.dtype) * activations).sum(dim=1)
        return fused, weights
