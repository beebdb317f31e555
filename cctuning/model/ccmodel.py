"""CCModel: a Hugging Face causal LM plus the cross-lingual connection.

One ``nn.Module`` that holds the unmodified HF model (``.base``), the Decision Maker and the
hooks. Its folder is a normal HF model folder (loadable by ``AutoModelForCausalLM`` for plain
use) plus our own small files, PEFT-style:

* ``cctuning_config.json``: the mechanism's settings, the prompt format and versions;
* ``decision_maker.safetensors``: the Decision Maker weight (``weight``: num_layers × hidden).

With LoRA the base weights are not saved: the folder holds PEFT's adapter files instead and
``cctuning_config.json`` names the base model portably (absolute, relative, preset name and a
weights fingerprint: :mod:`cctuning.model.baseref`). Loading never runs code from the folder (no
``trust_remote_code`` unless asked) and reads our own weights from safetensors only.
"""

from __future__ import annotations

import json
import logging
import pickle
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from cctuning.errors import CCError, first_line
from cctuning.io import (
    INCOMPLETE_MARKER,
    is_incomplete,
    save_safetensors,
    sha256_file,
    staged_dir,
    write_json,
)
from cctuning.model import connection
from cctuning.model.arch import Architecture, locate
from cctuning.model.baseref import find_base, record_base
from cctuning.model.decision import DecisionMaker
from cctuning.model.fusion import Fusion
from cctuning.model.health import check_finite_weights
from cctuning.model.hooks import ConnectionHooks
from cctuning.model.lora import ADAPTER_CONFIG_NAME, is_peft, load_adapter
from cctuning.model.settings import CONFIG_NAME, CCConfig, parse_layer_choice
from cctuning.model.transform import DECISION_MAKER_STAMP, TransformMatrix
from cctuning.versions import versions

logger = logging.getLogger(__name__)

DECISION_MAKER_NAME = "decision_maker.safetensors"


