"""From-scratch experts: random N(0, initializer_range) weights, zero biases; dense weights elsewhere.

This is the "from scratch" MoE baseline of Drop-Upcycling (§4: all parameters N(0, 0.02)) restricted to
the experts; attention, embeddings and norms keep the dense model's weights.
"""

from __future__ import annotations

import torch

from upcycle.upcycling.registry import LayerInit, register


@register("scratch")
@torch.no_grad()
def scratch(ctx: LayerInit) -> None:
    std = ctx.initializer_range
    for expert in ctx.moe.experts:
        for p in expert.parameters():
            if p.dim() == 2:
                p.copy_(torch.normal(0.0, std, p.shape, generator=ctx.generator).to(p.dtype))
            else:
                p.zero_()
    ctx.info["std"] = std
