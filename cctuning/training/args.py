"""``cctuning train`` options. Defaults follow the paper's released configuration (docs/method.md §3.3)
where it applies: lr 1e-5, 3 epochs, cosine schedule, warmup 10%, batch 16, cutoff 1024, tau 1."""

from __future__ import annotations

from dataclasses import dataclass, field


def opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    model: str | None = opt(None, "base model: a Hugging Face folder or a preset name", metavar="MODEL")
    data: str | None = opt(
        None,
        "training records: .json, .jsonl, .parquet, .arrow, .csv or a datasets save_to_disk folder "
        "(docs/data.md)",
        metavar="DATA",
    )
    data_format: str = opt(
        "auto",
        "record format: official (instruction, output, instruction_en), messages (one user and one "
        "assistant turn), prompt-completion (prompt, completion, prompt_en) or auto (detected)",
        choices=["auto", "official", "messages", "prompt-completion"],
        aliases=("--format",),
    )
    columns: str | dict | None = opt(
        None,
        "read fields from columns of other names: instruction=question,output=answer,... "
        "(in YAML also a mapping)",
        metavar="FIELD=COLUMN,...",
    )
    split: str | None = opt(None, "the split of a DatasetDict folder (needed when it has several)")
    output: str | None = opt(
        None, "output folder (a Hugging Face model folder plus CC-Tuning files)", metavar="DIR"
    )
    method: str = opt(
        "cc", "cc: CC-Tuning; sft: plain multilingual SFT on the same pipeline", choices=["cc", "sft"]
    )
    augment: str = opt(
        "none",
        "data-level use of instruction_en (docs/data.md): english-prompt adds (English instruction -> the "
        "same response) for every non-English record; bilingual-prompt prompts with the English "
        "instruction, then the non-English one",
        choices=["none", "english-prompt", "bilingual-prompt"],
    )
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --epochs when > 0)")
    epochs: float = opt(3.0, "number of training epochs")
    batch_size: int = opt(16, "per-device batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-5, "learning rate (the LLM and the Decision Maker share it)")
    max_length: int = opt(1024, "maximum tokens of a training sequence (and of the English prompt)")
    seed: int = opt(42, "random seed (data order, Decision Maker init, Gumbel noise)")
    scheduler: str = opt("cosine", "learning-rate schedule (any transformers SchedulerType)")
    warmup_ratio: float = opt(
        0.1, "fraction of the training steps used for linear warmup, 0 to 1 (--warmup-steps N: a step count)"
    )
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    # the mechanism
    tau: float = opt(1.0, "Gumbel-softmax temperature of the Decision Maker")
    inject_layer: int = opt(0, "decoder layer after which the English activation is added (0: the first)")
    position_offset: int = opt(0, "connection position counted back from the last prompt token")
    english_grad: bool = opt(False, "let gradients flow into the English pass (default: stop-gradient)")
    layer_choice: str = opt(
        "learned",
        "ablations: learned (the Decision Maker), random, mean or fixed:K",
        metavar="learned|random|mean|fixed:K",
    )
    # beyond the paper, opt-in (docs/method.md §5): the defaults are the paper's behaviour
    fusion: str = opt(
        "add",
        "how the chosen vector joins the hidden state: add (the paper's), scaled (to the hidden state's "
        "RMS), gated (a learnable gate per layer, 0 at start) or gated-scalar (one gate)",
        choices=["add", "scaled", "gated", "gated-scalar"],
    )
    dm_input: str = opt(
        "raw",
        "Decision Maker input: raw (the paper's mean of activations + embedding) or rms (each "
        "RMS-normalised first)",
        choices=["raw", "rms"],
    )
    dm_lr_scale: float = opt(
        1.0, "learning rate of the Decision Maker and the fusion gates, as a multiple of --lr"
    )
    tau_end: float | None = opt(
        None, "anneal the Gumbel temperature exponentially from --tau to this value over training"
    )
    layers_path: str | None = opt(
        None, "dotted path of the decoder-layer ModuleList, if not found automatically"
    )
    ffn_module: str | None = opt(None, "attribute of a decoder layer whose output is the FFN activation")
    # LoRA (PEFT): adapters on the LLM, the Decision Maker still trains fully
    lora_r: int = opt(0, "LoRA rank; > 0 trains LoRA adapters instead of the whole LLM")
    lora_alpha: float | None = opt(None, "LoRA alpha (default: 2 × rank)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_target: str = opt(
        "all-linear", "modules that get adapters: all-linear or names such as q_proj,v_proj"
    )
    # prompts
    template: str = opt(
        "auto",
        "prompt rendering: chat (tokenizer template), plain (fallback) or auto",
        choices=["auto", "chat", "plain"],
    )
    system_prompt: str | None = opt(None, "system message added to every prompt (chat templates)")
    allow_special_tokens: bool = opt(
        False,
        "let special-token strings inside the records (e.g. <|im_start|>, </s>) become control tokens "
        "(default: encoded as plain text)",
    )
    padding_side: str = opt("right", "padding side of training batches", choices=["left", "right"])
    skip_invalid: bool = opt(False, "skip invalid records (counted and reported) instead of stopping")
    # engine
    dtype: str = opt(
        "float32", "dtype to load the model in", choices=["float32", "bfloat16", "float16", "auto"]
    )
    bf16: bool = opt(False, "bf16 mixed precision (passed to the Trainer)")
    fp16: bool = opt(False, "fp16 mixed precision (passed to the Trainer)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    logging_steps: int = opt(10, "log the loss every N steps")
    save_steps: int = opt(0, "save a checkpoint every N steps (0: once per epoch)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints")
    overwrite: bool = opt(
        False, "replace the run already in --output (its files and checkpoints are removed first)"
    )
    resume: str | None = opt(
        None, "resume from the last checkpoint in --output ('last') or from a folder", metavar="last|DIR"
    )
    trust_remote_code: bool = opt(False, "allow code from the model folder to run (only if you trust it)")
    report_to: str | list[str] = opt(
        "none",
        "Trainer integrations to log to, one or more: none, tensorboard (extra cctuning[tensorboard]), "
        "wandb (WANDB_MODE=offline without an account), all, ...",
        metavar="NAME",
    )
    trainer: dict = field(
        default_factory=dict,
        metadata={
            "help": "any other transformers.TrainingArguments fields (their flags: training/options.py)",
            "cli": False,
        },
    )


# the sections of `cctuning train --help`, in order, each option once (tests/test_cli.py): the common
# options first, then the mechanism's; the Trainer's own fields follow in a section of their own
OPTION_GROUPS = {
    "common options": (
        "method", "augment", "model", "data", "output", "epochs", "max_steps", "batch_size", "grad_accum",
        "max_length", "lr", "seed", "dtype", "bf16", "fp16", "gradient_checkpointing", "lora_r",
        "lora_alpha", "lora_dropout", "lora_target", "trust_remote_code", "report_to", "resume",
        "overwrite", "save_steps", "save_total_limit",
    ),
    "CC-Tuning (the connection and the Decision Maker)": (
        "tau", "tau_end", "inject_layer", "position_offset", "english_grad", "layer_choice", "fusion",
        "dm_input", "dm_lr_scale", "layers_path", "ffn_module",
    ),
    "data and prompts": (
        "data_format", "columns", "split", "skip_invalid", "template", "system_prompt", "padding_side",
        "allow_special_tokens",
    ),
    "schedule and logging": ("scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "logging_steps"),
}  # fmt: skip
