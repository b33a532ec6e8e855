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

from upcycle.config import ConfigError, add_dataclass_flags, load_yaml, merge_layers, normalise_keys
from upcycle.training.config import PretrainConfig

HELP = "continued pretraining (C4 by default) of MoE and dense models; resumable, Accelerate-ready"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of the options below")
    add_dataclass_flags(parser, PretrainConfig)


def config_from_args(args, cls=PretrainConfig, command: str = "pretrain"):
    """Resolve defaults < saved run config (--resume) < YAML < flags into a validated ``cls``."""
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    yaml_path = ns.pop("config", None)
    flags = {k: v for k, v in ns.items() if k in cls.__dataclass_fields__}
    yaml_layer = normalise_keys(load_yaml(yaml_path)) if yaml_path else {}
    top = merge_layers(yaml_layer, flags)
    saved: dict = {}
    if top.get("resume") and top.get("out"):
        run_dir = Path(top["out"]).expanduser()
        saved_path = run_dir / "config.yaml"
        if saved_path.is_file():
            check_command(run_dir, command, top["out"])
            saved = normalise_keys(load_yaml(saved_path))
    merged = merge_layers(saved, yaml_layer, flags)
    return cls.from_dict(merged)


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

    return exit_status(pretrain, config_from_args(args))
