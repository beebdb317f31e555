"""Every ``transformers.TrainingArguments`` field as an option of ``cctuning train``.

The flags are generated from the TrainingArguments dataclass of the installed transformers (its
fields' types, defaults and help), not written by hand, so a new field is a new flag. How they meet
:class:`~cctuning.training.args.TrainConfig`:

* **Our options win a name.** A field named like one of our options (``--max-steps``, ``--seed``,
  ``--weight-decay``, ``--report-to``, ...) has one flag, ours, and our option sets the field.
* **Twins map to our option.** A field that one of our options sets under another name (:data:`TWINS`:
  ``learning_rate`` is ``--lr``, ``output_dir`` is ``--output``, ...) can be given either way; both
  in one place with different values is a one-line error.
* **Fixed fields are refused** (:data:`FIXED`) unless given the value we set: the run depends on it.
* **Only what the user gave reaches the Trainer**: every other field keeps our default (set in
  ``build_training_arguments``) or the Trainer's.
* **The flags are read from a cache**, so that ``cctuning train --help`` does not import
  transformers (seconds): :func:`trainer_flag_specs` reads the specs shipped for the transformers
  version the project pins (:data:`SPEC_FILE`), else the ones generated once for the installed
  version under ``~/.cache/cctuning`` (``$CCTUNING_CACHE``), else generates them (and caches them).
  tests/test_trainer_options.py checks the shipped specs against the installed dataclass.

Sources, later winning: the defaults, the YAML file (a field at the top level or under ``trainer:``),
the flags. ``--warmup-steps`` (a Trainer field: a step count, or a fraction below 1) and our
``--warmup-ratio`` both set the warmup: the later source wins, both in one source is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from importlib import metadata
from pathlib import Path

from cctuning.config import (
    add_argument_specs,
    argument_specs,
    coerce,
    flag_values,
    make_config,
    merge_values,
    read_yaml,
)
from cctuning.errors import CCError
from cctuning.io import write_json
from cctuning.training.args import TrainConfig

# destination prefix of the generated flags in the parsed namespace (``trainer.adam_beta2``)
FLAG_PREFIX = "trainer."

# TrainingArguments fields that one of our options sets under another name: field → option
TWINS = {
    "output_dir": "output",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "activation_checkpointing": "gradient_checkpointing",
    "resume_from_checkpoint": "resume",
}

# the generated flags shipped with the package, for the transformers version the project pins
SPEC_FILE = Path(__file__).resolve().parent.parent / "resources" / "trainer_flags.json"
# bump when the specs' layout (cctuning.config.argument_specs) changes: cached ones are regenerated
SPEC_SCHEMA = 1

# fields whose value the run depends on: field → (the value we set, why)
FIXED = {
    "remove_unused_columns": (
        False,
        "the Trainer would drop the English prompt's columns that the connection needs",
    ),
}

# fields that ``build_training_arguments`` sets to a value of ours unless the user gives one: field → the
# value, as the help shows it (tests/test_trainer_options.py checks this list against the arguments)
OUR_DEFAULTS = {
    "warmup_steps": "from --warmup-ratio",
    "save_strategy": "steps with --save-steps > 0, else epoch",
    "data_seed": "--seed",
    "dataloader_pin_memory": "on with CUDA",
    "dataloader_num_workers": "0",
    "save_only_model": "off",
    "ddp_find_unused_parameters": "off: every weight gets a gradient each step",
    "use_cpu": "on when there is no accelerator",
}


@dataclasses.dataclass(frozen=True)
class TrainerField:
    name: str
    type: typing.Any
    field: dataclasses.Field


@functools.cache
def trainer_fields() -> dict[str, TrainerField]:
    """The init fields of the installed ``TrainingArguments`` with their resolved types."""
    from transformers import TrainingArguments  # deferred: seconds; train --help reads the cached specs

    try:
        hints = typing.get_type_hints(TrainingArguments)
    except Exception:  # an annotation this Python cannot resolve: the plain types, the rest as Any
        hints = {
            f.name: f.type if isinstance(f.type, type) else typing.Any
            for f in dataclasses.fields(TrainingArguments)
        }
    return {
        f.name: TrainerField(f.name, hints.get(f.name, typing.Any), f)
        for f in dataclasses.fields(TrainingArguments)
        if f.init
    }


def tf_type(name: str):
    """The type of the TrainingArguments field ``name``."""
    return trainer_fields()[name].type


def twins(names=None) -> dict[str, str]:
    """Every TrainingArguments field that one of our options sets: field → option (same-named fields
    such as ``seed`` and ``max_steps`` included). ``names``: the fields (default: the installed ones)."""
    names = set(trainer_fields() if names is None else names)
    ours = {f.name for f in dataclasses.fields(TrainConfig)}
    same = {name: name for name in names if name in ours and name != "trainer"}
    return {**same, **{k: v for k, v in TWINS.items() if k in names}}


def generate_trainer_specs() -> list[dict]:
    """The flag specs of every TrainingArguments field, from the installed transformers (seconds)."""
    from transformers import TrainingArguments  # deferred: seconds; the cached specs spare them

    hints = {name: tf.type for name, tf in trainer_fields().items()}
    return argument_specs(
        TrainingArguments, dict_as_json=True, show_default=True, check_choices=False, hints=hints
    )


def spec_document(specs: list[dict], version: str) -> dict:
    return {"schema": SPEC_SCHEMA, "transformers": version, "fields": specs}


def cache_file(version: str) -> Path:
    """Where the specs generated for transformers ``version`` are cached: under ``$CCTUNING_CACHE``,
    else ``~/.cache/cctuning`` (as :func:`cctuning.presets.registry.cache_root`)."""
    root = Path(os.environ.get("CCTUNING_CACHE") or Path.home() / ".cache" / "cctuning").expanduser()
    return root / f"trainer-flags-{version}.json"


def _read_specs(path: Path, version: str) -> list[dict] | None:
    """The specs of ``path`` when it holds those of transformers ``version`` in our layout, else None."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or (doc.get("schema"), doc.get("transformers")) != (SPEC_SCHEMA, version):
        return None
    return doc.get("fields")