def _non_reentrant(layer: nn.Module) -> bool:
    """Whether a transformers layer's checkpoint function is the non-reentrant one (explicitly)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("use_reentrant") is False


def _load_failure(path: str | Path, err: Exception) -> str:
    """What went wrong when transformers could not load ``path``, in one line."""
    if isinstance(err, pickle.UnpicklingError):
        return (
            "its pickle weights (pytorch_model.bin) hold objects other than tensors and were refused "
            "unread (torch.load weights_only); convert them to safetensors"
        )
    if type(err).__name__ == "SafetensorError":
        return f"a damaged or truncated .safetensors file ({first_line(err)})"
    try:
        auto_map = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        auto_map = None
    if auto_map:
        return (
            "the folder ships its own model code (auto_map in config.json), which cctuning runs only "
            f"with --trust-remote-code (trust_remote_code=True): {first_line(err)}"
        )
    if not isinstance(err, (OSError, ValueError, KeyError, RuntimeError, TypeError)):
        raise err
    return first_line(err)


def _adapter_weight(name: str) -> bool:
    """Whether a parameter of a PEFT model was loaded from its adapter file (not from the base)."""
    return "lora_" in name or "modules_to_save" in name


def check_has_model(path: Path) -> None:
    """A folder without ``config.json`` (nor a LoRA adapter) holds no model: a run whose training did
    not finish (only its checkpoints, or only our files), or no model folder at all. One line saying
    so, not transformers' "Unrecognized model"."""
    if (path / "config.json").is_file() or (path / ADAPTER_CONFIG_NAME).is_file():
        return
    checkpoints = [p for p in path.glob("checkpoint-*") if p.is_dir()]
    if checkpoints or (path / CONFIG_NAME).is_file():
        hint = (
            f"resume it from its last checkpoint (cctuning train ... --output {path} --resume last)"
            if checkpoints
            else "train it again"
        )
        raise CCError(f"{path}: an incomplete run, without its model weights (no config.json); {hint}")
    raise CCError(f"{path}: not a model folder (no config.json)")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding, so left- and right-padded rows compute the same thing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CCModel(nn.Module):
    """A causal LM with CC-Tuning's connection. Use :meth:`from_base` to start training and
    :meth:`from_pretrained` to load a trained folder."""

    accepts_loss_kwargs = True  # Trainer then passes num_items_in_batch for exact grad accumulation
    main_input_name = "input_ids"

    def __init__(self, base: nn.Module, cc_config: CCConfig):
        super().__init__()
        self.base = base
        self.config = base.config
        self.cc_config = cc_config
        self.arch: Architecture = locate(base, cc_config.layers_path, cc_config.ffn_module)
        self._no_split_modules = getattr(base, "_no_split_modules", None)  # FSDP auto-wrap reads it
        for name, found in (("num_layers", self.arch.num_layers), ("hidden_size", self.arch.hidden_size)):
            recorded = getattr(cc_config, name)
            if recorded is not None and recorded != found:
                raise CCError(
                    f"{CONFIG_NAME}: {name} {recorded} does not match the model, which has {found}; "
                    "the folder mixes files of two models"
                )
        cc_config.num_layers, cc_config.hidden_size = self.arch.num_layers, self.arch.hidden_size
        cc_config.ffn_module = self.arch.ffn_name
        if not 0 <= cc_config.inject_layer < self.arch.num_layers:
            raise CCError(f"inject_layer={cc_config.inject_layer} is outside 0..{self.arch.num_layers - 1}")
        self.decision_maker = None
        self.fusion = None
        if cc_config.method == "cc":
            emb = self.arch.embeddings.weight
            self.decision_maker = DecisionMaker(
                self.arch.hidden_size, self.arch.num_layers, input_norm=cc_config.dm_input
            ).to(device=emb.device, dtype=emb.dtype)
            # the gates stay float32 whatever the model's dtype: a bf16 gate near 0 would round away
            self.fusion = Fusion(cc_config.fusion, self.arch.num_layers).to(device=emb.device)
        self.tau = cc_config.tau  # the Gumbel temperature now (a schedule moves it during training)
        self.layer_rule = parse_layer_choice(cc_config.layer_choice)
        if (
            self.layer_rule[0] == "fixed"
            and not -self.arch.num_layers <= self.layer_rule[1] < self.arch.num_layers
        ):
            raise CCError(
                f"layer choice {cc_config.layer_choice}: this model has {self.arch.num_layers} layers"
            )
        if self.decision_maker is not None and self.layer_rule[0] != "learned":
            self.decision_maker.requires_grad_(False)  # an ablation replaces it: no gradient, no DDP stall
        self.hooks = ConnectionHooks(self.arch, cc_config.inject_layer)
        self.generator: torch.Generator | None = None
        self._last_layer_choice: torch.Tensor | None = None  # for the deprecated last_layer_choice only
        self.transform = None  # a TransformMatrix, set by fit-matrix or loaded with the folder
        self.decision_maker_sha256: str | None = None  # of the file the Decision Maker was loaded from

    @property
    def last_layer_choice(self) -> torch.Tensor | None:
        """Deprecated, removed in the next release: the layers chosen by the last connected forward.
        Read ``layer_choice`` from the forward's output instead."""
        return connection.deprecated_last_layer_choice(self)

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def _load_base(path: str | Path, dtype=None, trust_remote_code: bool = False, **kwargs) -> nn.Module:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - every loader failure becomes one line, never a traceback
            raise CCError(f"cannot load a causal LM from '{path}': {_load_failure(path, err)}") from None
        check_finite_weights(model, path)  # every load of weights passes here: train, inference, LoRA bases
        return model

    @classmethod
    def from_base(
        cls, model: nn.Module | str | Path, cc_config: CCConfig | None = None, **load_kwargs
    ) -> CCModel:
        """Wrap a base model (or load one from a folder) for CC-Tuning; the Decision Maker is new."""
        cc_config = cc_config or CCConfig()
        if not isinstance(model, nn.Module):
            cc_config.base_model = cc_config.base_model or str(model)
            model = cls._load_base(model, **load_kwargs)
        return cls(model, cc_config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype=None,
        trust_remote_code: bool = False,
        base_model: str | None = None,
        load_transform: bool = True,
        **kwargs,
    ) -> CCModel:
        """Load a folder written by :meth:`save_pretrained` (or any plain HF folder, as method ``none``).

        A LoRA folder loads its base model from ``base_model`` (a folder) or else the one recorded at
        training time (:func:`~cctuning.model.baseref.find_base`: the absolute folder, the relative one,
        checked against the weights fingerprint); preset names are resolved by
        :func:`cctuning.loading.load_for_inference`, which hands the folder in. A folder whose last save
        was interrupted is refused.
        """
        path = Path(path)
        if not path.is_dir():
            raise CCError(f"model folder '{path}' does not exist")
        if is_incomplete(path):
            raise CCError(
                f"{path}: an interrupted save left this folder incomplete ({INCOMPLETE_MARKER} is present); "
                "save it again or resume from a checkpoint"
            )
        check_has_model(path)
        config_file = path / CONFIG_NAME
        ours = config_file.is_file()
        cc_config = CCConfig.load(config_file) if ours else CCConfig(method="none")
        if (path / ADAPTER_CONFIG_NAME).is_file():
            base_path = find_base(path, cc_config, given=base_model)
            base = cls._load_base(base_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
            base = load_adapter(base, path)
            check_finite_weights(base, path, only=_adapter_weight)
        else:
            if ours:
                kwargs.setdefault("use_safetensors", True)  # our folders hold safetensors only, never pickles
            base = cls._load_base(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        model = cls(base, cc_config)
        if cc_config.method == "cc":
            model.load_decision_maker(path / DECISION_MAKER_NAME)
            if load_transform:  # fit-matrix loads without it: it replaces a stale one
                model.set_transform(TransformMatrix.load(path))
        model.eval()
        return model

    def set_transform(self, transform) -> None:
        """Attach a :class:`TransformMatrix`, checked against this model's layers and hidden size and,
        when both are known, against the Decision Maker file it was fitted with (another model's
        matrix of the same shape would otherwise load silently)."""
        if transform is not None:
            transform.check_fits(self.arch.num_layers, self.arch.hidden_size)
            stamp = transform.meta.get(DECISION_MAKER_STAMP)
            if stamp and self.decision_maker_sha256 and stamp != self.decision_maker_sha256:
                raise CCError(
                    "transform matrix was fitted on another model (its decision_maker.safetensors differs "
                    "from this one); refit it with `cctuning fit-matrix`"
                )
        self.transform = transform

    def load_decision_maker(self, file: str | Path) -> None:
        file = Path(file)
        if not file.is_file():
            raise CCError(f"{file}: missing (a CC-Tuning folder needs its Decision Maker weights)")
        try:
            tensors = load_file(str(file))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise CCError(f"{file}: not a readable safetensors file ({first_line(err)})") from None
        if "weight" not in tensors:
            raise CCError(f"{file}: no Decision Maker 'weight' tensor")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise CCError(f"{file}: the Decision Maker holds NaN or infinite values; retrain the model")
        weight = tensors["weight"]
        expected = tuple(self.decision_maker.proj.weight.shape)
        if tuple(weight.shape) != expected:
            raise CCError(
                f"{file}: Decision Maker of shape {tuple(weight.shape)} does not fit this model "
                f"({expected[0]} layers × hidden size {expected[1]})"
            )
        with torch.no_grad():
            self.decision_maker.proj.weight.copy_(weight)
            if self.fusion.gate is not None:
                gate = tensors.get("gate")
                if gate is None or gate.shape != self.fusion.gate.shape:
                    raise CCError(
                        f"{file}: no gate of shape {tuple(self.fusion.gate.shape)} for fusion "
                        f"'{self.cc_config.fusion}'"
                    )
                self.fusion.gate.copy_(gate)
        self.decision_maker_sha256 = sha256_file(file)

    def save_pretrained(
        self, path: str | Path, state_dict: dict | None = None, is_main_process: bool = True, tokenizer=None
    ):
        """Write the HF model folder and our files; each file lands atomically (staged, then renamed)."""
        if not is_main_process:
            return
        base_sd = None
        dm_weight = self.decision_maker.proj.weight if self.decision_maker is not None else None
        gate = self.fusion.gate if self.fusion is not None else None
        if state_dict is not None:
            base_sd = {k[len("base.") :]: v for k, v in state_dict.items() if k.startswith("base.")}
            dm_weight = state_dict.get("decision_maker.proj.weight", dm_weight)
            gate = state_dict.get("fusion.gate", gate)
        check_finite(base_sd if base_sd is not None else self.base.state_dict(), "model weights")
        for name, tensor in (("Decision Maker", dm_weight), ("fusion gate", gate)):
            if tensor is not None:
                check_finite({name: tensor}, name)
        with staged_dir(path) as stage:
            self.base.save_pretrained(stage, state_dict=base_sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(stage)
            if dm_weight is not None:
                tensors = {"weight": dm_weight} if gate is None else {"weight": dm_weight, "gate": gate}
                save_safetensors(stage / DECISION_MAKER_NAME, tensors)
                self.decision_maker_sha256 = sha256_file(stage / DECISION_MAKER_NAME)
            if self.transform is not None:
                if self.decision_maker_sha256:  # saved together: the matrix belongs to this Decision Maker
                    self.transform.meta[DECISION_MAKER_STAMP] = self.decision_maker_sha256
                self.transform.save(stage)
            record_base(self.cc_config, path, self.base_folder)
            data = asdict(self.cc_config)
            data["versions"] = versions()
            write_json(stage / CONFIG_NAME, data)

    # -- trainer plumbing ----------------------------------------------------------------------
    def activation_checkpointing_enable(self, **kwargs):
        self.base.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self):
        self.base.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.base, "is_activation_checkpointing", False))

    @property
    def uses_lora(self) -> bool:
        return is_peft(self.base)

    @property
    def base_folder(self) -> str | None:
        """The folder a LoRA model's base weights were loaded from (None without LoRA, or for a base
        built in memory)."""
        if not self.uses_lora:
            return None
        name = getattr(self.base.get_base_model().config, "name_or_path", None)
        return name if name and Path(name).is_dir() else None

    @contextmanager
    def _english_pass_checkpointing(self, grad: bool):
        """Switch layer checkpointing off for the English pass unless it keeps the gradient correctly.

        Without gradient there is nothing to checkpoint. With gradient, the reentrant checkpoint runs
        the layer under ``no_grad``, so the FFN outputs captured inside it would be cut from the graph
        (the official code's silent stop-gradient, docs/method.md §2.3); only the non-reentrant checkpoint
        keeps them (see hooks.py), so the English pass stays checkpointed only with that one.
        """
        layers = [layer for layer in self.arch.layers if getattr(layer, "gradient_checkpointing", False)]
        if not layers or (grad and all(_non_reentrant(layer) for layer in layers)):
            yield
            return
        for layer in layers:
            layer.gradient_checkpointing = False
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = True

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def floating_point_ops(self, inputs: dict, exclude_embeddings: bool = True) -> int:
        return (
            self.base.floating_point_ops(inputs, exclude_embeddings)
            if hasattr(self.base, "floating_point_ops")
            else 0
        )

    # -- the mechanism -------------------------------------------------------------------------
    @property
    def uses_connection(self) -> bool:
        return self.decision_maker is not None

    def collect_activations(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        grad: bool = False,
    ) -> torch.Tensor:
        """Run the decoder (no LM head) on a prompt batch; return ``f_l[p]`` as (batch, L, hidden)."""
        position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
        grad = grad and torch.is_grad_enabled()
        with (
            torch.set_grad_enabled(grad),
            self._english_pass_checkpointing(grad),
            self.hooks.capturing(positions),
        ):
            self.arch.decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return self.hooks.stacked()

    def choose(
        self, input_ids: torch.Tensor, positions: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decision Maker on (English or transformed) activations: ``(fused vector, one-hot weights)``."""
        if self.decision_maker is None:
            raise CCError(
                f"this model was trained with method '{self.cc_config.method}': it has no connection"
            )
        kind, index = self.layer_rule
        if kind == "learned":
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            embedding = self.arch.embeddings(input_ids[rows, positions].unsqueeze(1)).squeeze(1)
            sample = self.training or self.cc_config.sample_layer
            return self.decision_maker(activations, embedding, sample, self.tau, self.generator)
        batch, layers = activations.shape[:2]
        if kind == "mean":
            weights = torch.full((batch, layers), 1.0 / layers, device=activations.device)
        else:
            if kind == "fixed":
                chosen = torch.full((batch,), index % layers, dtype=torch.long)
            else:
                chosen = torch.randint(layers, (batch,), generator=self.generator)
            weights = torch.nn.functional.one_hot(chosen, layers).float().to(activations.device)
        fused = (weights.unsqueeze(-1).to(activations.dtype) * activations).sum(dim=1)
        return fused, weights

    def chosen_layers(self, weights: torch.Tensor) -> torch.Tensor | None:
        """The layer index per row, or None when no single layer is chosen (``mean``)."""
        return None if self.layer_rule[0] == "mean" else weights.detach().argmax(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cc_position: torch.Tensor | None = None,
        en_input_ids: torch.Tensor | None = None,
        en_attention_mask: torch.Tensor | None = None,
        en_cc_position: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """Training forward. With English inputs and method ``cc``: English prompt pass (captures
        ``f_l[p_en]``), Decision Maker, then the non-English pass with the fusion; the loss is the
        base model's plain response-only cross-entropy. Otherwise a plain forward."""
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        kwargs.setdefault("use_cache", False)  # a training forward never needs a KV cache
        mode = "english" if self.uses_connection and en_input_ids is not None else "none"
        if mode == "english" and (cc_position is None or en_cc_position is None):
            raise ValueError("CC-Tuning needs cc_position and en_cc_position with en_input_ids")
        return connection.connected_forward(
            self,
            mode,
            input_ids,
            attention_mask,
            cc_position,
            en_input_ids,
            en_attention_mask,
            en_cc_position,
            english_grad=self.cc_config.english_grad,
            labels=labels,
            position_ids=position_ids,
            **kwargs,
        )


def check_finite(tensors: dict, what: str) -> None:
    """Refuse to save NaN or infinite values (a diverged run must not pass for a result)."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CCError(
                f"refusing to save: the {what} hold NaN or infinite values ({name}); the run diverged"
            )
