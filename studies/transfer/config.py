"""The study's options (:class:`TransferConfig`, its flags) and its evaluation cells."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields

from cctuning.config import add_dataclass_arguments, build_config, coerce
from cctuning.errors import CCError
from cctuning.training import TrainConfig
from cctuning.training.args import opt
from studies.transfer.world import CONTEXT_RELATIONS, RELATIONS, WORLDS


@dataclass(frozen=True)
class Training:
    """One stage-2 training: ``cctuning train --method method --augment augment``."""

    method: str
    augment: str = "none"
    same_steps_as: str | None = None  # a training whose optimizer steps it gets (``max_steps``)


# every stage-2 training, in the order they run (a training is run after the one it takes its steps from)
TRAININGS = {
    "sft": Training("sft"),
    "cc": Training("cc"),
    "english_prompt": Training("sft", "english-prompt", same_steps_as="sft"),
    "bilingual_prompt": Training("sft", "bilingual-prompt"),
}


@dataclass(frozen=True)
class Cell:
    """One evaluation cell: a stage-2 training evaluated under one connection."""

    name: str  # its key in summary.json (``{name}_accuracy``) and in predictions.jsonl
    method: str  # the stage-2 training it evaluates (a key of TRAININGS)
    connection: str  # the connection at evaluation
    label: str  # its row in summary.md
    withhold_english: bool = False  # a bilingual-prompt model prompted with the foreign question alone


CELLS = (
    Cell("sft", "sft", "none", "SFT"),
    Cell("cc_oracle", "cc", "english", "CC, English oracle"),
    Cell("cc_transform", "cc", "transform", "CC, Transform Matrix"),
    Cell("cc_none", "cc", "none", "CC, no connection"),
    Cell("english_prompt", "english_prompt", "none", "SFT + English prompts (data level)"),
    Cell("bilingual_prompt", "bilingual_prompt", "none", "SFT, bilingual prompts, English given"),
    Cell(
        "bilingual_prompt_withheld",
        "bilingual_prompt",
        "none",
        "SFT, bilingual prompts, English withheld",
        withhold_english=True,
    ),
)
BASELINE = "sft"  # the cell every other cell's paired margin is taken over


def trained_methods() -> list[str]:
    """The stage-2 trainings the cells need (keys of TRAININGS), in the order they run."""
    needed = {cell.method for cell in CELLS}
    return [name for name in TRAININGS if name in needed]


@dataclass
class TransferConfig:
    output: str | None = opt(None, "output folder (summary.json, summary.md, one folder per seed)")
    seeds: int = opt(3, "number of seeds (0..N-1) when --seed is not given")
    seed_list: list = field(default_factory=list, metadata={"cli": False})  # --seed S [S ...]
    # the world
    world: str = opt(
        "default",
        "the world: default (only English knows the held-out entities) or understood "
        "(the foreign side knows every entity through context relations)",
        choices=WORLDS,
    )
    context_relations: int = opt(
        6,
        "context relations of the understood world (taught in both languages and code-switched, not evaluated)",
    )
    stage2_context: bool = opt(
        True, "understood world: also rehearse the context relations (foreign) in stage 2"
    )
    entities: int = opt(48, "number of entities")
    relations: int = opt(3, f"number of relations (at most {len(RELATIONS)})")
    values: int = opt(6, "answer words per relation (chance accuracy is 1/values)")
    heldout_fraction: float = opt(0.5, "fraction of entities held out of stage 2 (evaluated)")
    dictionary_fraction: float = opt(
        0.5, "fraction of entities in the bilingual dictionary (stratified over train/held-out)"
    )
    # the model
    hidden_size: int = opt(64, "hidden size of the tiny Llama")
    layers: int = opt(4, "number of decoder layers")
    heads: int = opt(4, "attention heads")
    # stage 1: English knowledge
    stage1_epochs: float = opt(60.0, "stage-1 epochs")
    stage1_lr: float = opt(3e-3, "stage-1 learning rate")
    # stage 2: joint fine-tuning (the same budget for sft and cc)
    stage2_epochs: float = opt(12.0, "stage-2 epochs")
    stage2_lr: float = opt(1e-3, "stage-2 learning rate")
    stage2_english: bool = opt(
        True, "also rehearse every fact in English in stage 2 (keeps the English pass's knowledge)"
    )
    batch_size: int = opt(16, "batch size of both stages")
    fusion: str | None = opt(
        None, "fusion of the connection (passed to training when set; the default is the model's: add)"
    )
    train_options: dict = field(default_factory=dict, metadata={"cli": False})  # --train-option K=V
    # evaluation
    matrix_ridge: float = opt(0.0, "ridge λ of the Transform Matrix fit")
    eval_batch_size: int = opt(64, "evaluation batch size (sequences)")
    bootstrap_reps: int = opt(1000, "bootstrap resamples of the paired margins")
    threads: int = opt(
        1, "torch threads during the run (0: leave torch's setting; 1 is fastest for this tiny model)"
    )

    def seed_values(self) -> list[int]:
        return [int(s) for s in self.seed_list] if self.seed_list else list(range(self.seeds))

    def check(self) -> None:
        if not self.output:
            raise CCError("--output is required")
        if not self.seed_list and self.seeds < 1:
            raise CCError(f"--seeds must be >= 1, got {self.seeds}")
        if len(set(self.seed_values())) != len(self.seed_values()):
            raise CCError(f"--seed: repeated seeds {self.seed_values()}")
        if not 1 <= self.relations <= len(RELATIONS):
            raise CCError(f"--relations must be 1..{len(RELATIONS)}, got {self.relations}")
        if self.world not in WORLDS:
            raise CCError(f"--world: expected one of {', '.join(WORLDS)}, got {self.world!r}")
        if self.world == "understood" and not 1 <= self.context_relations <= len(CONTEXT_RELATIONS):
            raise CCError(
                f"--context-relations must be 1..{len(CONTEXT_RELATIONS)}, got {self.context_relations}"
            )
        if not 2 <= self.values <= min(len(v) for v in RELATIONS.values()):
            raise CCError(f"--values must be 2..{min(len(v) for v in RELATIONS.values())}, got {self.values}")
        if self.entities < 4:
            raise CCError(f"--entities must be >= 4, got {self.entities}")
        if not 0 < self.heldout_fraction < 1:
            raise CCError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.dictionary_fraction <= 1:
            raise CCError(f"--dictionary-fraction must be in [0, 1], got {self.dictionary_fraction}")
        if self.hidden_size % self.heads:
            raise CCError(f"--hidden-size {self.hidden_size} is not a multiple of --heads {self.heads}")
        for name in ("layers", "batch_size", "eval_batch_size", "bootstrap_reps"):
            if getattr(self, name) < 1:
                raise CCError(f"--{name.replace('_', '-')} must be >= 1")
        check_train_options(self.train_options, self.fusion)


_RESERVED = {"model", "data", "output", "method", "seed", "epochs", "max_steps", "lr", "batch_size"}


def check_train_options(options: dict, fusion: str | None) -> dict:
    """Coerce ``--train-option`` values to TrainConfig's types; options the runner sets itself
    (data, budget, method, seed) are refused so that both methods keep the same budget."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise CCError(f"--train-option {key}: not a `cctuning train` option")
        if name in _RESERVED:
            raise CCError(f"--train-option {key}: set by the transfer task itself (use its own flags)")
        out[name] = coerce(value, hints[name], f"--train-option {key}")
    if fusion is not None:
        if "fusion" not in hints:
            raise CCError("--fusion: this version of `cctuning train` has no fusion option")
        out["fusion"] = coerce(fusion, hints["fusion"], "--fusion")
    meta = {f.name: f.metadata for f in fields(TrainConfig)}
    for name, value in out.items():
        choices = meta[name].get("choices")
        if choices and value not in choices:
            flag = "--fusion" if name == "fusion" else f"--train-option {name}"
            raise CCError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return out


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """The study's flags: one per TransferConfig field, ``--seed S [S ...]`` and repeatable
    ``--train-option KEY=VALUE`` (any ``cctuning train`` option for stage 2)."""
    add_dataclass_arguments(parser, TransferConfig)
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        dest="seed_list",
        metavar="S",
        help="explicit seeds (overrides --seeds)",
    )
    parser.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `cctuning train` option for both stage-2 trainings, e.g. layer_choice=fixed:-1 (repeatable)",
    )


def config_from_args(args) -> TransferConfig:
    """The checked config of parsed flags (a bad value is a one-line CCError naming the flag)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("verbose", "train_option")}
    if not flags.get("seed_list"):
        flags.pop("seed_list", None)
    options = {}
    for item in args.train_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CCError(f"--train-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    flags["train_options"] = options
    cfg = build_config(TransferConfig, None, flags)
    cfg.check()
    return cfg
