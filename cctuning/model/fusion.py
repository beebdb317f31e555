"""How the chosen vector ``c`` joins the hidden state ``h = h_k[p]`` (docs/method.md §2.3, §5).

* ``add`` (the paper's, the default): ``h + c``, bit for bit the official fusion.
* ``scaled`` (ours, opt-in): ``h + c · rms(h) / rms(c)``: the vector is rescaled to the RMS of the
  hidden state it is added to, so that a layer whose FFN output is 35× the residual (SmolLM2's last
  layer) cannot swamp it. The RMS is taken over the hidden dimension of each row, without a learned
  weight (not the model's own norm module: that would add the model's norm gain to the vector).
* ``gated`` (ours, opt-in): ``h + g_l · c`` with one learnable gate per layer, ``g_l`` of the
  chosen layer (the layer weights times the gates, so the ``mean`` ablation averages them);
  ``gated-scalar``: one gate for all layers. The gates start at 0, so CC-Tuning at step 0 computes
  exactly what SFT computes, and the connection is only used once training finds it worth a gate.
"""

from __future__ import annotations

import torch
from torch import nn

from cctuning.errors import CCError

FUSIONS = ("add", "scaled", "gated", "gated-scalar")
_EPS = 1e-6


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last dimension, kept as a (…, 1) column, in float32."""
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


class Fusion(nn.Module):
    """``fused = fusion(hidden_at_p, vector, layer_weights)``; holds the gates of the gated forms."""

    def __init__(self, kind: str = "add", num_layers: int = 1):
        super().__init__()
        if kind not in FUSIONS:
            raise CCError(f"unknown fusion '{kind}' (use {', '.join(FUSIONS)})")
        self.kind = kind
        size = {"gated": num_layers, "gated-scalar": 1}.get(kind)
        self.gate = nn.Parameter(torch.zeros(size)) if size else None

    def forward(
        self, hidden: torch.Tensor, vector: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """``hidden``, ``vector``: (batch, d); ``weights``: (batch, L) layer weights of the choice."""
        vector = vector.to(hidden.dtype)
        if self.kind == "add":
            return hidden + vector
        if self.kind == "scaled":
            scale = rms(hidden) / rms(vector).clamp_min(_EPS)
            return hidden + vector * scale.to(hidden.dtype)
        if self.gate.numel() == 1:
            gate = self.gate.expand(hidden.shape[0]).unsqueeze(-1)
        else:
            gate = (weights.to(self.gate.dtype) @ self.gate).unsqueeze(-1)
        return hidden + gate.to(hidden.dtype) * vector
