"""Continued pretraining of an upcycled MoE, a dense baseline, or a preset from scratch.

Options come from, in increasing priority: the defaults, the run's saved config.yaml (with --resume),
the YAML file given with --config (same keys as the flags, with underscores or dashes), and the flags.

Examples:
  upcycle pretrain --config configs/pretrain-report-gpt2.yaml --model gpt2-moe --out runs/moe
  upcycle pretrain --model gpt2 --out runs/dense --steps 14649 --batch-size 64 --grad-accum 4
  upcycle pretrain --model debug-moe --data corpus.jsonl --steps 200 --seq-len 128 --out runs/debug
  upcycle pretrain --out runs/moe --resume
  accelerate launch -m upcycle pretrain --config run.yaml        # DDP / FSDP / DeepSpeed
"""

from __future__ import annotations

import sys
from pathlib import Path

from upcycle.config import ConfigError, add_dataclass_flags, merge_layers, read_yaml_layer
from upcycle.io import expand_path
from upcycle.training.config import PretrainConfig

HELP = "continued pretraining (C4 by default) of MoE and dense models; resumable, Accelerate-ready"

#: Fields holding a path (or a hub id); a leading ``~`` is expanded wherever they come from.
PATH_FIELDS = ("model", "tokenizer", "data", "eval_data", "out")


def preset_lines() -> str:
    """The model presets for training from scratch, one line each, for --help."""
    from upcycle.models.presets import PRESETS

    width = max(len(n) for n in PRESETS)
    lines = ["model presets (--model NAME, trained from scratch):"]
    lines += [f"  {name:<{width}}  {p.description}" for name, p in PRESETS.items()]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.epilog = preset_lines()
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="YAML file with any of the options below"
    )
    add_dataclass_flags(parser, PretrainConfig)


def _read_layer(path, cls=PretrainConfig) -> dict:
    """A YAML layer (a --config file or a run's config.yaml): every key known, every value typed."""
    return read_yaml_layer(path, cls)


def _expand_paths(values: dict) -> dict:
    return {
        k: str(expand_path(v)) if k in PATH_FIELDS and isinstance(v, str) and v.startswith("~") else v
        for k, v in values.items()
    }


def config_from_args(args, cls=PretrainConfig, command: str = "pretrain"):
    """Resolve defaults < saved run config (--resume) < YAML < flags into a validated ``cls``
    (PretrainConfig or FinetuneConfig: one resolution path for both training commands)."""
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    yaml_path = ns.pop("config", None)
    flags = {k: v for k, v in ns.items() if k in cls.__dataclass_fields__}
    yaml_layer = _read_layer(yaml_path, cls) if yaml_path else {}
    top = _expand_paths(merge_layers(yaml_layer, flags))
    saved: dict = {}
    if top.get("resume") and top.get("out"):
        run_dir = expand_path(top["out"])
        if (run_dir / "config.yaml").is_file():
            check_command(run_dir, command, top["out"])
            saved = _read_layer(run_dir / "config.yaml", cls)
    merged = _expand_paths(merge_layers(saved, yaml_layer, flags))
    from upcycle.config import from_dict

    return from_dict(cls, merged)


def preflight_model_and_out(cfg) -> None:
    """The checks pretrain and finetune share: --out is not a file; the model (unless the run resumes)
    and the tokenizer name something that exists, with readable weights (issue 11)."""
    from upcycle.models.loading import check_tokenizer_name, model_source
    from upcycle.models.presets import PRESETS

    out = expand_path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", cfg.out, "exists and is not a folder")
    checkpoints = out / "checkpoints"
    resuming = cfg.resume and checkpoints.is_dir() and any(checkpoints.iterdir())
    if not resuming and cfg.model not in PRESETS:
        model_source(cfg.model, flag="model", check_weights=True)
    if cfg.tokenizer:
        check_tokenizer_name(cfg.tokenizer)


def preflight(cfg: PretrainConfig) -> None:
    """What can be checked before the run folder is touched: a mistyped model, tokenizer or data name, a
    truncated weights file, an empty data file, an --out that is a file (issue 11)."""
    from upcycle.data.sources import resolve_source
    from upcycle.models.loading import check_dataset_name

    preflight_model_and_out(cfg)
    for field, name, split in (
        ("data", cfg.data, cfg.data_split),
        ("eval_data", cfg.eval_data, cfg.eval_split),
    ):
        if name is None or (field == "eval_data" and name.lower() == "none"):
            continue
        config = cfg.resolved_data_config if field == "data" else None
        spec = resolve_source(name, config, split, cfg.text_field, field=field)
        if not spec.is_local:
            check_dataset_name(name, flag=field, local="file or folder")


def check(args) -> PretrainConfig:
    """The resolved options and the names and files they point to, checked before torch is imported."""
    cfg = config_from_args(args)
    cfg.check_runnable()
    preflight(cfg)
    return cfg


def check_command(run_dir: Path, command: str, given: str) -> None:
    """A run folder is resumed by the command that started it (run.json says which)."""
    from upcycle.training.rundir import read_run_info

    other = read_run_info(run_dir).get("command", "pretrain")
    if other != command:
        raise ConfigError(
            "out", given, f"holds an 'upcycle {other}' run; resume it with upcycle {other} --resume"
        )


def exit_status(run_training, cfg) -> int:
    """Run ``run_training(cfg)``: 1 for a non-finite stop, 128 + N when signal N stopped it, else 0."""
    from upcycle.training.loop import NonFiniteError

    try:
        result = run_training(cfg)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.stopped_by is not None:
        # The shell's convention for "ended by signal N" (143 for SIGTERM, 130 for SIGINT): the run is not
        # finished, so a following `&& next-command` does not run on a half-trained model.
        return 128 + int(result.stopped_by)
    return 0


def run(args) -> int:
    from upcycle.training.pretraining import pretrain

    return exit_status(pretrain, check(args))
