"""Convert a dense Hugging Face causal LM into an MoE checkpoint.

Options come from, in increasing priority: the defaults, --preset, the YAML file given with --config
(same keys as the flags, with underscores or dashes; MoE fields also under a `moe:` mapping), and the
flags themselves. A method's own options (--ratio for drop, --noise-std for noise, …) are refused on the
command line with another method, and upcycling.json records only the options the method used.

Examples:
  upcycle convert --preset report-gpt2 --out gpt2-moe
  upcycle convert --model meta-llama/Llama-3.2-1B --method drop --ratio 0.5 --experts 8 --top-k 2 --out llama-moe
  upcycle convert --method btx --model expert-a expert-b --out btx-moe
  upcycle convert --method nexus --model seed --expert code=code-lm --expert math=math-lm \
      --domain-data code=code.jsonl --domain-data math=math.jsonl --out nexus-moe
"""

from __future__ import annotations

import dataclasses
from typing import Any

from upcycle.config import (
    ConfigError,
    add_dataclass_flags,
    add_repeated_flags,
    check_mapping,
    field_types,
    load_yaml,
    merge_layers,
    normalise_keys,
)
from upcycle.moe.config import MoEConfig
from upcycle.upcycling.options import (
    DERIVED_MOE_FIELDS,
    METHOD_OPTIONS,
    PRESETS,
    RENAMED,
    SHOWN_DEFAULTS,
    UpcycleConfig,
)

HELP = "convert a dense model into an MoE checkpoint (naive, drop, noise, granular, scratch, btx, nexus)"

#: NAME=VALUE options that may be repeated (--expert a=X --expert b=Y) or list several values.
REPEATED = ("expert", "domain_data")

# MoEConfig fields that get their own flag (the rest are derived from the source or renamed).
_UPCYCLE_FIELDS = {f.name for f in dataclasses.fields(UpcycleConfig)}
_MOE_FLAG_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(MoEConfig)
    if f.name not in DERIVED_MOE_FIELDS and f.name not in RENAMED and f.name not in _UPCYCLE_FIELDS
)


