"""Dataclass configs that read from YAML and from CLI flags (flags override the file).

One field, one flag: ``max_steps`` is ``--max-steps`` on the command line and ``max_steps`` (or
``max-steps``) in YAML. Defaults < YAML file < flags. Unknown YAML keys and values of the wrong
type are user errors naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import types
import typing
from pathlib import Path

import yaml

from cctuning.errors import CCError

_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _base_type(tp):
    """``int | None`` → ``int``; ``Literal``s and unions of one type are unwrapped; a union of several
    types that holds a list is ``list`` (a flag taking one or more values), any other is ``str``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
        return list if any(_base_type(a) is list for a in args) else str
    if origin is list:
        return list
    if origin is dict:
        return dict
    if origin is typing.Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return str
    return tp


def _members(tp) -> list:
    """The types of a union without ``None`` (``[tp]`` for a plain type)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _type_name(tp) -> str:
    names = []
    for member in _members(tp):
        if typing.get_origin(member) is typing.Literal:
            names.append(" or ".join(repr(a) for a in typing.get_args(member)))
            continue
        base = typing.get_origin(member) or member
        names.append(getattr(base, "__name__", str(base)))
    return " or ".join(dict.fromkeys(names))


def _matches(value, tp) -> bool:
    """Whether ``value`` already has the type ``tp`` (its outer type), as YAML would give it."""
    base = typing.get_origin(tp) or tp
    if base is typing.Literal:
        return value in typing.get_args(tp)
    if base is bool:
        return isinstance(value, bool)
    if base in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is list:
        return isinstance(value, (list, tuple))
    return isinstance(base, type) and isinstance(value, base)


def _convert(value, tp):
    """``value`` as type ``tp``; TypeError or ValueError when it is not one."""
    members = _members(tp)
    if len(members) > 1:
        for member in sorted(members, key=lambda m: not _matches(value, m)):
            try:
                return _convert(value, member)
            except (TypeError, ValueError):
                continue
        raise ValueError
    tp = members[0]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        for choice in typing.get_args(tp):
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise ValueError
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if value is False and "no" in values:  # YAML 1.1 reads `save_strategy: no` as false
            return "no"
        found = value.value if isinstance(value, tp) else value
        if found not in values:
            raise ValueError
        return found
    if tp is list or origin is list:
        item = (typing.get_args(tp) or (typing.Any,))[0]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [i if item is typing.Any else _convert(i, item) for i in items]
    if tp is dict or origin is dict:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = json.loads(value)  # JSONDecodeError is a ValueError
        if not isinstance(value, dict):
            raise ValueError
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.lower()]
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    if tp is typing.Any or not isinstance(tp, type) or isinstance(value, tp):
        return value
    raise TypeError


def coerce(value, tp, where: str):
    """Convert a YAML or flag value to the field's type, or raise a one-line :class:`CCError`.

    Unions take the first member that the value already is (as YAML typed it), then the first that
    converts; lists take one value or a list; a dict also comes as JSON text (``'{"a": 1}'``);
    ``Literal``s and enums take one of their values (an enum gives the value, not the member)."""
    if value is None:
        return None
    try:
        return _convert(value, tp)
    except (TypeError, ValueError):
        raise CCError(f"{where}: expected {_type_name(tp)}, got {value!r}") from None


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_default(f: dataclasses.Field):
    """A field's default (its factory called), or :data:`dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _metavar(tp, base) -> str:
    """``{a,b,c}`` for a Literal or a small enum (of a list's items too), a large enum's name, else
    the type's name in capitals."""
    members = _members(tp)
    members += [a for m in members if typing.get_origin(m) is list for a in typing.get_args(m)]
    for member in members:
        if typing.get_origin(member) is typing.Literal and len(members) == 1:
            return "{" + ",".join(str(a) for a in typing.get_args(member)) + "}"
        if isinstance(member, type) and issubclass(member, enum.Enum):
            if len(member) > 8:
                return member.__name__.upper()
            return "{" + ",".join(str(m.value) for m in member) + "}"
    if base is list:
        item = next((typing.get_args(m) for m in _members(tp) if typing.get_origin(m) is list), ())
        return getattr(item[0], "__name__", "VALUE").upper() if item else "VALUE"
    if base is dict:
        return "JSON"
    return getattr(base, "__name__", "VALUE").upper()


