"""Routing statistics owned by each MoE layer, counted in training and evaluation alike.

Counts are kept as non-persistent buffers (they follow ``.to(device)`` but are not saved with the
weights) and accumulate until :meth:`RouterStats.reset`. Only non-padding tokens are counted.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RouterStats(nn.Module):
    """Accumulated routing counts of one MoE layer.

    - ``tokens_per_expert`` (E,): token→expert assignments that were computed (a token routed to K experts
      counts K times; dropped assignments are not included).
    - ``dropped``: assignments dropped by the capacity limit.
    - ``tokens``: non-padding tokens seen.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def update(self, counts_E: torch.Tensor, dropped: torch.Tensor | int, tokens: torch.Tensor | int) -> None:
        self.tokens_per_expert += counts_E.to(self.tokens_per_expert.device, torch.long)
        self.dropped += dropped
        self.tokens += tokens

    def reset(self) -> None:
        self.tokens_per_expert.zero_()
        self.dropped.zero_()
        self.tokens.zero_()

    def fraction(self) -> torch.Tensor:
        """Fraction of assignments per expert (sums to 1; all zeros before any token)."""
        total = self.tokens_per_expert.sum()
        if total == 0:
            return torch.zeros(self.num_experts, dtype=torch.float32)
        return (self.tokens_per_expert.float() / total.float()).cpu()

    def balance(self) -> float:
        """Normalised entropy of the expert fractions: 1.0 perfectly balanced, 0.0 all on one expert."""
        f = self.fraction()
        if self.num_experts == 1 or f.sum() == 0:
            return 1.0
        nz = f[f > 0]
        return float(-(nz * nz.log()).sum() / math.log(self.num_experts))

    def max_violation(self) -> float:
        """max_e f_e·E − 1: how far the busiest expert is above a perfectly even share (0 = balanced)."""
        f = self.fraction()
        if f.sum() == 0:
            return 0.0
        return float(f.max() * self.num_experts - 1)

    def summary(self) -> dict:
        """A JSON-ready snapshot: counts, fractions, balance, max violation, dropped fraction."""
        assignments = int(self.tokens_per_expert.sum()) + int(self.dropped)
        return {
            "tokens": int(self.tokens),
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "fraction": [round(float(x), 6) for x in self.fraction()],
            "balance": self.balance(),
            "max_violation": self.max_violation(),
            "dropped": int(self.dropped),
            "dropped_fraction": (int(self.dropped) / assignments) if assignments else 0.0,
        }
