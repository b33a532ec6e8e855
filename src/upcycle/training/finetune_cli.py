"""Fine-tune an upcycled MoE or a dense model for sequence classification (XNLI by default).

Options come from, in increasing priority: the defaults, the run's saved config.yaml (with --resume),
the YAML file given with --config (same keys as the flags, with underscores or dashes), and the flags.
Defaults follow Hugging Face's run_xnli.py (max length 128, lr 5e-5, 2 epochs, batch 32).

Examples:
  upcycle finetune --model gpt2-moe --train-languages fr --out runs/moe-fr
  upcycle finetune --model runs/moe/final --train-languages en,fr,es --out runs/moe-enfres
  upcycle finetune --model gpt2 --train-languages all --epochs 1 --out runs/dense-all
  upcycle finetune --model gpt2-moe --freeze router --aux-loss-weight 0 --out runs/moe-frozen-router
  upcycle finetune --model gpt2 --data google-research-datasets/paws-x --train-languages en \\
      --text-fields sentence1,sentence2 --out runs/pawsx
  upcycle finetune --model gpt2 --data nyu-mll/glue --train-languages mnli --eval-split validation_matched \\
      --out runs/mnli
  upcycle finetune --out runs/moe-fr --resume
  accelerate launch -m upcycle finetune --config run.yaml        # DDP / FSDP / DeepSpeed
"""

from __future__ import annotations

from upcycle.config import ConfigError, add_dataclass_flags
from upcycle.training.finetune_config import FinetuneConfig, resolve_languages

HELP = "fine-tune MoE and dense models for classification (XNLI by default); resumable, keeps the best"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of the options below")
    add_dataclass_flags(parser, FinetuneConfig)


def config_from_args(args) -> FinetuneConfig:
    from upcycle.training.cli import config_from_args as resolve

    return resolve(args, FinetuneConfig, "finetune")


def check(args) -> FinetuneConfig:
    """The resolved options and the model, tokenizer and data they name, checked before torch is imported
    (the same checks as pretrain's; issue 11)."""
    cfg = config_from_args(args)
    preflight(cfg)
    return cfg


def preflight(cfg: FinetuneConfig) -> None:
    """What can be checked before the run folder is touched: the model, tokenizer, languages and data
    (also what ``upcycle run`` checks before each fine-tuning it starts)."""
    from upcycle.data.xnli import is_local
    from upcycle.io import expand_path
    from upcycle.models.loading import check_dataset_name
    from upcycle.training.cli import preflight_model_and_out

    cfg.check_runnable()
    preflight_model_and_out(cfg)
    resolve_languages(cfg)  # an unknown language or a missing language folder, before the hub is asked
    if is_local(cfg.data) and not expand_path(cfg.data).is_dir():
        raise ConfigError("data", cfg.data, "no such folder")
    check_dataset_name(cfg.data)


def run(args) -> int:
    from upcycle.training.cli import exit_status
    from upcycle.training.finetuning import finetune

    return exit_status(finetune, check(args))
