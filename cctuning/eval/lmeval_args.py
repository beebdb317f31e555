"""How :class:`cctuning.eval.lmeval.CCLM` reads the ``model_args`` that are not plain values: the
dtype, the device, the batch size and the number of sampled layers (one-line errors otherwise)."""

from __future__ import annotations

import logging

import torch

from cctuning.errors import CCError
from cctuning.loading import resolve_device

logger = logging.getLogger("cctuning.eval.lmeval")


def read_dtype(name):
    """A torch dtype, or None for ``auto`` or none given (as saved)."""
    if name in (None, "auto") or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise CCError(f"unknown dtype '{name}' (use float32, bfloat16, float16 or auto)")
    return value


def read_device(name) -> torch.device:
    """The device: none given is cctuning's ``auto`` (``$CCTUNING_DEVICE``, else CUDA when there is
    one, else the CPU); a CUDA device on a machine without one falls back to the CPU."""
    if name is None:
        return resolve_device("auto")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.info("device %s is not available here; using the CPU", name)
        return torch.device("cpu")
    return device


def read_batch_size(value, max_batch_size) -> int:
    """A positive batch size; lm-eval's ``auto`` / ``auto:N`` is ``max_batch_size`` (default 8)."""
    if isinstance(value, str) and value.startswith("auto"):
        size = int(max_batch_size or 8)
        logger.warning("batch_size=%s: cctuning does not detect a batch size; using %d", value, size)
        return size
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise CCError(f"batch_size must be a positive integer, got {value!r}") from None
    if size <= 0:
        raise CCError(f"batch_size must be a positive integer, got {value!r}")
    return size


def read_sample_layer(value) -> int:
    """The number of Gumbel-sampled layers per item (``true`` is 1; 0: the Decision Maker's argmax)."""
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise CCError(f"sample_layer takes the number of draws (≥ 0), got {value!r}")
    return value
