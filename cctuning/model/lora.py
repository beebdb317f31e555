"""LoRA through PEFT: adapters on the LLM while the Decision Maker trains fully.

The PEFT model is what :class:`~cctuning.model.ccmodel.CCModel` wraps as ``.base``. PEFT injects
its LoRA layers into the Hugging Face modules in place, so the decoder layers and FFN blocks the
connection hooks into are the same module objects as without LoRA, and ``locate`` finds them
through ``PeftModel``'s attribute forwarding (``get_decoder``). A saved LoRA folder is PEFT's
own (``adapter_config.json`` + ``adapter_model.safetensors``) plus our files; the base model is
loaded from the path (or preset name) recorded in ``cctuning_config.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from cctuning.config import split_list
from cctuning.errors import CCError, first_line

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model; never imports peft (before it is imported, no model is one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _targets(target: str | None) -> str | list[str]:
    if not target or target.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = split_list(target)
    if not names:
        raise CCError(f"--lora-target '{target}' names no module")
    return names


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target: str | None = ALL_LINEAR,
) -> nn.Module:
    """Wrap ``model`` in a trainable PEFT LoRA model (every base weight frozen).

    ``alpha`` defaults to ``2 r``; ``target`` is ``all-linear`` (every linear layer but the LM head)
    or comma-separated module names such as ``q_proj,v_proj``.
    """
    from peft import LoraConfig, get_peft_model  # deferred: peft takes ~6 s to import (measured), LoRA only

    if r <= 0:
        raise CCError(f"--lora-r must be > 0, got {r}")
    if dropout < 0 or dropout >= 1:
        raise CCError(f"--lora-dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=_targets(target),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        first = first_line(err)
        raise CCError(f"--lora-target '{target}': {first}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(
        "LoRA r=%d alpha=%s on %s: %d trainable parameters",
        r,
        config.lora_alpha,
        config.target_modules,
        trainable,
    )
    return peft_model


def load_adapter(base: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """Put the adapter saved in ``folder`` on ``base``; only its safetensors file is ever read."""
    from peft import PeftModel  # deferred: peft takes ~6 s to import (measured), LoRA only

    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise CCError(f"{weights}: missing (a LoRA folder needs its adapter weights as safetensors)")
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = first_line(err)
        raise CCError(f"{folder}: cannot load the LoRA adapter: {first}") from None


def load_adapter_weights(peft_model: nn.Module, file: str | Path) -> None:
    """Load adapter weights saved by ``save_pretrained`` into ``peft_model`` (resume); every LoRA
    weight of the model must be in the file and nothing else."""
    from peft import set_peft_model_state_dict  # deferred: peft takes ~6 s to import (measured), LoRA only

    file = Path(file)
    if not file.is_file():
        raise CCError(f"{file}: missing (no adapter weights to resume from)")
    result = set_peft_model_state_dict(peft_model, load_file(str(file)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CCError(
            f"{file}: adapter does not match the model (missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]})"
        )