def trainer_flag_specs() -> list[dict]:
    """The flag specs of the installed transformers' TrainingArguments: shipped, cached or generated
    (then cached; a cache that cannot be written is skipped)."""
    version = metadata.version("transformers")
    for path in (SPEC_FILE, cache_file(version)):
        specs = _read_specs(path, version)
        if specs is not None:
            return specs
    specs = generate_trainer_specs()
    try:
        write_json(cache_file(version), spec_document(specs, version))
    except OSError:
        pass  # a read-only home: generated again next time
    return specs


def write_spec_file(path: str | Path = SPEC_FILE) -> Path:
    """Write the specs of the installed transformers into ``path`` (the shipped file by default: run
    this after changing the pinned transformers version or :data:`SPEC_SCHEMA`)."""
    write_json(path, spec_document(generate_trainer_specs(), metadata.version("transformers")))
    return Path(path)


def add_trainer_arguments(parser, promoted: dict[str, object] | None = None) -> list[str]:
    """One flag per TrainingArguments field that the parser does not already have (our options keep
    their flags), in a group of its own; a field of ``promoted`` (field → argument group) goes into
    that group instead. Returns the fields that got one."""
    group = parser.add_argument_group(
        "transformers.TrainingArguments",
        "Every other Trainer field, generated from the installed transformers; only those you give "
        "reach the Trainer. Fields that an option above sets under another name set that option "
        "(--learning-rate is --lr, --output-dir is --output, ...). Also in YAML, at the top level or "
        "under 'trainer:'.",
    )
    specs = trainer_flag_specs()
    promoted = promoted or {}
    added = []
    for name, target in promoted.items():
        added += add_argument_specs(target, [s for s in specs if s["name"] == name], dest_prefix=FLAG_PREFIX)
    rest = [s for s in specs if s["name"] not in promoted]
    added += add_argument_specs(group, rest, dest_prefix=FLAG_PREFIX)
    _explain(parser, {s["name"]: s for s in specs})
    return added


