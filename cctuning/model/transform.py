"""The Transform Matrix, apply side: the type, applying it, its files and its stamp (docs/method.md §2.4).

At inference there is no English prompt; the model's own non-English activations ``f_l[p]`` are
mapped to English-like ones, ``â_l = b_l M`` (row-vector convention; ``M`` is ``d × d`` pooled over
layers, or ``L × d × d`` per layer). Fitting lives in :mod:`cctuning.inference.matrix`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from cctuning.errors import CCError, first_line
from cctuning.io import save_safetensors, write_json

MATRIX_NAME = "transform_matrix.safetensors"
MATRIX_REPORT_NAME = "transform_matrix.json"
# key of a Transform Matrix's metadata: sha256 of the decision_maker.safetensors it was fitted with
DECISION_MAKER_STAMP = "decision_maker_sha256"


def apply_matrix(matrix: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``â_l = b_l M`` (or ``b_l M_l`` per layer); ``acts`` is (batch, L, d)."""
    if matrix.dim() == 2:
        return acts @ matrix
    return torch.einsum("bld,lde->ble", acts, matrix)


@dataclass
class TransformMatrix:
    matrix: torch.Tensor  # (d, d) or (L, d, d), float32
    meta: dict = field(default_factory=dict)

    @property
    def per_layer(self) -> bool:
        return self.matrix.dim() == 3

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts @ M`` computed in float32 (autocast off) and returned in ``acts``' dtype: a bf16 model
        gets the float32 product rounded once, not the product of a matrix rounded to bf16."""
        m = self.matrix.to(device=acts.device, dtype=torch.float32)
        device = acts.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            return apply_matrix(m, acts.float()).to(acts.dtype)

    def check_fits(self, num_layers: int, hidden_size: int, where: str = MATRIX_NAME) -> None:
        shape = tuple(self.matrix.shape)
        expected = (num_layers, hidden_size, hidden_size) if self.per_layer else (hidden_size, hidden_size)
        if shape != expected:
            raise CCError(
                f"{where}: transform matrix of shape {shape} does not fit this model "
                f"({num_layers} layers, hidden size {hidden_size}); refit it with `cctuning fit-matrix`"
            )

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not torch.isfinite(self.matrix).all():
            raise CCError("refusing to save a transform matrix with NaN or infinite values")
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        save_safetensors(folder / MATRIX_NAME, {"matrix": self.matrix.float()}, metadata=meta)
        write_json(folder / MATRIX_REPORT_NAME, self.meta)

    @classmethod
    def load(cls, folder: str | Path) -> TransformMatrix | None:
        file = Path(folder) / MATRIX_NAME
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as fh:
                raw = fh.metadata() or {}
                matrix = fh.get_tensor("matrix")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise CCError(f"{file}: not a readable transform matrix ({first_line(err)}); refit it") from None
        if not torch.isfinite(matrix).all():
            raise CCError(f"{file}: the transform matrix holds NaN or infinite values; refit it")
        meta = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        return cls(matrix=matrix, meta=meta)
