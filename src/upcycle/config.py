"""Typed dataclass configs: validation that names the field, and (de)serialisation to dict/YAML.

Every config in the package is a dataclass whose fields carry a docstring (shown as CLI help). One
validation path serves flags, YAML files and saved configs (issue 11): :func:`add_dataclass_flags`
parses flag strings with the types of the fields, and :func:`check_mapping` / :func:`from_dict` check a
YAML (or JSON) mapping against the same types, naming unknown keys with a "did you mean" for near misses.
Fields typed with ``Literal[...]`` are checked automatically; anything richer is checked in the config's
own ``validate``. Errors are :class:`ConfigError` and always name the field, the value given and what is
allowed; the command line prints them as one line.

This module is imported while the command line parses its flags, so it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class UserError(RuntimeError):
    """A problem the user can fix (unreadable source, corrupted checkpoint, …): shown as one line."""


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field and the allowed values.

    ``source`` is the file the value came from (a YAML config), None for flags and code.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, source: str | os.PathLike | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.source = None if source is None else str(source)
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{field}={value!r} is invalid: {allowed}")


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (loader errors are often pages long)."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if isinstance(exc, BaseException) else ""


# --------------------------------------------------------------------------- types of fields


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


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return tp is Any or (get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp))


def field_types(cls: type) -> dict[str, Any]:
    """Field name → type hint of a dataclass (``from __future__ import annotations`` resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` looks like, for error messages: 'an integer', "one of 'a', 'b'"."""
    base = _strip_optional(tp)
    suffix = " (or null)" if _is_optional(tp) and tp is not Any else ""
    values = _literal_values(base)
    if values is not None:
        return "one of " + ", ".join(repr(v) for v in values if v is not None) + suffix
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    if base in names:
        return names[base] + suffix
    origin = get_origin(base)
    if origin in (list, tuple):
        inner = get_args(base)[0] if get_args(base) else Any
        return f"a list ({describe_type(inner)} each){suffix}"
    if origin is dict or base is dict or dataclasses.is_dataclass(base):
        return "a mapping of keys to values" + suffix
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(base) if a is not type(None)) + suffix
    return getattr(base, "__name__", str(base)) + suffix


def check_value(name: str, tp: Any, value: Any, *, source: str | None = None) -> Any:
    """``value`` checked against the field type ``tp`` (as YAML or JSON gives it); returns the value to use.

    Strict where a wrong type is surely a mistake (``experts: eight``, ``ratio: '0.5'``, ``renormalize: 1``),
    lenient where the intent is clear: a number for a text field (``layers: 3``, ``data_config: 2019``) and
    a single item for a list (``model: gpt2``). Non-finite numbers are refused (``lr: .nan``).
    """

    def bad() -> ConfigError:
        return ConfigError(name, value, f"expected {describe_type(tp)}", source=source)

    if value is None:
        if _is_optional(tp):
            return None
        raise bad()
    base = _strip_optional(tp)
    values = _literal_values(base)
    if values is not None:
        if value in values and type(value) in {type(v) for v in values}:
            return value
        hint = suggest(str(value), [str(v) for v in values])
        raise ConfigError(
            name,
            value,
            f"allowed values are {', '.join(repr(v) for v in values)}"
            + (f" (did you mean {hint!r}?)" if hint else ""),
            source=source,
        )
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise bad()
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike) or isinstance(value, (int, float)) and not isinstance(value, bool):
            return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        raise bad()
    origin = get_origin(base)
    if origin in (list, tuple) or base in (list, tuple):
        inner = get_args(base)[0] if get_args(base) else Any
        items = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, dict):
            raise bad()
        return [check_value(name, inner, item, source=source) for item in items]
    if origin is dict or base is dict:
        if isinstance(value, dict):
            return value
        raise bad()
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if isinstance(value, dict):
            return check_mapping(value, field_types(base), where=name, source=source)
        raise bad()
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(base):
            try:
                return check_value(name, arg, value, source=source)
            except ConfigError:
                continue
        raise bad()
    return value  # Any, or a type this checker does not know: the config's validate() decides


# --------------------------------------------------------------------------- unknown keys

#: Names people bring from other tools (Hugging Face Trainer, Megatron, litgpt) → our option names.
#: A suggestion is only made when the target is an option of the command at hand.
ALIASES = {
    "learning_rate": ["lr"],
    "lr_rate": ["lr"],
    "max_lr": ["lr"],
    "max_steps": ["steps"],
    "train_steps": ["steps"],
    "num_steps": ["steps"],
    "max_seq_length": ["seq_len"],
    "seq_length": ["seq_len"],
    "block_size": ["seq_len"],
    "sequence_length": ["seq_len"],
    "max_length": ["max_length", "seq_len"],
    "per_device_train_batch_size": ["batch_size"],
    "micro_batch_size": ["batch_size"],
    "gradient_accumulation_steps": ["grad_accum"],
    "warmup_steps": ["warmup"],
    "lr_scheduler_type": ["schedule"],
    "max_grad_norm": ["clip"],
    "grad_clip": ["clip"],
    "output_dir": ["out"],
    "output": ["out"],
    "output_path": ["out"],
    "model_name_or_path": ["model"],
    "model_name": ["model"],
    "dataset": ["data"],
    "dataset_name": ["data"],
    "num_experts": ["experts", "num_experts"],
    "n_experts": ["experts", "num_experts"],
    "num_local_experts": ["experts", "num_experts"],
    "num_experts_per_tok": ["top_k"],
    "k": ["top_k"],
    "topk": ["top_k"],
    "drop_ratio": ["ratio"],
    "mixed_precision": ["precision"],
    "dtype": ["precision"],
    "random_seed": ["seed"],
}


def suggest(name: str, known: typing.Iterable[str]) -> str | None:
    """The known name ``name`` most likely meant: a common alias (``learning_rate`` → ``lr``) or a close
    spelling (``step`` → ``steps``, ``expertz`` → ``experts``), else None."""
    known = [str(k) for k in known]
    key = str(name).replace("-", "_").lower()
    for target in ALIASES.get(key, []):
        if target in known and target != name:
            return target
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(key, list(lowered), n=2, cutoff=0.7)
    if close:
        # Two names one edit away (``expertz``: ``expert`` and ``experts``) are both shown.
        ratio = [difflib.SequenceMatcher(None, key, c).ratio() for c in close]
        shown = close if len(close) == 2 and ratio[0] - ratio[1] < 0.08 else close[:1]
        return " or ".join(lowered[c] for c in shown)
    # A prefix or suffix of a known name (``shared`` → ``shared_experts``) when that is unambiguous.
    partial = [k for k in known if len(key) >= 3 and (k.startswith(key) or k.endswith(key))]
    return partial[0] if len(partial) == 1 else None


def unknown_key_error(
    unknown: list[str], data: dict, known: typing.Iterable[str], *, where: str = "", source: str | None = None
) -> ConfigError:
    """One error naming every unknown key, with a suggestion for the first."""
    known = sorted(known)
    prefix = f"{where}." if where else ""
    first = unknown[0]
    hint = suggest(first, known)
    message = "unknown field" + (f" (did you mean {prefix}{hint}?)" if hint else "")
    if len(unknown) > 1:
        message += f"; also unknown: {', '.join(prefix + k for k in unknown[1:])}"
    message += f"; known fields are {', '.join(known)}"
    return ConfigError(prefix + first, data.get(first), message, source=source)


def check_mapping(
    data: Any, types_: dict[str, Any], *, where: str = "", source: str | None = None
) -> dict[str, Any]:
    """Check a (partial) mapping of field → value against field types: every key known, every value of
    its field's type. Returns the checked values (see :func:`check_value` for the few conversions)."""
    if not isinstance(data, dict):
        raise ConfigError(
            where or "config", data, "expected a mapping of field names to values", source=source
        )
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise unknown_key_error([str(k) for k in unknown], data, types_, where=where, source=source)
    prefix = f"{where}." if where else ""
    return {k: check_value(prefix + k, types_[k], v, source=source) for k, v in data.items()}


def split_commas(values: str | list | tuple | None) -> list[str] | None:
    """A list option given as ``a,b``, ``a b`` (flags) or ``[a, b]`` / ``a,b`` (YAML) → ``['a', 'b']``: every
    command accepts both spellings (issue 11). Applied where commands read flags and YAML, not in the
    configs themselves: names that ``upcycle run`` generates may hold commas. None stays None."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number")
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


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "", source: str | None = None) -> T:
    """Build ``cls`` from a dict: unknown keys are refused by name (with a "did you mean"), values are
    checked against the field types, then the config's own validation runs."""
    if not isinstance(data, dict):
        raise ConfigError(
            where or cls.__name__, data, "expected a mapping of field names to values", source=source
        )
    values = check_mapping(data, field_types(cls), where=where, source=source)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        prefix = f"{where}." if where else ""
        raise ConfigError(prefix + missing[0], None, "required field is missing", source=source)
    return cls(**values)


def load_yaml(path: str | os.PathLike, field: str = "config") -> dict[str, Any]:
    """Read a YAML mapping (``~`` expanded); a missing or malformed file is a one-line error naming it
    and the argument it came from (``field``: ``config`` for ``--config``, ``EXPERIMENT`` for a positional)."""
    shown = str(path)
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(field, shown, "no such file" if not path.exists() else "not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(field, shown, f"not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(field, shown, "the YAML file must hold a mapping of keys to values")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(field, shown, f"keys must be option names; got {bad[0]!r}")
    return data


def read_yaml_layer(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """A command's YAML file (``--config``, a run's saved config.yaml) as a layer of ``cls``'s options:
    every key known, every value of its field's type, errors naming the file (issue 11)."""
    return check_mapping(normalise_keys(load_yaml(path)), field_types(cls), source=str(path))


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


def integer(text: str) -> int:
    """Flag type for int fields; its name is what argparse prints: "invalid integer value: 'eight'"."""
    return int(text)


def number(text: str) -> float:
    """Flag type for float fields: any finite number ("invalid number value: 'fast'")."""
    value = float(str(text).strip())
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def text(value: str) -> str:
    return value


def flag_type(tp: Any):
    """The argparse ``type=`` of a field type (None for types that have no flag)."""
    base = _strip_optional(tp)
    if get_origin(base) in (list, tuple):
        args = get_args(base)
        return flag_type(args[0]) if args else text
    return {int: integer, float: number, str: text}.get(base)


def describe_default(value: Any) -> str | None:
    """A default as the help shows it: ``8``, ``drop``, ``on``/``off``; None when there is none to show."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flag_help(doc: str, default: Any) -> str:
    """Help text of a flag: the field's docstring and its effective default."""
    shown = describe_default(default)
    text_ = doc
    if shown is not None and "default" not in doc.lower():
        text_ = f"{doc} (default: {shown})" if doc else f"default: {shown}"
    return text_


def add_repeated_flags(parser, cls: type, names: tuple[str, ...]) -> None:
    """Flags of list fields given as NAME=VALUE items, repeatable (``--expert law=dir --expert code=dir``)
    or several at once; the help is the field's docstring."""
    docs = field_docs(cls)
    for name in names:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action="extend",
            nargs="+",
            default=None,
            metavar="NAME=VALUE",
            help=docs[name],
        )


def add_dataclass_flags(
    parser,
    cls: type,
    *,
    rename: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    dest_prefix: str = "",
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Add one ``--kebab-case`` flag per dataclass field to a jsonargparse/argparse parser.

    Every flag defaults to None so the caller can tell "not given" from a value, and layer flags over a
    preset and a YAML file (flags win). The help shows the field's docstring and the field's default
    (``defaults`` overrides what is shown, e.g. where a command's default differs). Booleans get
    ``--x/--no-x``; values are parsed with the field's type, so a wrong one is refused naming the flag,
    the value and the type. Returns the destinations added.
    """
    import argparse

    rename = rename or {}
    defaults = defaults or {}
    docs = field_docs(cls)
    hints = field_types(cls)
    dests = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = rename.get(f.name, f.name)
        flag = "--" + name.replace("_", "-")
        dest = dest_prefix + name
        tp = hints[f.name]
        base = _strip_optional(tp)
        default = defaults.get(f.name, _field_default(f))
        kwargs: dict[str, Any] = dict(dest=dest, default=None, help=flag_help(docs.get(f.name, ""), default))
        metavar = name.upper()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(base) is Literal:
            parser.add_argument(flag, choices=list(get_args(base)), metavar=None, **kwargs)
        elif get_origin(base) in (list, tuple) and flag_type(base) is not None:
            parser.add_argument(flag, nargs="+", type=flag_type(base), metavar=metavar, **kwargs)
        elif base in (int, float, str):
            parser.add_argument(flag, type=flag_type(base), metavar=metavar, **kwargs)
        else:
            continue  # dicts and nested configs come from YAML
        dests.append(dest)
    return dests


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
    return {
        (k.replace("-", "_") if isinstance(k, str) else k): (normalise_keys(v) if isinstance(v, dict) else v)
        for k, v in data.items()
    }
