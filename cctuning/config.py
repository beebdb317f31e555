"""Dataclass configs that read from YAML and from CLI flags (flags override the file).

One field, one flag: ``max_steps`` is ``--max-steps`` on the command line and ``max_steps`` (or
``max-steps``) in YAML. Defaults < YAML file < flags. Unknown YAML keys and values of the wrong
type are user errors naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from cctuning.errors import CCError

_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _base_type(tp):
    """``int | None`` → ``int``; ``Literal``s and unions of one type are unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def coerce(value, tp, where: str):
    """Convert a YAML or flag value to the field's type, or raise a one-line :class:`CCError`."""
    if value is None:
        return None
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _BOOL_STRINGS:
                return _BOOL_STRINGS[value.lower()]
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise CCError(f"{where}: expected {name}, got {value!r}") from None
    return value


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field; every default is SUPPRESS so we see what was given."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + list(f.metadata.get("aliases", ()))
        helptext = f.metadata.get("help", "")
        base = _base_type(hints[f.name])
        kwargs = dict(default=argparse.SUPPRESS, help=helptext, dest=f.name)
        if base is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif base is dict:
            continue
        else:
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(
                *names, type=str, metavar=f.metadata.get("metavar", base.__name__.upper()), **kwargs
            )


def split_list(text: str | None) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped: ``"en, zh,"`` → ``["en", "zh"]``;
    ``None`` or ``""`` → ``[]``."""
    return [item.strip() for item in text.split(",") if item.strip()] if text else []


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CCError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CCError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CCError(f"{path}: the config must be a mapping of option: value")
    return data


def build_config(cls, yaml_path: str | None, flags: dict):
    """Merge dataclass defaults, the YAML file and the CLI flags into an instance of ``cls``."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if yaml_path:
        for key, value in read_yaml(yaml_path).items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise CCError(f"{yaml_path}: unknown option '{key}'")
            values[name] = coerce(value, hints[name], f"{yaml_path}: option '{key}'")
    for name, value in flags.items():
        if name in names:
            values[name] = coerce(value, hints[name], f"--{name.replace('_', '-')}")
    try:
        return cls(**values)
    except TypeError as err:
        raise CCError(str(err)) from None
