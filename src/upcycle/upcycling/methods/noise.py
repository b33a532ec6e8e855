"""Noise upcycling (a Drop-Upcycling baseline): copy the dense MLP, then add N(0, σ) noise to a random
fraction of each expert's weight entries (biases untouched) to break the symmetry between experts."""

from __future__ import annotations

import torch

from upcycle.upcycling.dense import copy_into_expert
from upcycle.upcycling.registry import LayerInit, output_scale, register


@register("noise")
@torch.no_grad()
def noise(ctx: LayerInit) -> None:
    opts = ctx.options
    scale = output_scale(ctx.moe) if opts.scaling else 1.0
    g = ctx.generator
    for expert in ctx.moe.experts:
        copy_into_expert(expert, ctx.dense, out_scale=scale)
        for p in expert.parameters():
            if p.dim() != 2:
                continue
            mask = torch.rand(p.shape, generator=g) < opts.noise_fraction
            p.add_((torch.normal(0.0, opts.noise_std, p.shape, generator=g) * mask).to(p.dtype))
    ctx.info.update(noise_std=opts.noise_std, noise_fraction=opts.noise_fraction, output_scale=scale)
