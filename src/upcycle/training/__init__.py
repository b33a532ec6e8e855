"""Training: continued pretraining on Accelerate (``upcycle pretrain``), checkpoints, resume.

from upcycle.training import PretrainConfig, pretrain
result = pretrain(PretrainConfig(model="gpt2-moe", data="corpus.jsonl", steps=1000, out="runs/moe"))
"""

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "PretrainConfig": "upcycle.training.config",
    "NonFiniteError": "upcycle.training.loop",
    "PretrainResult": "upcycle.training.loop",
    "pretrain": "upcycle.training.loop",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "NonFiniteError",
    "PretrainConfig",
    "PretrainResult",
    "pretrain",
]
