"""Registry of expert-initialisation methods: ``upcycle convert --method NAME``.

A method fills the routed experts (and, for granular upcycling, the router) of one MoE layer from the
dense MLP(s) of that layer. Everything else in the model is copied (or, for BTX, averaged) by the
converter before methods run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from upcycle.config import ConfigError
from upcycle.moe import MoE
from upcycle.upcycling.dense import DenseMLP


@dataclass
class LayerInit:
    """What a method gets for one MoE layer."""

    layer: int
    moe: MoE
    sources: list[DenseMLP]
    """The layer's dense MLP in every source model (one, except for btx)."""
    generator: torch.Generator
    options: object
    """The UpcycleConfig of the conversion."""
    initializer_range: float = 0.02
    info: dict = field(default_factory=dict)
    """What the method did (e.g. re-initialised indices), returned to the converter and tests."""

    @property
    def dense(self) -> DenseMLP:
        return self.sources[0]


MethodFn = Callable[[LayerInit], None]
_METHODS: dict[str, MethodFn] = {}


def register(name: str) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> MethodFn:
    from upcycle.upcycling import methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise ConfigError("method", name, f"known methods are {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    from upcycle.upcycling import methods  # noqa: F401

    return sorted(_METHODS)


def output_scale(moe: MoE, granularity: int = 1) -> float:
    """Factor on expert output projections that makes the initial MoE output equal the dense output
    (weight scaling, He et al. 2024).

    A token picks k experts, i.e. k/G whole virtual groups (each group sums to the dense MLP); each
    group is weighted by its experts' combine weight w. With renormalised scores (or top-k-then-softmax,
    or Fan et al.'s second softmax for sequence routing) the k weights sum to 1, so the groups sum to 1/G
    of the dense output: scale by G, exact for any router. With raw softmax probabilities w ≈ 1/E for a
    near-uniform initial router, so the groups sum to about k/(G·E): scale by G·E/k, exact only for a
    perfectly uniform router.
    """
    cfg = moe.config
    if cfg.weights_sum_to_one:
        return float(granularity)
    return granularity * cfg.num_experts / cfg.top_k
