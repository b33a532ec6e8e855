"""Add routed experts to a trained MoE checkpoint, one per new dense model (Nexus, Gritsch et al. 2024).

Every MoE layer gets the new model's MLP as one more routed expert. An embedding router (``convert
--method nexus``) routes to it through its trained projection of the new domain's embedding; a linear
router gets a new row as --router-init says (the naive baseline). Every other weight stays as it was
unless --merge average. The function-preservation figures on the old domains and the routing of the new
domain's text are printed and stored with the checkpoint.

Options come from, in increasing priority: the defaults, the YAML file given with --config (same keys as
the flags), and the flags themselves.

Examples:
  upcycle extend nexus-moe --expert code=code-lm --domain-data code=code.jsonl --out nexus-moe-code
  upcycle extend nexus-moe --expert code=code-lm --domain-data code=code.jsonl --freeze-existing \\
      --probe-data prose.jsonl --out nexus-moe-code
  upcycle extend btx-moe --expert code=code-lm --router-init mean --out btx-moe-code
"""

from __future__ import annotations

from upcycle.config import (
    ConfigError,
    add_dataclass_flags,
    add_repeated_flags,
    check_mapping,
    field_docs,
    field_types,
    load_yaml,
    merge_layers,
    normalise_keys,
)
from upcycle.upcycling.options import ExtendConfig

HELP = "add routed experts to a trained MoE from new dense models (Nexus)"

#: NAME=VALUE options that may be repeated or list several values.
REPEATED = ("expert", "domain_data")


def add_arguments(parser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None, metavar="MOE_DIR", help=field_docs(ExtendConfig).get("model")
    )
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="YAML file with any of the options below"
    )
    add_dataclass_flags(parser, ExtendConfig, skip=("model", *REPEATED))
    add_repeated_flags(parser, ExtendConfig, REPEATED)


def read_yaml(path: str) -> dict:
    """The options of an extend YAML file, every key and type checked (the one validation path)."""
    raw = normalise_keys(load_yaml(path))
    for name in REPEATED:  # `expert: {code: dir}` is as good as `expert: [code=dir]`
        if isinstance(raw.get(name), dict):
            raw[name] = [f"{k}={v}" for k, v in raw[name].items()]
    return check_mapping(raw, field_types(ExtendConfig), source=path)


def options_from_args(args) -> ExtendConfig:
    """Resolve defaults < YAML < flags into a validated ExtendConfig."""
    from upcycle.config import from_dict

    ns = dict(vars(args) if not isinstance(args, dict) else args)
    path = ns.pop("config", None)
    yaml_layer = read_yaml(path) if path else {}
    return from_dict(ExtendConfig, merge_layers(yaml_layer, ns))


def check(args) -> ExtendConfig:
    """Options, output folder and model names, checked before torch is imported."""
    from upcycle.io import check_output_dir
    from upcycle.models.loading import model_source

    cfg = options_from_args(args)
    if cfg.model is None:
        raise ConfigError("model", None, "give the trained MoE folder: upcycle extend MOE_DIR ...")
    if cfg.out is None:
        raise ConfigError("out", None, "give the output folder with --out DIR")
    check_output_dir(cfg.out, cfg.overwrite)
    model_source(cfg.model, flag="model", check_weights=True)
    for item in cfg.expert:
        model_source(item.partition("=")[2], flag="expert", check_weights=True)
    return cfg


def run(args) -> int:
    from upcycle.upcycling.extend import extend
    from upcycle.upcycling.options import parse_named

    cfg = check(args)
    result = extend(cfg)
    names = ", ".join(parse_named(cfg.expert, "expert"))
    layers = len(result.model.config.moe_layers)
    print(f"wrote {result.out} (added {names} to {layers} MoE layer{'s' if layers != 1 else ''})")
    print(result.report_line())
    return 0
