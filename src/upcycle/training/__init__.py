"""Training on one engine: continued pretraining (``upcycle pretrain``) and fine-tuning for sequence
classification (``upcycle finetune``), with checkpoints and exact resume.

from upcycle.training import PretrainConfig, pretrain
result = pretrain(PretrainConfig(model="gpt2-moe", data="corpus.jsonl", steps=1000, out="runs/moe"))

from upcycle.training import FinetuneConfig, finetune
result = finetune(FinetuneConfig(model="runs/moe/final", train_languages="fr", out="runs/moe-fr"))

Importing the package loads only the configs; the engine (torch, Accelerate, datasets) loads on first
use of the names below, so command-line help stays fast.
"""

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "PretrainConfig": "upcycle.training.config",
    "FinetuneConfig": "upcycle.training.finetune_config",
    "NonFiniteError": "upcycle.training.loop",
    "TrainResult": "upcycle.training.loop",
    "PretrainResult": "upcycle.training.loop",
    "pretrain": "upcycle.training.pretraining",
    "finetune": "upcycle.training.finetuning",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "FinetuneConfig",
    "NonFiniteError",
    "PretrainConfig",
    "PretrainResult",
    "TrainResult",
    "finetune",
    "pretrain",
]
