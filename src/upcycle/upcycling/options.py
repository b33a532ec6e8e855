"""UpcycleConfig (``upcycle convert``) and ExtendConfig (``upcycle extend``), validated early, with named
presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from upcycle.config import ConfigError, check_literals, to_dict
from upcycle.moe.config import MoEConfig, parse_router_init

Method = Literal["naive", "drop", "noise", "granular", "scratch", "btx", "nexus"]
METHODS: tuple[str, ...] = ("naive", "drop", "noise", "granular", "scratch", "btx", "nexus")

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
    "expert": ("nexus",),
    "domain_data": ("nexus",),
    "domain_embeddings": ("nexus",),
    "embed_tokens": ("nexus",),
    "domain_text_field": ("nexus",),
}
#: What --help shows for the options whose default depends on the method (None in UpcycleConfig means
#: "not given"; UpcycleConfig._resolve_method_defaults fills them in).
SHOWN_DEFAULTS = {"experts": 8, "top_k": 2, "renormalize": True, "shared_experts": 0}
#: MoEConfig fields exposed by UpcycleConfig under a shorter name (the issue's CLI flags).
RENAMED = {"num_experts": "experts", "router_jitter": "jitter", "num_shared_experts": "shared_experts"}


@dataclass
class UpcycleConfig:
    """Options of ``upcycle convert``: the source, the method and the MoE layout."""

    model: list[str] = field(default_factory=lambda: ["gpt2"])
    """Dense source(s): Hugging Face hub ids or local folders. Several sources only with method 'btx';
    for 'nexus', the seed model (its MLP becomes the shared expert every token goes through)."""
    method: Method = "drop"
    """Expert initialisation: naive | drop | noise | granular | scratch | btx | nexus."""
    out: str | None = None
    """Output folder (a standard Hugging Face checkpoint folder)."""
    overwrite: bool = False
    """Replace the output folder if it exists."""
    seed: int = 0
    """Seed of every random choice (router init, dropped indices, re-initialised values)."""
    layers: str = "all"
    """Which decoder layers become MoE: 'all', 'every_other' (1, 3, 5, … as in Switch/GShard and
    Qwen2-MoE's sparse step 2) or a comma-separated list of indices."""
    experts: int | None = None
    """Number of routed experts per MoE layer (nexus: one per --expert)."""
    top_k: int | None = None
    """Experts per token (nexus: 1, the paper's top-1 among the routed experts)."""
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
    renormalize: bool | None = None
    """Renormalise the kept top-k probabilities (see MoEConfig.renormalize); nexus: off, the paper's
    shared + p·routed output (Gritsch et al. 2024, Fig. 2), which also lets the LM loss train
    a top-1 router."""
    router_init: str = "normal:0.02"
    """Router initialisation: normal:STD, uniform:A or zeros."""
    jitter: float = 0.0
    """Router jitter ε (multiplicative noise on the router input in training)."""
    shared_experts: int | None = None
    """Shared experts (always active), initialised as copies of the dense MLP (nexus: 1, the seed model's
    MLP)."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss, on its mean over MoE layers (Switch/Megatron per-layer sum:
    divide by the number of layers; Hugging Face's router_aux_loss_coef: divide by top_k)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss."""
    moe: dict = field(default_factory=dict)
    """Any other MoEConfig field (router_type, routing_unit, capacity_factor, global_routing, …)."""
    expert: list[str] = field(default_factory=list)
    """nexus: NAME=DIR per domain, a dense model of the seed's architecture specialised on that domain;
    its MLPs become routed expert NAME (repeat the flag or list several)."""
    domain_data: list[str] = field(default_factory=list)
    """nexus: NAME=PATH_OR_HUB per domain, text (JSON lines, Parquet, text, hub id) whose mean-pooled
    last hidden state under the seed model is the domain embedding d_NAME of the router."""
    domain_embeddings: str | None = None
    """nexus: a safetensors or .pt file mapping domain names to one vector each (any size), for the
    domains without --domain-data."""
    embed_tokens: int = 100_000
    """nexus: tokens of each domain's --domain-data averaged into its embedding."""
    domain_text_field: str = "text"
    """nexus: column holding the text in --domain-data (split 'train' of hub datasets)."""
    merge: Literal["mean", "experts", "seed"] = "mean"
    """nexus: the non-MLP weights (attention, embeddings, norms, dense layers): 'mean' over the domain
    models and the seed (as btx averages its sources), 'experts' over the domain models only (Nexus §3,
    "Merge Non-FFN params."), or 'seed' keeps the seed's."""
    probe_batch: int = 4
    """Function-preservation probe: number of sequences."""
    probe_length: int = 64
    """Function-preservation probe: tokens per sequence."""
    preset: str | None = None
    """Name of the preset these options started from (informational)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        for name in ("expert", "domain_data"):
            setattr(self, name, named_list(getattr(self, name)))
        self._resolve_method_defaults()
        self.validate()

    def _resolve_method_defaults(self) -> None:
        """Defaults that depend on the method (None means "not given")."""
        nexus = self.method == "nexus"
        if nexus:
            given = {"experts": self.experts, "shared_experts": self.shared_experts}
            want = {"experts": len(self.expert), "shared_experts": 1}
            for name, value in given.items():
                if value is not None and value != want[name]:
                    why = (
                        "one routed expert per --expert"
                        if name == "experts"
                        else "the seed's MLP is the one shared expert"
                    )
                    raise ConfigError(name, value, f"nexus builds {want[name]} ({why})")
        self.experts = (len(self.expert) if nexus else 8) if self.experts is None else self.experts
        self.top_k = (1 if nexus else 2) if self.top_k is None else self.top_k
        self.renormalize = (not nexus) if self.renormalize is None else self.renormalize
        self.shared_experts = (1 if nexus else 0) if self.shared_experts is None else self.shared_experts

    def validate(self) -> None:
        check_literals(self)
        if not self.model:
            raise ConfigError("model", self.model, "give at least one dense source")
        if self.method not in ("btx", "nexus") and len(self.model) != 1:
            raise ConfigError(
                "model", self.model, f"method '{self.method}' takes exactly one source (btx takes several)"
            )
        self._validate_nexus()
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

    def _validate_nexus(self) -> None:
        router_type = self.router_type
        if self.method != "nexus":
            for name in ("expert", "domain_data", "domain_embeddings"):
                if getattr(self, name):
                    raise ConfigError(name, getattr(self, name), "only method 'nexus' takes it")
            if self.merge != "mean":
                raise ConfigError("merge", self.merge, "only method 'nexus' chooses the merge")
            if router_type == "embedding":
                raise ConfigError(
                    "moe.router_type",
                    "embedding",
                    "the embedding router needs domain embeddings: use method 'nexus'",
                )
            return
        if len(self.model) != 1:
            raise ConfigError(
                "model", self.model, "nexus takes one seed model; give the domain models with --expert"
            )
        experts = parse_named(self.expert, "expert")
        if not experts:
            raise ConfigError("expert", self.expert, "nexus needs at least one --expert NAME=DIR")
        data = parse_named(self.domain_data, "domain_data")
        unknown = sorted(set(data) - set(experts))
        if unknown:
            raise ConfigError(
                "domain_data", unknown[0], f"names no --expert; experts are {', '.join(experts)}"
            )
        if router_type != "embedding":
            if data or self.domain_embeddings:
                field = "domain_data" if data else "domain_embeddings"
                raise ConfigError(
                    field,
                    getattr(self, field),
                    f"domain embeddings feed router_type=embedding, not {router_type}",
                )
        elif not self.domain_embeddings and len(data) < len(experts):
            missing = next(n for n in experts if n not in data)
            raise ConfigError(
                "domain_data",
                self.domain_data,
                f"expert '{missing}' has no --domain-data (or give --domain-embeddings FILE)",
            )
        if self.embed_tokens < 1:
            raise ConfigError("embed_tokens", self.embed_tokens, "must be a positive integer")

    @property
    def router_type(self) -> str:
        """The router type the conversion builds (nexus defaults to its embedding router)."""
        return self.moe.get("router_type", "embedding" if self.method == "nexus" else "linear")

    @property
    def source_names(self) -> list[str]:
        """Every dense model the conversion reads, the seed (or the only source) first."""
        if self.method == "nexus":
            return [*self.model, *parse_named(self.expert, "expert").values()]
        return list(self.model)

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
            **({"router_type": "embedding"} if self.method == "nexus" else {}),
            **self.moe,
        }

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class ExtendConfig:
    """Options of ``upcycle extend``: the trained MoE, the new dense models and how to add them."""

    model: str | None = None
    """The MoE checkpoint folder to extend (written by `upcycle convert` or `upcycle pretrain`)."""
    expert: list[str] = field(default_factory=list)
    """NAME=DIR per new expert: a dense model of the MoE's architecture trained on the new domain."""
    domain_data: list[str] = field(default_factory=list)
    """NAME=PATH_OR_HUB: text of a new domain. Embedding router: averaged into its domain embedding; any
    router: the share of its tokens routed to the new expert is reported."""
    domain_embeddings: str | None = None
    """Embedding router: safetensors or .pt file of name → vector, for new domains without --domain-data."""
    embedder: str | None = None
    """Embedding router: the model that embeds --domain-data (default: the one the checkpoint records,
    normally the seed model of the conversion)."""
    embed_tokens: int = 100_000
    """Tokens of each new domain's --domain-data to average (and to measure routing on)."""
    domain_text_field: str = "text"
    """Column holding the text in --domain-data and --probe-data."""
    router_init: str | None = None
    """Linear and mlp routers (the naive baseline): the new router row, 'mean' of the existing rows,
    'zeros', 'normal:STD' or 'uniform:A'; default: the checkpoint's router_init."""
    merge: Literal["keep", "average"] = "keep"
    """Non-expert weights: 'keep' the MoE's, or 'average' them with each new model's (Nexus §3,
    λ = 1/(n + 1))."""
    freeze_existing: bool = False
    """Record in the checkpoint that only the new experts and the routers train (applied on every load)."""
    probe_data: str | None = None
    """Text of the old domains to measure function preservation on (default: random token ids)."""
    probe_batch: int = 4
    """Function-preservation probe: number of sequences."""
    probe_length: int = 64
    """Function-preservation probe: tokens per sequence."""
    seed: int = 0
    """Seed of the new linear-router rows."""
    out: str | None = None
    """Output folder (a standard Hugging Face checkpoint folder)."""
    overwrite: bool = False
    """Replace the output folder if it exists."""

    def __post_init__(self) -> None:
        for name in ("expert", "domain_data"):
            setattr(self, name, named_list(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        if not self.model:
            raise ConfigError("model", self.model, "give the MoE checkpoint folder to extend")
        experts = parse_named(self.expert, "expert")
        if not experts:
            raise ConfigError("expert", self.expert, "give at least one --expert NAME=DIR")
        unknown = sorted(set(parse_named(self.domain_data, "domain_data")) - set(experts))
        if unknown:
            raise ConfigError(
                "domain_data", unknown[0], f"names no --expert; experts are {', '.join(experts)}"
            )
        if self.router_init not in (None, "mean"):
            parse_router_init(self.router_init)
        for name in ("embed_tokens", "probe_batch", "probe_length"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be a positive integer")

    def to_dict(self) -> dict:
        return to_dict(self)


def used_options(opts: UpcycleConfig) -> dict:
    """The options a conversion uses: another method's options (``ratio`` with 'naive') are left out,
    and ``weight_scaling`` is recorded as resolved (issue 11). upcycling.json records them, and
    ``upcycle run`` hashes them, so sweep points that differ only in an unused option share one
    conversion (issue 14)."""
    options = {k: v for k, v in opts.to_dict().items() if k not in ("model", "out", "overwrite")}
    for name, methods in METHOD_OPTIONS.items():
        if opts.method not in methods:
            options.pop(name, None)
    options["weight_scaling"] = opts.scaling
    return options


def named_list(value) -> list[str]:
    """NAME=VALUE options as a list: a single string, or a YAML mapping {name: value}, is accepted too."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    return list(value or [])


def parse_named(specs: list[str], field: str) -> dict[str, str]:
    """['prose=DIR', …] → {'prose': 'DIR', …} in the given order; one-line errors for a missing '=', an
    empty name or value, and duplicate names."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, value = str(spec).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value or any(c.isspace() for c in name):
            raise ConfigError(field, spec, "expected NAME=VALUE with a name without spaces")
        if name in out:
            raise ConfigError(field, spec, f"the name '{name}' is given twice")
        out[name] = value
    return out


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
