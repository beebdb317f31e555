"""The experiment's config: :class:`ExperimentConfig`, read and checked by :func:`load_config`; its
cells resolved to training options and a connection (:func:`resolve_cells`); how its data is read
(:func:`data_options`); and the names of the folders and stages every other part shares."""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cctuning.config import coerce, read_yaml, split_list
from cctuning.data.formats import DataOptions
from cctuning.errors import CCError
from cctuning.eval.benchmarks import get_spec, resolve_name
from cctuning.eval.runner import EvalConfig
from cctuning.guard import safe_name
from cctuning.model.connection import CONNECTIONS
from cctuning.training import TrainConfig

STAGES_NAME = "stages.json"  # wall-clock seconds of every finished stage, kept across resumed invocations


@dataclass
class ExperimentConfig:
    model: str = "smollm2-135m"
    output: str = "runs/experiment"
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    train_per_lang: int = 12
    heldout_per_lang: int = 8
    heldout_seed: int = 0  # seed of the held-out sample, the same for every training seed
    # token budget of a held-out NLL item, prompt and response (None: the cell's training max_length,
    # else 1024); the training budget may cut too many held-out responses short
    heldout_max_length: int | None = None
    langs: str = "all"
    train: dict = field(default_factory=dict)  # shared cctuning train options (the budget)
    cells: list = field(default_factory=list)  # [{name, connection, sample_layer, **train options}]
    baseline: str | None = None  # cell the paired differences are taken against (default: first)
    matrix_samples: int = 200
    benchmarks: dict = field(default_factory=dict)  # {names, langs, limit, limits, scoring, max_new_tokens}
    # the likelihood of generative benchmarks' gold answers (``eval --nll XQuAD``), per cell and
    # seed, with paired differences to the baseline like the held-out NLL: {names, langs, limit, max_length}
    answer_nll: dict = field(default_factory=dict)
    eval_batch_size: int = 8
    # a finished training's checkpoint-* folders are removed (they only serve to resume it); true keeps them
    keep_checkpoints: bool = False
    # the user's data instead of samples of the bundled mix (any `cctuning train --data` source,
    # read as data_format, columns and split say); every seed trains on the whole of `data`
    data: str | None = None  # training records (also fit the Transform Matrix)
    heldout_data: str | None = None  # records of the held-out NLL
    data_format: str = "auto"  # auto | official | messages | prompt-completion
    columns: str | dict | None = None  # FIELD=COLUMN,... or a mapping
    split: str | None = None  # the split of a DatasetDict folder given as `data`
    heldout_split: str | None = None  # ... as `heldout_data`


# options of the experiment's data: set at its top level, not per cell or in `train:`
DATA_KEYS = ("data", "data_format", "columns", "split")


BENCHMARK_KEYS = {
    "names": str,
    "langs": str,
    "limit": int,
    "limits": dict,  # {benchmark: items per language}, overriding limit for that benchmark
    "scoring": str,
    "max_new_tokens": int,
}


ANSWER_NLL_KEYS = {"names": str, "langs": str, "limit": int, "max_length": int}


def _check_section(spec: dict, keys: dict, section: str, path) -> list[str]:
    """The checks that the ``benchmarks:`` and ``answer_nll:`` sections share: known options of the
    right type, and ``names`` present and naming benchmarks; returns their canonical names."""
    for key, value in spec.items():
        if key not in keys:
            raise CCError(f"{path}: {section}: unknown option '{key}' (known: {', '.join(keys)})")
        coerce(value, keys[key], f"{path}: {section}: option '{key}'")
    if not spec.get("names"):
        raise CCError(f"{path}: {section}: 'names' is missing")
    try:
        return [resolve_name(name) for name in split_list(str(spec["names"]))]
    except CCError as err:
        raise CCError(f"{path}: {section}: option 'names': {err}") from None


def _check_answer_nll(spec: dict, path) -> None:
    if not spec:
        return
    for name in _check_section(spec, ANSWER_NLL_KEYS, "answer_nll", path):
        if get_spec(name).answer_kind == "choice":
            raise CCError(
                f"{path}: answer_nll: option 'names': {name} is multiple choice (score it under "
                "benchmarks: with scoring: likelihood)"
            )
    for key in ("limit", "max_length"):
        if key in spec and int(spec[key]) <= 0:
            raise CCError(f"{path}: answer_nll: option '{key}': expected > 0, got {spec[key]!r}")


def answer_benchmarks(cfg: ExperimentConfig) -> list[str]:
    """The benchmarks of the ``answer_nll:`` spec, by their canonical names."""
    return [resolve_name(n) for n in split_list(str(cfg.answer_nll.get("names", "")))]


def _check_benchmarks(spec: dict, path) -> None:
    if not spec:
        return
    _check_section(spec, BENCHMARK_KEYS, "benchmarks", path)
    for name, value in (spec.get("limits") or {}).items():
        try:
            resolve_name(str(name))
        except CCError as err:
            raise CCError(f"{path}: benchmarks: option 'limits': {err}") from None
        coerce(value, int, f"{path}: benchmarks: option 'limits': '{name}'")
    if spec.get("scoring", "generate") not in ("generate", "likelihood"):
        raise CCError(
            f"{path}: benchmarks: option 'scoring': expected generate or likelihood, got {spec['scoring']!r}"
        )


