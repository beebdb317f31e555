"""The settings of a CC-Tuning model: ``cctuning_config.json`` (:class:`CCConfig`) and the layer-choice rules."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cctuning.config import coerce
from cctuning.data.augment import check_augment
from cctuning.data.encoding import PromptFormat
from cctuning.errors import CCError

CONFIG_NAME = "cctuning_config.json"
METHODS = ("cc", "sft", "none")


@dataclass
class CCConfig:
    """Settings of the connection. ``method``: ``cc`` (CC-Tuning), ``sft`` (trained without the
    connection: the baseline) or ``none`` (a plain HF model loaded as is)."""

    method: str = "cc"
    inject_layer: int = 0
    tau: float = 1.0
    english_grad: bool = False
    sample_layer: bool = False
    layers_path: str | None = None
    ffn_module: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    base_model: str | None = None  # the base folder (absolute) or preset name; see model/baseref.py
    base_model_relative: str | None = None  # the base folder relative to this folder, when near
    base_model_id: str | None = None  # the preset name (or another name) of the base, when known
    base_model_fingerprint: str | None = None  # baseref.weights_fingerprint of a LoRA folder's base
    layer_choice: str = "learned"  # learned | random | mean | fixed:K (ablations of the Decision Maker)
    # beyond the paper, opt-in (docs/method.md §5); the defaults are the paper's behaviour
    fusion: str = "add"  # add | scaled | gated | gated-scalar (model/fusion.py)
    dm_input: str = "raw"  # raw | rms: the Decision Maker's input (model/decision.py)
    tau_end: float | None = None  # Gumbel temperature annealed from tau to tau_end over training
    # the records' data-level use of instruction_en in training (data/augment.py): how inference prompts
    augment: str = "none"  # none | english-prompt | bilingual-prompt

    def __post_init__(self):
        if self.method not in METHODS:
            raise CCError(f"unknown method '{self.method}' (use {', '.join(METHODS)})")
        parse_layer_choice(self.layer_choice)
        check_augment(self.augment)
        if self.tau <= 0:
            raise CCError(f"tau must be > 0, got {self.tau}")
        if self.tau_end is not None and self.tau_end <= 0:
            raise CCError(f"tau_end must be > 0, got {self.tau_end}")
        if isinstance(self.prompt_format, dict):
            self.prompt_format = PromptFormat.from_dict(self.prompt_format)

    @classmethod
    def load(cls, path: str | Path) -> CCConfig:
        """Read ``cctuning_config.json``; a damaged or hand-edited file is a one-line error."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CCError(f"{path}: not a valid JSON file ({err})") from None
        if not isinstance(data, dict):
            raise CCError(f"{path}: expected a JSON object")
        hints = typing.get_type_hints(cls)
        fields = cls.__dataclass_fields__
        known = {
            k: v if k == "prompt_format" else coerce(v, hints[k], f"{path}: '{k}'")
            for k, v in data.items()
            if k in fields
        }
        if not isinstance(known.get("prompt_format", {}), dict):
            raise CCError(f"{path}: 'prompt_format': expected an object, got {known['prompt_format']!r}")
        return cls(**known)


LAYER_CHOICES = ("learned", "random", "mean", "fixed:K")


def parse_layer_choice(rule: str) -> tuple[str, int | None]:
    """``learned`` (the paper's Decision Maker), ``random`` (a uniformly random layer per example and
    step), ``mean`` (the mean of all layers' activations) or ``fixed:K`` (always layer K; negative K
    counts from the last layer)."""
    if rule in ("learned", "random", "mean"):
        return rule, None
    if rule.startswith("fixed:"):
        try:
            return "fixed", int(rule.split(":", 1)[1])
        except ValueError:
            pass
    raise CCError(f"unknown layer choice '{rule}' (use {', '.join(LAYER_CHOICES)})")
