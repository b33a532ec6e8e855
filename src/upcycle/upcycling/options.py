"""UpcycleConfig: everything ``upcycle convert`` needs, validated early, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from upcycle.config import ConfigError, check_literals, to_dict
from upcycle.moe.config import MoEConfig

Method = Literal["naive", "drop", "noise", "granular", "scratch", "btx"]
METHODS: tuple[str, ...] = ("naive", "drop", "noise", "granular", "scratch", "btx")

#: MoEConfig fields that come from the dense source, not from the user.
DERIVED_MOE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "expert_type",
    "activation",
    "expert_bias",
    "dropout",
)
#: Options that only some methods read (the others apply to every method): refused on the command line
#: with another method, and left out of upcycling.json when unused (issue 11).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "ratio": ("drop",),
    "index_sharing": ("drop",),
    "noise_std": ("noise",),
    "noise_fraction": ("noise",),
    "granularity": ("granular",),
}
#: MoEConfig fields exposed by UpcycleConfig under a shorter name (the issue's CLI flags).
RENAMED = {"num_experts": "experts", "router_jitter": "jitter", "num_shared_experts": "shared_experts"}


@dataclass
class UpcycleConfig:
    """Options of ``upcycle convert``: the source, the method and the MoE layout."""

    model: list[str] = field(default_factory=lambda: ["gpt2"])
    """Dense source(s): Hugging Face hub ids or local folders. Several sources only with method 'btx'."""
    method: Method = "drop"
    """Expert initialisation: naive | drop | noise | granular | scratch | btx."""
    out: str | None = None
    """Output folder (a standard Hugging Face checkpoint folder)."""
    overwrite: bool = False
    """Replace the output folder if it exists."""
    seed: int = 0
    """Seed of every random choice (router init, dropped indices, re-initialised values)."""
    layers: str = "all"
    """Which decoder layers become MoE: 'all', 'every_other' (1, 3, 5, … as in Switch/GShard and
    Qwen2-MoE's sparse step 2) or a comma-separated list of indices."""
    experts: int = 8
    """Number of routed experts per MoE layer."""
    top_k: int = 2
    """Experts per token."""
    ratio: float = 0.5
    """drop: re-initialisation ratio r in [0, 1] (Drop-Upcycling's best is 0.5)."""
    index_sharing: Literal["expert", "matrix"] = "expert"
    """drop: one index set per expert shared by its matrices (paper), or one per matrix (released code)."""
    noise_std: float = 0.01
    """noise: standard deviation σ of the added N(0, σ) noise (the Drop-Upcycling paper's baseline: 0.02)."""
    noise_fraction: float = 0.5
    """noise: fraction r of each expert's weight entries ('entries') or intermediate units ('units') that
    receive noise."""
    noise_mode: Literal["entries", "units"] = "entries"
    """noise: 'entries' perturbs a random fraction of individual weight entries; 'units' perturbs every
    entry of ⌊r·d_ff⌋ intermediate units per matrix, sampled per matrix (the Drop-Upcycling paper's noise
    baseline; preset drop-upcycling-noise)."""
    granularity: int = 1
    """granular: G shards of the dense MLP per expert (expert intermediate size d_ff / G)."""
    weight_scaling: bool | None = None
    """Scale expert output projections so the initial MoE output matches the dense one (He et al. 2024).
    Default: on for 'granular', off otherwise."""
    score_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """Router scoring order (see MoEConfig.score_order)."""
    renormalize: bool = True
    """Renormalise the kept top-k probabilities (see MoEConfig.renormalize)."""
    router_init: str = "normal:0.02"
    """Router initialisation: normal:STD, uniform:A or zeros."""
    jitter: float = 0.0
    """Router jitter ε (multiplicative noise on the router input in training)."""
    shared_experts: int = 0
    """Shared experts (always active), initialised as copies of the dense MLP."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss, on its mean over MoE layers (Switch/Megatron per-layer sum:
    divide by the number of layers; Hugging Face's router_aux_loss_coef: divide by top_k)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss."""
    moe: dict = field(default_factory=dict)
    """Any other MoEConfig field (router_type, routing_unit, capacity_factor, global_routing, …)."""
    probe_batch: int = 4
    """Function-preservation probe: number of sequences."""
    probe_length: int = 64
    """Function-preservation probe: tokens per sequence."""
    preset: str | None = None
    """Name of the preset these options started from (informational)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        if not self.model:
            raise ConfigError("model", self.model, "give at least one dense source")
        if self.method != "btx" and len(self.model) != 1:
            raise ConfigError(
                "model", self.model, f"method '{self.method}' takes exactly one source (btx takes several)"
            )
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError("ratio", self.ratio, "must be in [0, 1]")
        if self.experts < 1:
            raise ConfigError("experts", self.experts, "must be a positive integer")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError("top_k", self.top_k, f"must be in [1, experts={self.experts}]")
        if self.granularity < 1:
            raise ConfigError("granularity", self.granularity, "must be a positive integer")
        if self.method != "granular" and self.granularity != 1:
            raise ConfigError("granularity", self.granularity, "only method 'granular' shards experts")
        if self.method == "granular":
            G = self.granularity
            if self.experts % G:
                raise ConfigError("experts", self.experts, f"must be a multiple of granularity={G}")
            if self.top_k % G:
                raise ConfigError(
                    "top_k",
                    self.top_k,
                    f"must be a multiple of granularity={G} so whole virtual groups are chosen",
                )
        if self.noise_std < 0:
            raise ConfigError("noise_std", self.noise_std, "must be ≥ 0")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ConfigError("noise_fraction", self.noise_fraction, "must be in [0, 1]")
        bad = sorted(set(self.moe) & (set(DERIVED_MOE_FIELDS) | set(RENAMED)))
        if bad:
            hint = RENAMED.get(bad[0])
            allowed = f"use --{hint.replace('_', '-')}" if hint else "it is taken from the dense source"
            raise ConfigError(f"moe.{bad[0]}", self.moe[bad[0]], allowed)
        known = {f.name for f in dataclasses.fields(MoEConfig)}
        unknown = sorted(set(self.moe) - known)
        if unknown:
            raise ConfigError(
                f"moe.{unknown[0]}",
                self.moe[unknown[0]],
                f"unknown MoE field; known: {', '.join(sorted(known))}",
            )
        if self.probe_batch < 1 or self.probe_length < 1:
            raise ConfigError("probe_batch", self.probe_batch, "probe batch and length must be positive")

    @property
    def scaling(self) -> bool:
        return self.method == "granular" if self.weight_scaling is None else self.weight_scaling

    def moe_fields(self) -> dict:
        """The user-chosen MoEConfig fields (everything but what the dense source decides)."""
        return {
            "num_experts": self.experts,
            "top_k": self.top_k,
            "score_order": self.score_order,
            "renormalize": self.renormalize,
            "router_init": self.router_init,
            "router_jitter": self.jitter,
            "num_shared_experts": self.shared_experts,
            "aux_loss_weight": self.aux_loss_weight,
            "z_loss_weight": self.z_loss_weight,
            **self.moe,
        }

    def to_dict(self) -> dict:
        return to_dict(self)


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """'all' | 'every_other' (1, 3, 5, …) | '0,2,5' → sorted indices, checked against the model depth."""
    if isinstance(spec, (list, tuple)):
        layers = [int(i) for i in spec]
    elif spec == "all":
        layers = list(range(num_layers))
    elif spec == "every_other":
        layers = list(range(1, num_layers, 2))
    else:
        try:
            layers = [int(tok) for tok in str(spec).split(",") if tok.strip()]
        except ValueError:
            raise ConfigError(
                "layers", spec, "expected 'all', 'every_other' or a comma list of indices"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ConfigError(
            "layers", spec, f"layer indices must be in [0, {num_layers - 1}] (the model has {num_layers})"
        )
    if len(set(layers)) != len(layers):
        raise ConfigError("layers", spec, "layer indices must be unique")
    return sorted(layers)


#: Named settings. ``report-gpt2`` is the founding report's conversion: GPT-2, 8 experts, top-1
#: (Switch-style: the expert output is multiplied by its router probability), MoE in every other layer,
#: Drop-Upcycling with r=0.15, load-balancing weight 0.01, router jitter 0.01.
PRESETS: dict[str, dict] = {
    "report-gpt2": dict(
        model=["gpt2"],
        method="drop",
        experts=8,
        top_k=1,
        layers="every_other",
        ratio=0.15,
        renormalize=False,
        aux_loss_weight=0.01,
        jitter=0.01,
    ),
    # Nakamura et al. 2025: 8 experts, top-2, every FFN, r = 0.5, softmax over the top-2 logits (equal to
    # Mixtral's renormalised softmax-then-top-k), router init U(-0.0346, 0.0346) (App. C.1: std 0.02; the
    # released code's torch_rand_002), load-balancing coefficient 0.02 (§4; the paper does not say
    # whether per layer summed or averaged: with L MoE layers a per-layer sum is 0.02·L here).
    "drop-upcycling": dict(
        method="drop",
        experts=8,
        top_k=2,
        layers="all",
        ratio=0.5,
        renormalize=True,
        router_init="uniform:0.0346",
        aux_loss_weight=0.02,
    ),
    # The same paper's noise baseline: N(0, 0.02) added to r = 0.5 of the intermediate units per matrix.
    "drop-upcycling-noise": dict(
        method="noise",
        experts=8,
        top_k=2,
        layers="all",
        noise_mode="units",
        noise_std=0.02,
        noise_fraction=0.5,
        renormalize=True,
        router_init="uniform:0.0346",
        aux_loss_weight=0.02,
    ),
    # Komatsuzaki et al. 2023 with Mixtral routing: exact function preservation at initialisation.
    "naive": dict(method="naive", experts=8, top_k=2, layers="all", renormalize=True),
    # He et al. 2024: granular experts with virtual groups and weight scaling (E64 G8 T8 scaled down).
    "granular-e16g4t4": dict(method="granular", experts=16, top_k=4, granularity=4, renormalize=False),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError("preset", name, f"known presets are {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name], preset=name)
