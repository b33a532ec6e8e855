"""Registry of expert-initialisation methods: ``upcycle convert --method NAME``.

A method fills the routed experts (and, for granular upcycling, the router) of one MoE layer from the
dense MLP(s) of that layer. Everything else in the model is copied (or, for BTX, averaged) by the
converter before methods run. A method may also register a ``prepare`` step that runs once per
conversion before any layer (Nexus computes its domain embeddings there): see :class:`Prepared`.
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
    """What the method did (e.g. re-initialised indices), returned to the converter and tests. A method that
    fills the shared experts itself sets ``info["shared_experts"]`` so the converter leaves them alone."""
    prepared: dict = field(default_factory=dict)
    """``Prepared.data`` of the method's prepare step (empty for most methods)."""

    @property
    def dense(self) -> DenseMLP:
        return self.sources[0]


@dataclass
class Prepared:
    """What a method's prepare step decides once per conversion, before the layers are built."""

    moe: dict = field(default_factory=dict)
    """MoEConfig fields it sets (Nexus: the domain embedding size)."""
    upcycling: dict = field(default_factory=dict)
    """Entries added to the checkpoint's ``upcycling`` record."""
    merge: list | None = None
    """The sources whose non-MoE weights are averaged (None: all of them)."""
    data: dict = field(default_factory=dict)
    """Handed to every layer's :class:`LayerInit` as ``prepared``."""


MethodFn = Callable[[LayerInit], None]
PrepareFn = Callable[[object, list], Prepared]
_METHODS: dict[str, MethodFn] = {}
_PREPARE: dict[str, PrepareFn] = {}


def register(name: str, prepare: PrepareFn | None = None) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        if prepare is not None:
            _PREPARE[name] = prepare
        return fn

    return wrap


def prepare(name: str, options: object, sources: list) -> Prepared:
    """Run method ``name``'s prepare step on the loaded sources (an empty :class:`Prepared` if it has none)."""
    get_method(name)
    step = _PREPARE.get(name)
    return step(options, sources) if step is not None else Prepared()


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
