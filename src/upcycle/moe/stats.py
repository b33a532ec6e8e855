"""Routing statistics owned by each MoE layer, counted in training and evaluation alike.

Counts accumulate as tensors on the device of the routing (no host sync per step) until
:meth:`RouterStats.reset`. They are plain attributes, not module buffers: they are not weights, must not
be saved with a checkpoint, and must not be left uninitialised when Hugging Face builds a model on the
meta device before loading its weights. Only non-padding tokens are counted.
"""

from __future__ import annotations

import math

import torch


class RouterStats:
    """Accumulated routing counts of one MoE layer.

    - ``tokens_per_expert`` (E,): token→expert assignments that were computed (a token routed to K experts
      counts K times; dropped assignments are not included).
    - ``dropped``: assignments dropped by the capacity limit.
    - ``tokens``: non-padding tokens seen.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self, device: torch.device | str | None = None) -> None:
        if device is None:
            # Explicit: a model built under `with torch.device("meta")` (HF loading) must not get meta counts.
            current = getattr(self, "tokens_per_expert", None)
            device = current.device if current is not None and current.device.type != "meta" else "cpu"
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=device)
        self.dropped = torch.zeros((), dtype=torch.long, device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, counts_E: torch.Tensor, dropped: torch.Tensor | int, tokens: torch.Tensor | int) -> None:
        if self.tokens_per_expert.device != counts_E.device:
            self.tokens_per_expert = self.tokens_per_expert.to(counts_E.device)
            self.dropped = self.dropped.to(counts_E.device)
            self.tokens = self.tokens.to(counts_E.device)
        self.tokens_per_expert += counts_E.long()
        self.dropped += dropped
        self.tokens += tokens

    def fraction(self) -> torch.Tensor:
        """Fraction of assignments per expert (sums to 1; all zeros before any token)."""
        counts = self.tokens_per_expert.detach().float().cpu()
        total = counts.sum()
        return counts / total if total > 0 else counts

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
        computed = int(self.tokens_per_expert.sum())
        dropped = int(self.dropped)
        return {
            "tokens": int(self.tokens),
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "fraction": [round(float(x), 6) for x in self.fraction()],
            "balance": self.balance(),
            "max_violation": self.max_violation(),
            "dropped": dropped,
            "dropped_fraction": dropped / (computed + dropped) if computed + dropped else 0.0,
        }
