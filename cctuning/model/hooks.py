"""Forward hooks that capture FFN activations at p and inject a vector after layer k at p.

The hooks are registered once and stay registered (docs/method.md §6: hooks removed before ``backward()``
break gradient checkpointing, whose recomputation fires them again). They are idle unless armed
by one of the context managers below, and they are idempotent: a capture overwrites its slot, an
injection is a pure function of the layer output, so a recomputation gives the same result.
Nothing is written in place into an activation.

Gradient checkpointing (transformers >= 5 checkpoints a layer's ``forward``, not ``__call__``): the
injection hook sits on the decoder layer, so it runs outside the checkpoint, once. The capture
hooks sit on the FFN inside the layer, so a recomputation in the backward pass fires them again
after the capture block has closed; they then do nothing. The non-reentrant checkpoint requires
the recomputation to save the same tensors for backward as the first forward, so the capture
selects ``f_l[b, p_b]`` with Python ints: a ``select`` saves no tensor, so skipping it on the
recomputation changes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from cctuning.model.arch import Architecture


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class ConnectionHooks:
    """Capture ``f_l[p]`` for every layer l and/or add ``c`` to ``h_k[p]``."""

    def __init__(self, arch: Architecture, inject_layer: int = 0):
        if not 0 <= inject_layer < arch.num_layers:
            raise ValueError(f"inject_layer={inject_layer} is outside 0..{arch.num_layers - 1}")
        self.arch = arch
        self.inject_layer = inject_layer
        self._capture_pos: list[int] | None = None
        self._captured: list[torch.Tensor | None] = [None] * arch.num_layers
        self._inject: tuple | None = None
        self.handles = [
            module.register_forward_hook(self._make_capture(i)) for i, module in enumerate(arch.ffn)
        ]
        self.handles.append(arch.layers[inject_layer].register_forward_hook(self._inject_hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- capture -------------------------------------------------------------------------------
    def _make_capture(self, index: int):
        def hook(module: nn.Module, args, output):
            if self._capture_pos is None:
                return None
            out = _first(output)
            self._captured[index] = torch.stack([out[row, pos] for row, pos in enumerate(self._capture_pos)])
            return None

        return hook

    @contextmanager
    def capturing(self, positions: torch.Tensor):
        """Within the block, every forward records ``f_l[positions[b]]``; read them with :meth:`stacked`."""
        self._capture_pos = [int(p) for p in positions.tolist()]
        self._captured = [None] * self.arch.num_layers
        try:
            yield self
        finally:
            self._capture_pos = None

    def stacked(self) -> torch.Tensor:
        """The captured activations as ``(batch, num_layers, hidden)``."""
        missing = [i for i, t in enumerate(self._captured) if t is None]
        if missing:
            raise RuntimeError(f"no activation was captured for layers {missing}")
        acts = torch.stack(self._captured, dim=1)
        self._captured = [None] * self.arch.num_layers
        return acts

    # -- injection -----------------------------------------------------------------------------
    def _inject_hook(self, module: nn.Module, args, output):
        if self._inject is None:
            return None
        positions, vectors, fuse, weights = self._inject
        hidden = _first(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        positions = positions.to(hidden.device)
        at_p = hidden[rows, positions]
        new = at_p + vectors.to(hidden.dtype) if fuse is None else fuse(at_p, vectors, weights)
        fused = hidden.index_put((rows, positions), new)
        if isinstance(output, tuple):
            return (fused,) + tuple(output[1:])
        return fused

    @contextmanager
    def injecting(self, positions: torch.Tensor, vectors: torch.Tensor, fuse=None, weights=None):
        """Within the block, the output of layer ``inject_layer`` gets ``vectors[b]`` added at
        ``positions[b]``, or ``fuse(h[b, positions[b]], vectors, weights)`` in place of that sum
        (a :class:`~cctuning.model.fusion.Fusion`)."""
        self._inject = (positions, vectors, fuse, weights)
        try:
            yield self
        finally:
            self._inject = None