def _explain(parser, specs: dict[str, dict]) -> None:
    """The help of a generated flag that an option of ours sets, that we fix, or whose default is ours."""
    twin = twins(specs)
    for action in parser._actions:
        if not action.dest.startswith(FLAG_PREFIX):
            continue
        name = action.dest[len(FLAG_PREFIX) :]
        if _flag(name) not in action.option_strings:  # --no-checkpoints sets save_strategy too
            continue
        if name in twin:
            action.help = f"the Trainer's name of {_flag(twin[name])}: sets it"
        elif name in FIXED:
            value, why = FIXED[name]
            action.help = f"set by cctuning to {value}: {why}"
        elif name in OUR_DEFAULTS and name in specs:
            action.help = f"{specs[name]['doc']} (cctuning's default: {OUR_DEFAULTS[name]})"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fold(values: dict, extra: dict, where: str | None) -> dict:
    """One source's options (``values``: our options; ``extra``: TrainingArguments fields) checked and
    folded: a twin sets its option, a fixed field is refused, the rest are converted to their field's
    type. ``where`` is the YAML file, or None for the command line. Returns the options with the
    remaining fields under ``trainer``."""
    fields = trainer_fields()
    twin = twins()
    hints = typing.get_type_hints(TrainConfig)

    prefix = f"{where}: " if where else ""

    def label(name: str) -> str:
        return _flag(name) if where is None else f"option '{name}'"

    values = dict(values)
    kept: dict = {}
    for key, value in extra.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise CCError(f"{prefix}{label(str(key))}: not a transformers.TrainingArguments field")
        if name in FIXED:
            value, why = FIXED[name]
            if coerce(extra[key], tf_type(name), prefix + label(name)) == value:
                continue  # our own value: nothing to do
            raise CCError(f"{prefix}{label(name)}: cctuning sets it to {value} ({why})")
        if name in twin:
            own = twin[name]
            converted = coerce(value, hints[own], prefix + label(name))
            if own in values and values[own] != converted:
                raise CCError(
                    f"{prefix}{label(own)} {values[own]!r} and {label(name)} {converted!r} disagree: give one "
                    f"({_flag(name)} is {_flag(own)})"
                )
            values[own] = converted
            continue
        tf = fields[name]
        converted = coerce(value, tf.type, prefix + label(name))
        choices = tf.field.metadata.get("choices")
        if choices is not None and converted is not None and converted not in list(choices):
            raise CCError(
                f"{prefix}{label(name)}: expected one of {', '.join(map(str, choices))}, got {converted!r}"
            )
        kept[name] = converted
    if "warmup_steps" in kept and "warmup_ratio" in values:
        raise CCError(
            f"{prefix}{label('warmup_ratio')} and {label('warmup_steps')} both set the warmup: give one"
        )
    values["trainer"] = kept
    return values


def _yaml_aliases() -> dict[str, str]:
    """YAML keys named after a field's alias flag (``format`` for ``--format``) → the field's name."""
    return {
        alias.lstrip("-").replace("-", "_"): f.name
        for f in dataclasses.fields(TrainConfig)
        for alias in f.metadata.get("aliases", ())
    }


def _yaml_layer(path: str | Path) -> dict:
    """A YAML file's options: ours, TrainingArguments fields at the top level and under ``trainer:``.
    A key may also be the name of an option's alias flag (``format:`` for ``data_format``)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = trainer_fields()
    aliases = _yaml_aliases()
    values: dict = {}
    extra: dict = {}
    top: dict = {}
    for key, value in read_yaml(path).items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name) if name not in hints else name
        if name == "trainer":
            extra = dict(coerce(value, dict, f"{path}: option 'trainer'") or {})
        elif name in hints:
            values[name] = coerce(value, hints[name], f"{path}: option '{key}'")
        elif name in fields:
            top[name] = value
        else:
            raise CCError(f"{path}: unknown option '{key}'")
    for name, value in top.items():
        other = next((k for k in extra if str(k).replace("-", "_") == name), None)
        if other is not None and extra[other] != value:
            raise CCError(
                f"{path}: '{name}' is given at the top level and under 'trainer:' with other values"
            )
        extra[other if other is not None else name] = value
    return _fold(values, extra, str(path))


def _merge(layers: list[dict]) -> dict:
    """Layers merged, later ones winning; of --warmup-ratio and --warmup-steps the later source wins."""
    values: dict = {}
    for layer in layers:
        if "warmup_ratio" in layer:
            values.get("trainer", {}).pop("warmup_steps", None)
        if "warmup_steps" in layer.get("trainer", {}):
            values.pop("warmup_ratio", None)
        values = merge_values(values, layer)
    return values


def trainer_flags(flags: dict) -> dict:
    """The generated TrainingArguments flags of a parsed command line: ``{field: value}``."""
    return {k[len(FLAG_PREFIX) :]: v for k, v in flags.items() if k.startswith(FLAG_PREFIX)}


def build_train_config(yaml_path: str | None, flags: dict) -> TrainConfig:
    """The TrainConfig of ``cctuning train``: defaults < the YAML file < flags (see the module's
    docstring); ``flags`` are the parsed options, the generated ones under :data:`FLAG_PREFIX`."""
    layers = [_yaml_layer(yaml_path)] if yaml_path else []
    own = flag_values(TrainConfig, {k: v for k, v in flags.items() if not k.startswith(FLAG_PREFIX)})
    layers.append(_fold(own, trainer_flags(flags), None))
    return make_config(TrainConfig, _merge(layers))


def resolve_trainer_options(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its ``trainer`` mapping checked and its twins moved to our options (for configs
    built in Python: an option counts as given when it differs from its default). Idempotent."""
    if not cfg.trainer:
        return cfg
    given = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if f.name != "trainer" and value != default:
            given[f.name] = value
    folded = _fold(given, cfg.trainer, "TrainConfig.trainer")
    return dataclasses.replace(cfg, **folded)
