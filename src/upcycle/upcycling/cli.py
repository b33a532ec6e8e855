"""Convert a dense Hugging Face causal LM into an MoE checkpoint.

Options come from, in increasing priority: the defaults, --preset, the YAML file given with --config
(same keys as the flags, with underscores or dashes), and the flags themselves.

Examples:
  upcycle convert --preset report-gpt2 --out gpt2-moe
  upcycle convert --model meta-llama/Llama-3.2-1B --method drop --ratio 0.5 --experts 8 --top-k 2 --out llama-moe
  upcycle convert --method btx --model expert-a expert-b --out btx-moe
  upcycle convert --method nexus --model seed --expert code=code-lm --expert math=math-lm \
      --domain-data code=code.jsonl --domain-data math=math.jsonl --out nexus-moe
"""

from __future__ import annotations

import dataclasses

from upcycle.config import add_dataclass_flags, field_docs, load_yaml, merge_layers, normalise_keys
from upcycle.moe import MoEConfig
from upcycle.upcycling.options import DERIVED_MOE_FIELDS, PRESETS, RENAMED, UpcycleConfig

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


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of the options below")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="start from a named setting")
    add_dataclass_flags(parser, UpcycleConfig, skip=("moe", "preset", *REPEATED))
    docs = field_docs(UpcycleConfig)
    for name in REPEATED:
        parser.add_argument(
            "--" + name.replace("_", "-"), action="extend", nargs="+", default=None, help=docs[name]
        )
    add_dataclass_flags(
        parser,
        MoEConfig,
        skip=tuple(f.name for f in dataclasses.fields(MoEConfig) if f.name not in _MOE_FLAG_FIELDS),
        dest_prefix="moe__",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from_args(args) -> UpcycleConfig:
    """Resolve defaults < preset < YAML < flags into a validated UpcycleConfig."""
    from upcycle.upcycling.options import preset

    ns = vars(args) if not isinstance(args, dict) else args
    flags = {
        k: v for k, v in ns.items() if k not in ("config", "preset", "quiet") and not k.startswith("moe__")
    }
    flag_moe = {k[len("moe__") :]: v for k, v in ns.items() if k.startswith("moe__") and v is not None}
    yaml_layer = normalise_keys(load_yaml(ns["config"])) if ns.get("config") else {}
    # MoE fields may sit at the top level of the YAML file, like their flags.
    yaml_moe = {k: yaml_layer.pop(k) for k in list(yaml_layer) if k in _MOE_FLAG_FIELDS}
    preset_name = ns.get("preset") or yaml_layer.pop("preset", None)
    base = preset(preset_name) if preset_name else {}
    merged = merge_layers(base, yaml_layer, flags)
    merged["moe"] = merge_layers(base.get("moe", {}), yaml_layer.get("moe", {}), yaml_moe, flag_moe)
    return UpcycleConfig(**merged)


def run(args) -> int:
    from upcycle.upcycling.convert import convert

    opts = options_from_args(args)
    if opts.out is None:
        from upcycle.config import ConfigError

        raise ConfigError("out", None, "give the output folder with --out DIR")
    result = convert(opts, progress=not getattr(args, "quiet", False))
    print(f"wrote {result.out} ({opts.method}, {len(result.model.config.moe_layers)} MoE layers)")
    print(result.report_line())
    return 0
