"""Training on one engine: continued pretraining (``upcycle pretrain``) and fine-tuning for sequence
classification (``upcycle finetune``), with checkpoints and exact resume.

from upcycle.training import PretrainConfig, pretrain
result = pretrain(PretrainConfig(model="gpt2-moe", data="corpus.jsonl", steps=1000, out="runs/moe"))

from upcycle.training import FinetuneConfig, finetune
result = finetune(FinetuneConfig(model="runs/moe/final", train_languages="fr", out="runs/moe-fr"))

Importing the package loads only the configs; the engine (torch, Accelerate, datasets) loads on first
use of the names below, so command-line help stays fast.
"""

from upcycle.training.config import PretrainConfig
from upcycle.training.finetune_config import FinetuneConfig

_LAZY = {
    "NonFiniteError": "upcycle.training.loop",
    "TrainResult": "upcycle.training.loop",
    "PretrainResult": "upcycle.training.loop",
    "pretrain": "upcycle.training.pretraining",
    "finetune": "upcycle.training.finetuning",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FinetuneConfig",
    "NonFiniteError",
    "PretrainConfig",
    "PretrainResult",
    "TrainResult",
    "finetune",
    "pretrain",
]
