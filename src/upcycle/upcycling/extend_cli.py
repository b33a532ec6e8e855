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

from upcycle.config import add_dataclass_flags, field_docs, load_yaml, merge_layers, normalise_keys
from upcycle.upcycling.options import ExtendConfig

HELP = "add routed experts to a trained MoE from new dense models (Nexus)"

#: NAME=VALUE options that may be repeated or list several values.
REPEATED = ("expert", "domain_data")


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default=None, help=field_docs(ExtendConfig).get("model"))
    parser.add_argument("--config", default=None, help="YAML file with any of the options below")
    add_dataclass_flags(parser, ExtendConfig, skip=("model", *REPEATED))
    docs = field_docs(ExtendConfig)
    for name in REPEATED:
        parser.add_argument(
            "--" + name.replace("_", "-"), action="extend", nargs="+", default=None, help=docs[name]
        )


def options_from_args(args) -> ExtendConfig:
    """Resolve defaults < YAML < flags into a validated ExtendConfig."""
    ns = dict(vars(args) if not isinstance(args, dict) else args)
    yaml_layer = normalise_keys(load_yaml(ns.pop("config"))) if ns.get("config") else {}
    ns.pop("config", None)
    return ExtendConfig(**merge_layers(yaml_layer, ns))


def run(args) -> int:
    from upcycle.config import ConfigError
    from upcycle.upcycling.extend import extend
    from upcycle.upcycling.options import parse_named

    cfg = options_from_args(args)
    if cfg.out is None:
        raise ConfigError("out", None, "give the output folder with --out DIR")
    result = extend(cfg)
    names = ", ".join(parse_named(cfg.expert, "expert"))
    layers = len(result.model.config.moe_layers)
    print(f"wrote {result.out} (added {names} to {layers} MoE layer{'s' if layers != 1 else ''})")
    print(result.report_line())
    return 0
