"""Granular upcycling with virtual groups and weight scaling (He et al. 2024, arXiv 2410.07524).

With granularity G the dense MLP's d_ff intermediate units are split into G contiguous shards, and each
expert is one shard (intermediate size d_ff/G). Experts form E/G *virtual groups* of G consecutive
experts, each group holding the G shards once, i.e. one complete copy of the dense MLP. The router row
of every expert in a group is the group's row (rows repeated per virtual group; for a 2-layer MLP router,
the rows of its output layer), so the experts of a group always score the same and top-k (k a multiple
of G) picks whole groups. A token's output is then Σ over chosen groups of (group weight · dense MLP),
and :func:`output_scale` on the output projections brings the initial MoE output to the dense output.
Each shard carries 1/G of the output bias, so a group carries the bias once.
"""

from __future__ import annotations

import torch

from upcycle.moe.router import init_router_weight
from upcycle.upcycling.dense import copy_into_expert
from upcycle.upcycling.registry import LayerInit, output_scale, register


@register("granular")
@torch.no_grad()
def granular(ctx: LayerInit) -> None:
    G = ctx.options.granularity
    moe = ctx.moe
    E = moe.config.num_experts
    F_ = ctx.dense.intermediate_size
    if F_ % G:
        raise ValueError(f"granularity {G} does not divide the dense intermediate size {F_}")
    shard = F_ // G
    scale = output_scale(moe, G) if ctx.options.scaling else 1.0
    for e, expert in enumerate(moe.experts):
        s = e % G
        copy_into_expert(
            expert,
            ctx.dense,
            units=slice(s * shard, (s + 1) * shard),
            out_scale=scale,
            out_bias_scale=scale / G,
        )
    router = moe.router
    if router is not None:
        # ``router.weight`` is the matrix that produces the logits for a linear and an MLP router alike
        # (an MLP router's hidden layer is shared by all experts), so repeating its rows gives the experts
        # of a group identical logits with either router. Its bias and noise weights start at zero.
        base = torch.empty(E // G, router.weight.shape[1], dtype=torch.float32)
        init_router_weight(base, moe.config.router_init_spec, ctx.generator)
        router.weight.copy_(base.repeat_interleave(G, dim=0).to(router.weight.dtype))
    ctx.info.update(granularity=G, shard_size=shard, output_scale=scale, virtual_groups=E // G)