def _jsonable(value):
    """A default as JSON can hold it: an enum's value, a tuple as a list, anything else JSON cannot
    hold as its ``repr``."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _argument_spec(f: dataclasses.Field, tp, *, dict_as_json: bool, show_default: bool, check_choices: bool):
    """The spec of one field's flag (see :func:`argument_specs`), or None when it gets none."""
    base = _base_type(tp)
    if (base is dict and not dict_as_json) or base not in (bool, int, float, str, list, dict):
        return None  # a dict without dict_as_json, or a Python object (no text form): Python API only
    doc = str(f.metadata.get("help", "")).replace("%", "%%")
    default = field_default(f)
    helptext = doc
    if show_default and default is not False and default not in (dataclasses.MISSING, None, "", [], {}):
        shown = default.value if isinstance(default, enum.Enum) else default
        helptext += f" (default: {shown})".replace("%", "%%")
    choices = list(f.metadata["choices"]) if f.metadata.get("choices") else None
    metavar = None
    if base is not bool:
        metavar = f.metadata.get("metavar") or _metavar(tp, base)
        if choices and check_choices:
            metavar = f.metadata.get("metavar")
        elif choices:
            metavar = "{" + ",".join(str(c) for c in choices) + "}"
    return {
        "name": f.name,
        "flags": ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())],
        "type": getattr(base, "__name__", str(base)),
        "default": None if default is dataclasses.MISSING else _jsonable(default),
        "required": default is dataclasses.MISSING,
        "choices": [_jsonable(c) for c in choices] if choices else None,
        "checked_choices": bool(choices and check_choices),
        "metavar": metavar,
        "nargs": "+" if base is list else None,
        "doc": doc,
        "help": helptext,
    }


def argument_specs(
    cls,
    skip: tuple[str, ...] = (),
    *,
    dict_as_json: bool = False,
    show_default: bool = False,
    check_choices: bool = True,
    hints: dict | None = None,
) -> list[dict]:
    """One JSON-able spec per dataclass field that can be a flag (:func:`add_argument_specs` adds them).

    The flag is the field's name with ``-`` for ``_`` (and the aliases of its metadata); its value is
    read as text and converted later by :func:`coerce`. ``bool`` → ``--flag/--no-flag``; a list → one
    or more values (``--flag a b``); a ``Literal`` or an enum shows its values; a dict field is
    skipped unless ``dict_as_json`` (then it takes JSON text); a field of a type without a text form
    is skipped. ``choices`` in a field's metadata are checked by argparse, or only shown with
    ``check_choices=False`` (for the caller to check, with a one-line error). ``show_default`` adds
    the field's default to the help (``doc`` keeps the help without it), unless it is empty or False
    (``--no-flag`` is the default then). A spec also records the
    field's base ``type``, ``default`` and ``choices``, so that a cached one can be checked."""
    hints = _type_hints(cls) if hints is None else hints
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False or not f.init or f.name not in hints:
            continue
        spec = _argument_spec(
            f,
            hints[f.name],
            dict_as_json=dict_as_json,
            show_default=show_default,
            check_choices=check_choices,
        )
        if spec is not None:
            specs.append(spec)
    return specs


