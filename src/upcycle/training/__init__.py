"""Training: continued pretraining on Accelerate (``upcycle pretrain``), checkpoints, resume.

from upcycle.training import PretrainConfig, pretrain
result = pretrain(PretrainConfig(model="gpt2-moe", data="corpus.jsonl", steps=1000, out="runs/moe"))
"""

from upcycle.training.config import PretrainConfig
from upcycle.training.loop import NonFiniteError, PretrainResult, pretrain

__all__ = ["NonFiniteError", "PretrainConfig", "PretrainResult", "pretrain"]
