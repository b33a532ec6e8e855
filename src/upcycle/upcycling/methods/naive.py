"""Naive sparse upcycling (Komatsuzaki et al. 2023): every expert is a copy of the dense MLP."""

from __future__ import annotations

from upcycle.upcycling.dense import copy_into_expert
from upcycle.upcycling.registry import LayerInit, output_scale, register


@register("naive")
def naive(ctx: LayerInit) -> None:
    scale = output_scale(ctx.moe) if ctx.options.scaling else 1.0
    for expert in ctx.moe.experts:
        copy_into_expert(expert, ctx.dense, out_scale=scale)
    ctx.info["output_scale"] = scale
