"""Inference: the Transform Matrix (activations → matrix) and fast batched generation."""

from cctuning.inference.generate import CCGenerator, Generation, stop_token_ids
from cctuning.inference.matrix import NormalEquations, TransformMatrix, fit_transform_matrix

__all__ = [
    "CCGenerator",
    "Generation",
    "NormalEquations",
    "TransformMatrix",
    "fit_transform_matrix",
    "stop_token_ids",
]
