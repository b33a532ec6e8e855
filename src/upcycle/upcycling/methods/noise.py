"""Noise upcycling (a Drop-Upcycling baseline): copy the dense MLP, then add N(0, σ) noise to part of
each expert's weights (biases untouched) to break the symmetry between experts.

``noise_mode='units'`` is the Drop-Upcycling paper's baseline: per weight matrix, ⌊r·d_ff⌋ intermediate
units (rows of W_gate/W_up — GPT-2's c_fc —, columns of W_down — c_proj —) sampled separately for each
matrix, every entry of those units perturbed (the paper: σ = 0.02, r = 0.5; preset
``drop-upcycling-noise``). ``'entries'`` perturbs a random fraction of individual weight entries.
"""

from __future__ import annotations

import math

import torch

from upcycle.upcycling.dense import copy_into_expert, expert_inputs
from upcycle.upcycling.registry import LayerInit, output_scale, register


def _unit_noise(weight: torch.Tensor, units: torch.Tensor, std: float, dim: int, g) -> None:
    """Add N(0, std) to the intermediate ``units`` of ``weight`` (rows if dim=0, columns if dim=1)."""
    part = weight.index_select(dim, units)
    noise = torch.normal(0.0, std, part.shape, generator=g).to(weight.dtype)
    weight.index_add_(dim, units, noise)


@register("noise")
@torch.no_grad()
def noise(ctx: LayerInit) -> None:
    opts = ctx.options
    scale = output_scale(ctx.moe) if opts.scaling else 1.0
    g = ctx.generator
    F_ = ctx.moe.config.intermediate_size
    n_units = math.floor(opts.noise_fraction * F_)
    perturbed: list[dict[str, torch.Tensor]] = []
    for expert in ctx.moe.experts:
        copy_into_expert(expert, ctx.dense, out_scale=scale)
        if opts.noise_mode == "units":
            matrices = {name: (layer.weight, 0) for name, layer in expert_inputs(expert).items()}
            matrices["down"] = (expert.down_proj.weight, 1)
            sets = {}
            for name, (weight, dim) in matrices.items():
                sets[name] = torch.randperm(F_, generator=g)[:n_units].sort().values
                _unit_noise(weight, sets[name], opts.noise_std, dim, g)
            perturbed.append(sets)
            continue
        for p in expert.parameters():
            if p.dim() != 2:
                continue
            mask = torch.rand(p.shape, generator=g) < opts.noise_fraction
            p.add_((torch.normal(0.0, opts.noise_std, p.shape, generator=g) * mask).to(p.dtype))
    ctx.info.update(
        noise_std=opts.noise_std,
        noise_fraction=opts.noise_fraction,
        noise_mode=opts.noise_mode,
        output_scale=scale,
    )
    if perturbed:
        ctx.info["perturbed_units"] = perturbed
