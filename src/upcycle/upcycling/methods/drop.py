"""Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261, §3.2.1).

For every expert of every MoE layer, after copying the dense MLP:

1. sample a set S of ⌊r·d_ff⌋ intermediate indices;
2. compute the mean and standard deviation of the weights at those indices (rows S of the input
   projections W_gate/W_up — GPT-2's c_fc —, columns S of the output projection W_down — c_proj);
3. re-initialise exactly those weights from N(mean, std) of each matrix, keeping all others.

``index_sharing='expert'`` (the paper) uses one S for all of an expert's matrices, so whole intermediate
units are replaced; ``'matrix'`` (the authors' released code) samples S separately per matrix.

Biases: the input-projection bias of a dropped unit is the unit's weight on a constant input, so it is
re-initialised the same way, from N(mean, std) of the dropped bias entries. The output-projection bias
belongs to no intermediate unit and is kept.
"""

from __future__ import annotations

import math

import torch

from upcycle.upcycling.dense import copy_into_expert, expert_inputs
from upcycle.upcycling.registry import LayerInit, output_scale, register


def _redraw(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fresh N(mean, std) samples shaped like ``values`` from its own statistics (float32 maths)."""
    v = values.float()
    std, mean = torch.std_mean(v, unbiased=False) if v.numel() > 1 else (torch.zeros(()), v.mean())
    return torch.normal(float(mean), float(std), v.shape, generator=generator).to(values.dtype)


@register("drop")
@torch.no_grad()
def drop(ctx: LayerInit) -> None:
    opts = ctx.options
    F_ = ctx.dense.intermediate_size
    n = math.floor(opts.ratio * F_)
    g = ctx.generator
    scale = output_scale(ctx.moe) if opts.scaling else 1.0
    dropped: list[dict[str, torch.Tensor]] = []
    for expert in ctx.moe.experts:
        copy_into_expert(expert, ctx.dense, out_scale=scale)
        inputs = expert_inputs(expert)
        names = [*inputs, "down"]
        if n == 0:  # r = 0 is naive upcycling; draw nothing so the rest of the RNG stream matches it
            dropped.append(dict.fromkeys(names, torch.zeros(0, dtype=torch.long)))
            continue
        if opts.index_sharing == "expert":
            shared = torch.randperm(F_, generator=g)[:n].sort().values
            sets = dict.fromkeys(names, shared)
        else:
            sets = {name: torch.randperm(F_, generator=g)[:n].sort().values for name in names}
        for name, layer in inputs.items():
            S = sets[name]
            layer.weight[S] = _redraw(layer.weight[S], g)
            if layer.bias is not None:
                layer.bias[S] = _redraw(layer.bias[S], g)
        down = expert.down_proj.weight
        down[:, sets["down"]] = _redraw(down[:, sets["down"]], g)
        dropped.append(sets)
    ctx.info.update(ratio=opts.ratio, dropped_per_expert=n, dropped=dropped, output_scale=scale)
