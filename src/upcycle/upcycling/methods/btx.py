"""Branch-Train-MiX (Sukhbaatar et al. 2024): experts taken from several dense models of the same
architecture, round-robin when experts outnumber sources (Drop-Upcycling §4 duplicates each of its four
sources twice for eight experts). The converter averages every non-expert weight across the sources."""

from __future__ import annotations

from upcycle.upcycling.dense import copy_into_expert
from upcycle.upcycling.registry import LayerInit, output_scale, register


@register("btx")
def btx(ctx: LayerInit) -> None:
    scale = output_scale(ctx.moe) if ctx.options.scaling else 1.0
    n = len(ctx.sources)
    for e, expert in enumerate(ctx.moe.experts):
        copy_into_expert(expert, ctx.sources[e % n], out_scale=scale)
    ctx.info["expert_sources"] = [e % n for e in range(len(ctx.moe.experts))]