def preset_lines() -> str:
    """The presets, one line each, for --help."""
    width = max(len(n) for n in PRESETS)
    lines = ["presets (--preset NAME; --config and flags override them):"]
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={' '.join(v) if isinstance(v, list) else v}" for k, v in values.items())
        lines.append(f"  {name:<{width}}  {shown}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.epilog = preset_lines()
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="YAML file with any of the options below"
    )
    parser.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="start from a named setting (listed below)"
    )
    add_dataclass_flags(parser, UpcycleConfig, skip=("moe", "preset", *REPEATED), defaults=SHOWN_DEFAULTS)
    add_repeated_flags(parser, UpcycleConfig, REPEATED)
    add_dataclass_flags(
        parser,
        MoEConfig,
        skip=tuple(f.name for f in dataclasses.fields(MoEConfig) if f.name not in _MOE_FLAG_FIELDS),
        dest_prefix="moe__",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _yaml_types() -> dict[str, Any]:
    """The keys a convert YAML file may hold at its top level, with their types."""
    upcycle_types = field_types(UpcycleConfig)
    moe_types = field_types(MoEConfig)
    return {**upcycle_types, **{name: moe_types[name] for name in _MOE_FLAG_FIELDS}}


def read_yaml(path: str) -> tuple[dict, dict]:
    """(UpcycleConfig fields, MoEConfig fields) of a convert YAML file, every key and type checked."""
    return read_mapping(load_yaml(path), source=path)


def read_mapping(raw: dict, *, source: str | None = None, where: str = "") -> tuple[dict, dict]:
    """(UpcycleConfig fields, MoEConfig fields) of a mapping of convert options (a YAML file's, or the
    ``convert:`` section of an experiment at YAML path ``where``), every key and type checked."""
    raw = normalise_keys(raw)
    prefix = f"{where}." if where else ""
    for name in REPEATED:  # `expert: {law: dir}` is as good as `expert: [law=dir]`
        if isinstance(raw.get(name), dict):
            raw[name] = [f"{k}={v}" for k, v in raw[name].items()]
    data = check_mapping(raw, _yaml_types(), where=where, source=source)
    moe_types = {k: v for k, v in field_types(MoEConfig).items() if k not in DERIVED_MOE_FIELDS}
    nested = check_mapping(data.pop("moe", None) or {}, moe_types, where=f"{prefix}moe", source=source)
    renamed = sorted(set(nested) & set(RENAMED))
    if renamed:
        flag = RENAMED[renamed[0]]
        raise ConfigError(
            f"{prefix}moe.{renamed[0]}", nested[renamed[0]], f"write it as top-level '{flag}'", source=source
        )
    top_moe = {k: data.pop(k) for k in list(data) if k in _MOE_FLAG_FIELDS}
    return data, {**nested, **top_moe}


def options_from_mapping(raw: dict, *, source: str | None = None, where: str = "") -> UpcycleConfig:
    """A validated UpcycleConfig from a mapping of convert options (defaults < its preset < its keys):
    what ``upcycle run`` builds from an experiment's ``convert:`` section."""
    from upcycle.config import from_dict
    from upcycle.upcycling.options import preset

    layer, moe = read_mapping(raw, source=source, where=where)
    preset_name = layer.pop("preset", None)
    base = preset(preset_name) if preset_name else {}
    merged = merge_layers(base, layer)
    merged["moe"] = merge_layers(base.get("moe", {}), moe)
    return from_dict(UpcycleConfig, merged)


def check_method_options(method: str, flags: dict[str, Any]) -> None:
    """A method's own option given on the command line with another method does nothing: refuse it."""
    for name, methods in METHOD_OPTIONS.items():
        if flags.get(name) is not None and method not in methods:
            only = " or ".join(repr(m) for m in methods)
            raise ConfigError(name, flags[name], f"applies to method {only} only; the method is {method!r}")


def options_from_args(args) -> UpcycleConfig:
    """Resolve defaults < preset < YAML < flags into a validated UpcycleConfig."""
    from upcycle.config import from_dict
    from upcycle.upcycling.options import preset

    ns = vars(args) if not isinstance(args, dict) else args
    flags = {
        k: v for k, v in ns.items() if k not in ("config", "preset", "quiet") and not k.startswith("moe__")
    }
    flag_moe = {k[len("moe__") :]: v for k, v in ns.items() if k.startswith("moe__") and v is not None}
    yaml_layer, yaml_moe = read_yaml(ns["config"]) if ns.get("config") else ({}, {})
    preset_name = ns.get("preset") or yaml_layer.pop("preset", None)
    base = preset(preset_name) if preset_name else {}
    merged = merge_layers(base, yaml_layer, flags)
    merged["moe"] = merge_layers(base.get("moe", {}), yaml_moe, flag_moe)
    check_method_options(merged.get("method", UpcycleConfig.method), flags)
    return from_dict(UpcycleConfig, merged)


def check(args) -> UpcycleConfig:
    """Options, output folder and source names, checked before torch is imported."""
    from upcycle.io import check_output_dir
    from upcycle.models.loading import model_source

    opts = options_from_args(args)
    if opts.out is None:
        raise ConfigError("out", None, "give the output folder with --out DIR")
    check_output_dir(opts.out, opts.overwrite)
    for name in opts.model:
        model_source(name, flag="model", check_weights=True)
    for item in opts.expert:  # nexus: NAME=DIR
        model_source(item.partition("=")[2], flag="expert", check_weights=True)
    return opts


def run(args) -> int:
    from upcycle.upcycling.convert import convert

    opts = check(args)
    result = convert(opts, progress=not getattr(args, "quiet", False))
    print(f"wrote {result.out} ({opts.method}, {len(result.model.config.moe_layers)} MoE layers)")
    print(result.report_line())
    return 0
