"""Learning-rate schedules: linear warm-up, then cosine, linear or constant to ``min_lr``.

The schedule is a pure function of the optimizer step, so the LambdaLR that applies it is restored
exactly on resume, and it is stepped once per optimizer step whatever the number of processes
(Accelerate's prepared scheduler would step it once per process).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int, schedule: str) -> float:
    """Learning rate used by optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    decay_steps = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_lambda(*, lr: float, min_lr: float, warmup: int, steps: int, schedule: str) -> Callable[[int], float]:
    """The multiplier of the base lr for ``torch.optim.lr_scheduler.LambdaLR``."""

    def factor(step: int) -> float:
        return lr_at(step, lr=lr, min_lr=min_lr, warmup=warmup, steps=steps, schedule=schedule) / lr

    return factor


def make_scheduler(optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(**kwargs))