def add_argument_specs(parser, specs: list[dict], *, dest_prefix: str = "") -> list[str]:
    """Add the flags of :func:`argument_specs`; every default is SUPPRESS so we see what was given.
    A flag the parser already has is skipped (the parser's own options win). ``dest_prefix`` is put
    before each destination name. Returns the names of the fields that got a flag."""
    taken = set(getattr(parser, "_option_string_actions", {}))
    added = []
    for spec in specs:
        if any(name in taken for name in spec["flags"]):
            continue
        kwargs = dict(default=argparse.SUPPRESS, help=spec["help"], dest=dest_prefix + spec["name"])
        if spec["type"] == "bool":
            parser.add_argument(*spec["flags"], action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if spec["checked_choices"]:
                kwargs["choices"] = spec["choices"]
            if spec["nargs"]:
                kwargs["nargs"] = spec["nargs"]
            parser.add_argument(*spec["flags"], type=str, metavar=spec["metavar"], **kwargs)
        taken.update(spec["flags"])
        added.append(spec["name"])
    return added


def add_dataclass_arguments(
    parser, cls, skip: tuple[str, ...] = (), *, dest_prefix: str = "", **options
) -> list[str]:
    """One ``--flag`` per dataclass field (:func:`argument_specs` with ``options``, added by
    :func:`add_argument_specs`); returns the names of the fields that got a flag."""
    return add_argument_specs(parser, argument_specs(cls, skip, **options), dest_prefix=dest_prefix)


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
    except OSError as err:  # unreadable (permissions), a folder
        raise CCError(f"{path}: cannot read the config file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CCError(
            f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the file as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CCError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CCError(f"{path}: the config must be a mapping of option: value")
    return data


def yaml_values(cls, yaml_path: str | Path) -> dict:
    """The options of a YAML config file for the dataclass ``cls``, checked and converted."""
    hints = _type_hints(cls)
    values = {}
    for key, value in read_yaml(yaml_path).items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise CCError(f"{yaml_path}: unknown option '{key}'")
        values[name] = coerce(value, hints[name], f"{yaml_path}: option '{key}'")
    return values


def flag_values(cls, flags: dict) -> dict:
    """The options given as flags (``{field: text}``) that are fields of ``cls``, converted."""
    hints = _type_hints(cls)
    return {
        name: coerce(value, hints[name], f"--{name.replace('_', '-')}")
        for name, value in flags.items()
        if name in hints
    }


def merge_values(*layers: dict) -> dict:
    """Option layers merged, later ones winning; a dict option merges key by key (later keys win)."""
    values: dict = {}
    for layer in layers:
        for name, value in layer.items():
            if isinstance(value, dict) and isinstance(values.get(name), dict):
                values[name] = {**values[name], **value}
            else:
                values[name] = value
    return values


def make_config(cls, values: dict):
    """``cls(**values)``, a wrong call turned into a one-line error."""
    try:
        return cls(**values)
    except TypeError as err:
        raise CCError(str(err)) from None


def build_config(cls, yaml_path: str | None, flags: dict):
    """Merge dataclass defaults, the YAML file and the CLI flags into an instance of ``cls``
    (:func:`merge_values`: flags win; a dict option merges key by key)."""
    layers = [yaml_values(cls, yaml_path)] if yaml_path else []
    layers.append(flag_values(cls, flags))
    return make_config(cls, merge_values(*layers))


def apply_yaml_defaults(parser: argparse.ArgumentParser, yaml_path: str | Path) -> None:
    """Make the options of a YAML file the defaults of ``parser`` (a command built with plain
    ``add_argument`` calls), so that flags given on the command line override them. Keys are the
    options' names (``max_new_tokens`` or ``max-new-tokens``); an option required on the command line
    is no longer required when the file gives it. Unknown keys and bad values are one-line errors
    naming the file and the key."""
    actions = {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config") and a.default is not argparse.SUPPRESS
    }
    defaults = {}
    for key, value in read_yaml(yaml_path).items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        where = f"{yaml_path}: option '{key}'"
        if action is None:
            raise CCError(f"{yaml_path}: unknown option '{key}'")
        if value is not None:
            value = _action_value(action, value, where)
        defaults[name] = value
        action.required = False
    parser.set_defaults(**defaults)


def _action_value(action: argparse.Action, value, where: str):
    """A YAML value converted the way argparse converts the option's text, checked against its
    choices."""
    if action.nargs == 0:  # store_true, store_false, --x/--no-x
        return coerce(value, bool, where)
    many = (
        action.nargs in ("+", "*")
        or isinstance(action.nargs, int)
        or isinstance(action, argparse._AppendAction)
    )
    if isinstance(value, (list, tuple)) and not many:
        raise CCError(f"{where}: expected one value, got {value!r}")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        convert = action.type
        if convert in (None, str, int, float):
            item = coerce(item, convert or str, where)
        else:
            try:
                item = convert(str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise CCError(f"{where}: invalid value {item!r}") from None
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise CCError(f"{where}: expected one of {choices}, got {item!r}")
        out.append(item)
    return out if many else out[0]
