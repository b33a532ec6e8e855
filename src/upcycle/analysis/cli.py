"""Study trained models and runs: ``routing`` (which experts the tokens of each language, NLI label or text
domain go to, per MoE layer) or ``training`` (loss curves, expert activation over training, validation
accuracy per language, from run folders).

Examples:
  upcycle analyze routing runs/moe/final runs/moe-ft/best --data facebook/xnli --languages en,fr,es --out analysis/xnli
  upcycle analyze routing moe-fr --group-by label --languages fr --max-tokens 50000 --out analysis/labels
  upcycle analyze routing naive/final drop/final --domain en=c4-val.jsonl --domain code=stack.jsonl --out analysis/domains
  upcycle analyze training runs/moe runs/dense --out analysis/training
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from upcycle.analysis.config import RoutingAnalysisConfig, TrainingAnalysisConfig
from upcycle.config import ConfigError, UserError, add_dataclass_flags, split_commas

HELP = "routing per language / label / domain and layer, or training curves and expert activation of runs"

_SHARED = ("names", "out", "overwrite")
_ROUTING_ONLY = tuple(
    f.name for f in dataclasses.fields(RoutingAnalysisConfig) if f.name not in (*_SHARED, "models")
)
_TRAINING_ONLY = tuple(
    f.name for f in dataclasses.fields(TrainingAnalysisConfig) if f.name not in (*_SHARED, "runs")
)


def add_arguments(parser) -> None:
    parser.add_argument("analysis", choices=["routing", "training"], help="what to analyse")
    parser.add_argument(
        "inputs", nargs="+", help="routing: MoE model folders or hub ids; training: run folders"
    )
    add_dataclass_flags(parser, RoutingAnalysisConfig, skip=("models", *_ROUTING_ONLY))
    routing = parser.add_argument_group("routing options")
    add_dataclass_flags(routing, RoutingAnalysisConfig, skip=("models", "domain", *_SHARED))
    routing.add_argument(
        "--domain",
        action="append",
        default=None,
        help="a text domain as NAME=SOURCE (repeat the flag): a file, a folder or a hub id (HUB_ID:CONFIG)",
    )
    training = parser.add_argument_group("training options")
    add_dataclass_flags(training, TrainingAnalysisConfig, skip=("runs", *_SHARED))


def config_from_args(args) -> RoutingAnalysisConfig | TrainingAnalysisConfig:
    """The analysis's config from the parsed flags; a flag of the other analysis is an error."""
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    what, inputs = ns.pop("analysis"), ns.pop("inputs")
    cls, own, other = (
        (RoutingAnalysisConfig, "models", _TRAINING_ONLY)
        if what == "routing"
        else (TrainingAnalysisConfig, "runs", _ROUTING_ONLY)
    )
    for name in other:
        if ns.get(name) is not None:
            raise ConfigError(name, ns[name], f"applies to 'upcycle analyze {_other(what)}' only")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in ns.items() if k in fields and v is not None}
    if "names" in values:  # --names a b, or --names a,b (as in every command)
        values["names"] = split_commas(values["names"])
    return cls(**{own: list(inputs)}, **values)


def check(args) -> RoutingAnalysisConfig | TrainingAnalysisConfig:
    """The options, the output folder and the model and data names, checked before torch is imported
    (issue 11); the models' configs are read in ``run``."""
    from upcycle.io import check_output_dir

    cfg = config_from_args(args)
    check_output_dir(cfg.out, cfg.overwrite)
    if isinstance(cfg, RoutingAnalysisConfig):
        check_routing_names(cfg)
    return cfg


def check_routing_names(cfg: RoutingAnalysisConfig) -> None:
    """Model folders (that they have MoE layers) or hub ids, XNLI language codes, and hub dataset names
    while the hub is unreachable."""
    from upcycle.analysis.routing import routing_problem
    from upcycle.analysis.routing_data import languages_of, parse_domain
    from upcycle.data.sources import resolve_source
    from upcycle.models.loading import check_dataset_name, model_source

    for name in cfg.models:
        source = Path(model_source(name, flag="models"))
        try:
            config = json.loads((source / "config.json").read_text())
        except (OSError, ValueError):  # a hub id, or an unreadable file: run() reports it
            continue
        problem = routing_problem(name, config) if isinstance(config, dict) else None
        if problem is not None:
            raise UserError(problem)
    if cfg.group_by != "domain":
        languages_of(cfg.data, cfg.languages)
        check_dataset_name(cfg.data)
        return
    for spec in cfg.domain or []:
        _, source, config = parse_domain(spec)
        if not resolve_source(source, config, cfg.split, cfg.text_field, field="domain").is_local:
            check_dataset_name(source, flag="domain", local="file or folder")


def _other(what: str) -> str:
    return "training" if what == "routing" else "routing"


def quiet_datasets() -> None:
    """datasets' per-split progress bars would surround the command's one-line errors on stderr."""
    from datasets.utils import disable_progress_bars

    disable_progress_bars()


def run(args) -> int:
    cfg = config_from_args(args)
    quiet_datasets()
    if isinstance(cfg, RoutingAnalysisConfig):
        from upcycle.analysis.routing import analyze_routing

        result = analyze_routing(cfg)
        layers = sum(len(r["layers"]) for r in result["models"].values())
        print(
            f"wrote {cfg.out}: routing of {len(result['models'])} model(s), {layers} MoE layer(s), "
            f"{len(result['groups'])} {cfg.group_by} group(s)"
        )
    else:
        from upcycle.analysis.training import analyze_training

        result = analyze_training(cfg)
        print(f"wrote {cfg.out}: {len(result['runs'])} run(s)")
    return 0