def _coerce_top_level(data: dict, path) -> dict:
    """The YAML's top-level options, each known and of its field's type (``seeds`` a non-empty list
    of integers, ``cells`` a list, checked further by :func:`_check_cells`)."""
    hints = typing.get_type_hints(ExperimentConfig)
    for key, value in data.items():
        if key not in hints:
            raise CCError(f"{path}: unknown option '{key}'")
        if key == "seeds":
            if not isinstance(value, list) or not value:
                raise CCError(f"{path}: option 'seeds': expected a non-empty list of integers, got {value!r}")
            data[key] = [coerce(v, int, f"{path}: option 'seeds'") for v in value]
        elif key == "cells":
            if not isinstance(value, list):
                raise CCError(f"{path}: option 'cells': expected a list, got {value!r}")
        else:
            data[key] = coerce(value, hints[key], f"{path}: option '{key}'")
    return data


def _check_cells(cfg: ExperimentConfig, path, train_hints: dict) -> set[str]:
    """Every cell named once, with a known connection, a layer-draw count ≥ 0 and ``cctuning train``
    options of the right type (never the data, which is the experiment's); returns the names."""
    if not cfg.cells:
        raise CCError(f"{path}: 'cells' is empty")
    names = set()
    for i, cell in enumerate(cfg.cells):
        if not isinstance(cell, dict) or "name" not in cell:
            raise CCError(f"{path}: cell {i + 1} needs a name")
        if isinstance(cell["name"], int) and not isinstance(cell["name"], bool):
            cell["name"] = str(cell["name"])  # `name: 2024` in YAML
        safe_name(cell["name"], f"{path}: cell")  # it names the cell's folders
        if cell["name"] in names:
            raise CCError(f"{path}: two cells are named '{cell['name']}'")
        names.add(cell["name"])
        for key, value in cell.items():
            where = f"{path}: cell '{cell['name']}': option '{key}'"
            if key == "connection":
                if value not in CONNECTIONS:
                    raise CCError(f"{where}: expected one of {', '.join(CONNECTIONS)}, got {value!r}")
            elif key == "sample_layer":
                if coerce(value, int, where) < 0:
                    raise CCError(f"{where}: the number of layer draws must be ≥ 0, got {value!r}")
            elif key == "withhold_english":
                coerce(value, bool, where)
            elif key != "name":
                if key not in train_hints:
                    raise CCError(f"{path}: cell '{cell['name']}': unknown option '{key}'")
                if key in DATA_KEYS:
                    raise CCError(
                        f"{where}: every cell trains on the experiment's data (set at its top level)"
                    )
                _check_train_value(key, value, train_hints, where)
    return names


def _check_train_value(key: str, value, train_hints: dict, where: str) -> None:
    """A ``cctuning train`` option's value: of its type, and one of its choices where it has them."""
    value = coerce(value, train_hints[key], where)
    choices = TrainConfig.__dataclass_fields__[key].metadata.get("choices")
    if choices and value not in choices:
        raise CCError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")


