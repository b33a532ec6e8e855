"""MoEConfig: every option of the MoE layer, validated early with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from upcycle.config import ConfigError, check_literals, check_positive, to_dict

ExpertType = Literal["mlp", "glu"]
ScoreOrder = Literal["softmax_topk", "topk_softmax"]
RouterType = Literal["linear", "mlp", "embedding"]
RouterMode = Literal["learned", "frozen", "random", "fixed"]
RoutingUnit = Literal["token", "sequence", "sequence_prefix"]

#: Activation names accepted for experts (Hugging Face ``ACT2FN`` spellings).
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "swish", "relu", "gelu_fast", "quick_gelu")


def parse_router_init(spec: str) -> tuple[str, float]:
    """Parse ``normal:STD``, ``uniform:A`` (U(-A, A)) or ``zeros`` into (kind, scale)."""
    if not isinstance(spec, str):
        raise ConfigError("router_init", spec, "expected 'normal:STD', 'uniform:A' or 'zeros'")
    kind, _, arg = spec.partition(":")
    if kind == "zeros" and not arg:
        return "zeros", 0.0
    if kind in ("normal", "uniform"):
        try:
            scale = float(arg)
        except ValueError:
            scale = float("nan")
        if math.isfinite(scale) and scale > 0:
            return kind, scale
    raise ConfigError(
        "router_init", spec, "expected 'normal:STD' or 'uniform:A' with a positive number, or 'zeros'"
    )


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (a drop-in replacement for a transformer MLP)."""

    hidden_size: int
    """Model width D: size of the layer's input and output."""
    intermediate_size: int
    """Intermediate width of each routed expert (smaller than the dense MLP's for fine-grained experts)."""
    num_experts: int = 8
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token (or per sequence) K, 1 ≤ K ≤ num_experts."""
    expert_type: ExpertType = "mlp"
    """'mlp': up → act → down with biases (GPT-2's c_fc/c_proj); 'glu': act(gate)·up → down (Llama SwiGLU)."""
    activation: str | None = None
    """Expert activation (Hugging Face names): default 'gelu_new' for mlp experts, 'silu' for glu experts."""
    expert_bias: bool | None = None
    """Biases in expert projections: default True for mlp experts (GPT-2), False for glu experts (Llama)."""
    num_shared_experts: int = 0
    """Shared experts that see every token (DeepSeekMoE); their outputs are added to the routed output."""
    shared_intermediate_size: int | None = None
    """Intermediate width of each shared expert (default: intermediate_size)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x·w), as Qwen2-MoE does."""
    score_order: ScoreOrder = "softmax_topk"
    """'softmax_topk': softmax over all experts, then keep the top k (Mixtral, He et al. 2024);
    'topk_softmax': keep the top-k logits, then softmax over them (Shazeer 2017, Drop-Upcycling eq. 3)."""
    renormalize: bool = True
    """With softmax_topk, rescale the k kept probabilities to sum to 1 (Mixtral). False keeps the raw
    probabilities (Switch Transformer's top-1 multiplies the expert output by p)."""
    router_type: RouterType = "linear"
    """'linear' router (E×D), a 2-layer 'mlp' router (D→H→E with ReLU; Fan et al. 2024, App. A.2), or the
    Nexus 'embedding' router (Gritsch et al. 2024, §3): logit_i = x · P(d_i), with d_i a fixed domain
    embedding per expert (a buffer) and P a learned 2-layer SwiGLU projection to the hidden size."""
    router_hidden_size: int | None = None
    """Hidden width H of the mlp router, or of the embedding router's projection (its SwiGLU output; Nexus
    §3 uses the hidden size). Default: hidden_size."""
    domain_embedding_size: int | None = None
    """Dimension m of the embedding router's domain embeddings d_i (default: hidden_size, the size of the
    seed model's mean-pooled hidden state that `upcycle convert --method nexus` uses)."""
    router_bias: bool = False
    """Bias in the router's linear layers (linear and mlp routers)."""
    router_mode: RouterMode = "learned"
    """'learned'; 'frozen' at initialisation; 'random': fresh weights drawn from router_init for every
    forward call, the stored ones left as initialised (Fan et al. 2024, Table 3); 'fixed': expert chosen by an external per-sequence label (language-guided
    routing; needs top_k=1 and sequence labels). Frozen and random routers hold their weights as buffers
    (same state-dict keys), so no load path or optimiser can train them."""
    router_init: str = "normal:0.02"
    """Router weight initialisation: 'normal:STD', 'uniform:A' for U(-A, A), or 'zeros'. N(0, 0.02) is the
    default because U[0,1) or N(0,1) saturate the softmax (design notes, pitfalls)."""
    router_jitter: float = 0.0
    """Router jitter ε: the router input (only) is multiplied by U(1-ε, 1+ε) noise in training (Switch)."""
    noisy_gating: bool = False
    """Noisy top-k gating (Shazeer et al. 2017): add N(0,1)·softplus(x·W_noise) to the logits in training."""
    routing_unit: RoutingUnit = "token"
    """'token'; 'sequence': router logits summed over the sequence's non-padding tokens decide the experts
    of every token of the sequence (Fan et al. 2024). In a causal LM this lets token t's experts depend on
    later tokens (it leaks the future; kept to reproduce the paper); 'sequence_prefix' is the causal
    variant: token t is routed on the sum over the non-padding tokens up to t, exact under cached
    generation. Both sequence units score as Fan et al., App. A: top-1 weighted by the chosen expert's
    probability p_i (their eq. 1, Switch), top-k ≥ 2 with a second softmax over the chosen experts'
    probabilities (eq. 2), which keeps top-2 weights within [0.27, 0.73]; score_order and renormalize do
    not apply to sequence units. Their z-loss is
    taken on the per-token logits and their load-balancing loss on the length-normalised (mean) logits,
    so neither grows with sequence length."""
    global_routing: bool = False
    """Every MoE layer of a model reuses the first MoE layer's routing decision (Fan et al. 2024), also in
    the recomputed forward of gradient checkpointing."""
    capacity_factor: float | None = None
    """None: dropless (default). A number c: each expert takes at most ceil(c·T·K/E) assignments;
    overflow is dropped (first-choice assignments first, then by position) and counted."""
    dropout: float = 0.0
    """Dropout on the layer output (GPT-2's MLP applies resid_pdrop there)."""
    aux_loss_weight: float = 0.01
    """Weight of the Switch/GShard load-balancing loss, applied to its *mean* over the model's MoE layers
    (each layer's loss is 1.0 when balanced). Other conventions for the same training signal: Switch and
    Megatron add α·loss per layer (a sum over L layers), so α = aux_loss_weight / L; Hugging Face's
    router_aux_loss_coef multiplies a value k times ours (its f sums to k), so coef = aux_loss_weight / k.
    `upcycle inspect` prints both for a checkpoint."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss (ST-MoE): mean over non-padding tokens of logsumexp(per-token logits)²,
    averaged over layers like aux_loss_weight (for sequence units too, so it stays bounded in length)."""
    importance_loss_weight: float = 0.0
    """Weight of Shazeer's importance loss (CV² of per-expert gate sums)."""

    def __post_init__(self) -> None:
        if self.activation is None:
            self.activation = "gelu_new" if self.expert_type == "mlp" else "silu"
        if self.expert_bias is None:
            self.expert_bias = self.expert_type == "mlp"
        self.validate()

    # Validation is eager (in __post_init__) so a bad config fails where it is written, not mid-run.
    def validate(self) -> None:
        check_literals(self)
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "must be a positive integer")
        if self.top_k > self.num_experts:
            raise ConfigError("top_k", self.top_k, f"must be ≤ num_experts ({self.num_experts})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError("activation", self.activation, f"allowed values are {', '.join(ACTIVATIONS)}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ConfigError("num_shared_experts", self.num_shared_experts, "must be an integer ≥ 0")
        for name in ("shared_intermediate_size", "router_hidden_size", "domain_embedding_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(name, value, "must be a positive integer or None")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("shared_expert_gate", True, "needs num_shared_experts ≥ 1")
        kind, _ = parse_router_init(self.router_init)
        if kind == "zeros" and self.router_type != "linear":
            raise ConfigError(
                "router_init",
                self.router_init,
                f"'zeros' would make the {self.router_type} router constant; use normal or uniform",
            )
        self._validate_embedding_router()
        check_positive(self, "router_jitter", "dropout", allow_zero=True)
        check_positive(self, "aux_loss_weight", "z_loss_weight", "importance_loss_weight", allow_zero=True)
        if not self.router_jitter < 1:
            raise ConfigError("router_jitter", self.router_jitter, "must be in [0, 1)")
        if not self.dropout < 1:
            raise ConfigError("dropout", self.dropout, "must be in [0, 1)")
        if self.capacity_factor is not None:
            check_positive(self, "capacity_factor")
        if self.router_mode == "fixed":
            if self.top_k != 1:
                raise ConfigError(
                    "top_k", self.top_k, "router_mode='fixed' assigns one expert per sequence: use 1"
                )
            if self.noisy_gating or self.router_jitter:
                raise ConfigError(
                    "router_mode", "fixed", "a fixed assignment has no router for jitter or noise"
                )

    def _validate_embedding_router(self) -> None:
        if self.router_type != "embedding":
            if self.domain_embedding_size is not None:
                raise ConfigError(
                    "domain_embedding_size",
                    self.domain_embedding_size,
                    "only the embedding router has domain embeddings",
                )
            return
        if self.router_bias:
            # Nexus' router is x · P(d_i) (§3); a per-expert bias would have no domain embedding to come from
            # when an expert is added later.
            raise ConfigError("router_bias", True, "the embedding router has no bias (Nexus §3); use False")
        if self.router_mode == "random":
            raise ConfigError(
                "router_mode",
                "random",
                "a random draw would discard the embedding router's projection; use learned or frozen",
            )

    @property
    def router_init_spec(self) -> tuple[str, float]:
        return parse_router_init(self.router_init)

    @property
    def has_router(self) -> bool:
        return self.router_mode != "fixed"

    @property
    def sequence_units(self) -> bool:
        """Routing on logits summed over a sequence or a sequence prefix (Fan et al. 2024)."""
        return self.routing_unit in ("sequence", "sequence_prefix") and self.router_mode != "fixed"

    @property
    def weights_sum_to_one(self) -> bool:
        """Whether the k combine weights of a token always sum to 1 (renormalised softmax-then-top-k,
        top-k-then-softmax, Fan et al.'s eq. 2, fixed routing), rather than being raw probabilities
        (sequence top-1 is their eq. 1, the raw p_i)."""
        if self.router_mode == "fixed":
            return True
        if self.sequence_units:
            return self.top_k > 1
        return self.score_order == "topk_softmax" or self.renormalize

    @property
    def router_learns_from_lm_loss(self) -> bool:
        """False when a learned router gets no gradient from the language-modelling loss: with top-1 and
        weights that sum to 1 the combine weight is identically 1, so only the auxiliary losses train it."""
        return not (self.top_k == 1 and self.weights_sum_to_one)

    @property
    def shared_size(self) -> int:
        return self.shared_intermediate_size or self.intermediate_size

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        from upcycle.config import from_dict

        return from_dict(cls, data, where="moe")

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)
