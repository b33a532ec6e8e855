"""Typed dataclass configs: validation that names the field, and (de)serialisation to dict/YAML.

Every config in the package is a dataclass whose fields carry a docstring (shown as CLI help by
jsonargparse). Fields typed with ``Literal[...]`` are checked automatically; anything richer is
checked in the config's own ``validate``. Errors are :class:`ConfigError` and always name the field,
the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class UserError(RuntimeError):
    """A problem the user can fix (unreadable source, corrupted checkpoint, …): shown as one line."""


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field and the allowed values."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")


def _literal_values(tp: Any) -> tuple | None:
    """The allowed values if ``tp`` is a Literal (or Optional[Literal]), else None."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            values = _literal_values(arg)
            if values is not None:
                return values + ((None,) if type(None) in get_args(tp) else ())
    return None


def check_literals(obj: Any) -> None:
    """Raise ConfigError for any Literal-typed field whose value is not one of the allowed ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = _literal_values(hints.get(f.name))
        if allowed is not None:
            value = getattr(obj, f.name)
            if value not in allowed:
                shown = ", ".join(repr(a) for a in allowed)
                raise ConfigError(f.name, value, f"allowed values are {shown}")


def check_positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(name, value, "must be " + ("≥ 0" if allow_zero else "> 0"))


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a (possibly nested) dataclass config."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a dict, rejecting unknown keys with the list of known ones."""
    if not isinstance(data, dict):
        raise ConfigError(where or cls.__name__, data, "expected a mapping of field names to values")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            prefix + unknown[0],
            data[unknown[0]],
            f"unknown field; known fields are {', '.join(sorted(names))}",
        )
    return cls(**data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a clear error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "the YAML file must hold a mapping of keys to values")
    return data


def dump_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- command-line flags


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the text under each field), used as CLI help."""
    import docstring_parser

    try:
        doc = docstring_parser.parse_from_object(cls)
    except Exception:  # source unavailable (frozen app): help text is a nicety, not a requirement
        return {}
    return {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def add_dataclass_flags(
    parser,
    cls: type,
    *,
    rename: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    dest_prefix: str = "",
) -> list[str]:
    """Add one ``--kebab-case`` flag per dataclass field to a jsonargparse/argparse parser.

    Every flag defaults to None so the caller can tell "not given" from a value, and layer flags over a
    preset and a YAML file (flags win). Booleans get ``--x/--no-x``. Returns the destinations added.
    """
    import argparse

    rename = rename or {}
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    dests = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        dest = dest_prefix + rename.get(f.name, f.name)
        tp = hints[f.name]
        base = _strip_optional(tp)
        help_text = docs.get(f.name, "")
        if base is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif get_origin(base) is Literal:
            parser.add_argument(flag, dest=dest, choices=list(get_args(base)), default=None, help=help_text)
        elif get_origin(base) is list:
            parser.add_argument(flag, dest=dest, nargs="+", default=None, help=help_text)
        elif base in (int, float, str):
            parser.add_argument(flag, dest=dest, type=base, default=None, help=help_text)
        else:
            continue  # dicts and nested configs come from YAML
        dests.append(dest)
    return dests


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def merge_layers(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; None values mean "not given" and never override."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if v is None:
                continue
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


def normalise_keys(data: dict[str, Any]) -> dict[str, Any]:
    """YAML keys may be written with dashes, like the flags: ``top-k`` → ``top_k``."""
    return {k.replace("-", "_"): (normalise_keys(v) if isinstance(v, dict) else v) for k, v in data.items()}