def _check_train(cfg: ExperimentConfig, path, train_hints: dict) -> None:
    """The shared ``train:`` options: known ``cctuning train`` options of the right type, not the data."""
    for key, value in cfg.train.items():
        if key not in train_hints:
            raise CCError(f"{path}: train: unknown option '{key}'")
        if key in DATA_KEYS:
            raise CCError(f"{path}: train: option '{key}': set the data at the top level of the experiment")
        _check_train_value(key, value, train_hints, f"{path}: train: option '{key}'")


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment YAML: every name and value is validated here, so that a typo
    fails at once with a one-line error rather than after an hour of training."""
    cfg = ExperimentConfig(**_coerce_top_level(read_yaml(path), path))
    train_hints = typing.get_type_hints(TrainConfig)
    names = _check_cells(cfg, path, train_hints)
    _check_train(cfg, path, train_hints)
    if cfg.heldout_max_length is not None and cfg.heldout_max_length <= 0:
        raise CCError(f"{path}: option 'heldout_max_length': expected > 0, got {cfg.heldout_max_length}")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise CCError(f"{path}: baseline '{cfg.baseline}' is not a cell")
    _check_benchmarks(cfg.benchmarks, path)
    _check_answer_nll(cfg.answer_nll, path)
    try:
        data_options(cfg, heldout=False)
        data_options(cfg, heldout=True)
    except CCError as err:
        raise CCError(f"{path}: {err}") from None
    return cfg


def data_options(cfg: ExperimentConfig, heldout: bool) -> DataOptions | None:
    """How the user's ``data`` (or ``heldout_data``) is read; None for the bundled mix's samples."""
    if not (cfg.heldout_data if heldout else cfg.data):
        return None
    return DataOptions.of(cfg.data_format, cfg.columns, cfg.heldout_split if heldout else cfg.split)


def _check_known(cfg: ExperimentConfig, names: list[str], message: str) -> None:
    """One-line error ``message`` (``{}``: the unknown names) listing the run's cells, when a name
    given on the command line is not a cell of the config."""
    known = [c["name"] for c in cfg.cells]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CCError(f"{message.format(', '.join(unknown))} (cells: {', '.join(known)})")


def select_cells(cfg: ExperimentConfig, names: list[str]) -> None:
    """Keep only the cells named (in the config's order); an unknown name is a one-line error."""
    _check_known(cfg, names, "unknown cell {}")
    cfg.cells = [c for c in cfg.cells if c["name"] in names]
    if cfg.baseline not in names:
        cfg.baseline = None


def select_baseline(cfg: ExperimentConfig, name: str) -> None:
    """Take the report's paired differences against cell ``name`` instead of the config's baseline
    (for example the data-level twin of a CC-Tuning cell); a name that is not a cell of the run is a
    one-line error."""
    _check_known(cfg, [name], "--baseline: '{}' is not a cell of this run")
    cfg.baseline = name


# cell keys that say how a cell is evaluated, not how it is trained; withhold_english: a model trained
# with augment bilingual-prompt is prompted without the English instruction (docs/experiments.md)
EVAL_KEYS = ("name", "connection", "sample_layer", "withhold_english")


def _train_key(options: dict) -> str:
    text = json.dumps(options, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    """One cell with its settings resolved: the training options (the shared budget plus the
    cell's own), which name its training folder, and the connection it is evaluated with."""

    name: str
    options: dict
    connection: str
    sample_layer: int = 0  # evaluation only: K Gumbel-sampled layer draws per item (0: the argmax)
    withhold_english: bool = False  # evaluation only: prompts without the English (augment bilingual-prompt)

    @property
    def train_name(self) -> str:
        """The training folder's name, shared by every cell with the same training options."""
        return f"{self.options.get('method', 'cc')}-{_train_key(self.options)}"


def resolve_cells(cfg: ExperimentConfig) -> list[Cell]:
    hints = typing.get_type_hints(TrainConfig)
    cells = []
    for cell in cfg.cells:
        options = {**cfg.train, **{k: v for k, v in cell.items() if k not in EVAL_KEYS}}
        options = {k: coerce(v, hints[k], f"cell '{cell['name']}': option '{k}'") for k, v in options.items()}
        if options.get("augment") == "none":  # the default: the same training as without the key
            del options["augment"]
        connection = cell.get("connection") or (
            "transform" if options.get("method", "cc") == "cc" else "none"
        )
        withhold = bool(coerce(cell.get("withhold_english", False), bool, f"cell '{cell['name']}'"))
        cells.append(Cell(cell["name"], options, connection, int(cell.get("sample_layer", 0)), withhold))
        safe_name(cells[-1].train_name, f"cell '{cell['name']}': training folder")  # a method like ../x
    return cells


def heldout_budget(cfg: ExperimentConfig, cell: Cell) -> int | None:
    """The token budget of a cell's held-out NLL items: ``heldout_max_length``, else the cell's training
    ``max_length``, else 1024."""
    return cfg.heldout_max_length or cell.options.get("max_length", 1024)


def stage_key(kind: str, folder: str, seed: int) -> str:
    """The name of one stage in ``stages.json``: ``train|matrix/<training folder>/seed<N>`` or
    ``nll|bench/<cell>/seed<N>``."""
    return f"{kind}/{folder}/seed{seed}"


def train_dir(root: str | Path, cell: Cell, seed: int) -> Path:
    """A cell's training folder for one seed (shared by the cells of the same training options)."""
    return Path(root) / "train" / cell.train_name / f"seed{seed}"


def eval_dir(root: str | Path, cell: str, seed: int) -> Path:
    """A cell's evaluations for one seed: ``nll/`` and ``bench/`` below it."""
    return Path(root) / "eval" / cell / f"seed{seed}"


def answer_nll_name(benchmark: str) -> str:
    """The folder, in a cell's evaluation folder, of a benchmark's answer likelihood."""
    return f"answer-nll-{benchmark}"


def bench_config(
    cfg: ExperimentConfig,
    model: str,
    connection: str,
    output: Path,
    seed: int,
    sample_layer: int = 0,
    withhold_english: bool = False,
) -> EvalConfig:
    """The :class:`~cctuning.eval.runner.EvalConfig` of the experiment's ``benchmarks:`` spec."""
    b = cfg.benchmarks
    return EvalConfig(
        model=model,
        benchmarks=split_list(str(b.get("names", ""))),
        langs=split_list(str(b["langs"])) if b.get("langs") else None,
        limit=b.get("limit"),
        limits={str(k): int(v) for k, v in (b.get("limits") or {}).items()},
        connection=connection,
        scoring=b.get("scoring", "generate"),
        max_new_tokens=b.get("max_new_tokens", 40),
        batch_size=cfg.eval_batch_size,
        output=str(output),
        seed=seed,
        sample_layer=sample_layer,
        withhold_english=withhold_english,
    )
