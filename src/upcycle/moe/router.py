"""Routers and scoring: from hidden states to (expert ids, combine weights) per routing unit.

Shape legend (torchtitan style): B batch, S sequence, T = B·S tokens, U routing units (T for token and
prefix routing, B for sequence routing), D hidden, H router hidden, E experts, K top-k, M domain
embedding size (embedding router).

All router maths runs in float32 whatever the model dtype: softmax over bf16 logits loses the small
differences that decide top-k, and the auxiliary losses are sums of many small terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.moe.config import MoEConfig

#: E[(silu(a)·b)²] for independent a, b ~ N(0, 1) (numerical integration: 0.3558): the second moment of a
#: SwiGLU unit whose two pre-activations have unit variance; it sets the embedding router's output scale.
SWIGLU_SECOND_MOMENT = 0.3558


@dataclass
class Routing:
    """A routing decision for T tokens (already expanded from sequences when routing per sequence)."""

    ids_TK: torch.Tensor
    """Chosen experts per token (long)."""
    weights_TK: torch.Tensor
    """Combine weight of each chosen expert (float32)."""
    logits_UE: torch.Tensor | None = None
    """Router logits per routing unit (float32; summed over the unit's tokens for sequence units), None for
    fixed routing."""
    probs_UE: torch.Tensor | None = None
    """Softmax of ``logits_UE`` over all experts per routing unit (float32), None for fixed routing."""
    ids_UK: torch.Tensor | None = None
    """Chosen experts per routing unit."""
    gates_UE: torch.Tensor | None = None
    """Sparse combine weights per routing unit (zeros outside the top k), for the importance loss."""
    unit: str = "token"
    token_logits_TE: torch.Tensor | None = None
    """Per-token router logits (float32), what the z-loss penalises; None means ``logits_UE`` (token units)."""
    balance_probs_UE: torch.Tensor | None = None
    """Probabilities the load-balancing loss averages; None means ``probs_UE``. Sequence units use the
    softmax of the length-normalised (mean) logits: the softmax of a sum over hundreds of tokens is
    one-hot, and its gradient, vanishes."""


def init_router_weight(
    weight: torch.Tensor, spec: tuple[str, float], generator: torch.Generator | None = None
) -> None:
    """Fill a router weight per ``spec`` (from :func:`parse_router_init`). Uses ``torch.nn.init`` so that
    Hugging Face's ``no_init_weights`` can skip it when weights are about to be loaded."""
    kind, scale = spec
    if kind == "normal":
        nn.init.normal_(weight, 0.0, scale, generator=generator)
    elif kind == "uniform":
        nn.init.uniform_(weight, -scale, scale, generator=generator)
    else:
        nn.init.zeros_(weight)


def score(logits_UE: torch.Tensor, top_k: int, score_order: str, renormalize: bool):
    """Turn float32 logits into (probs_UE, weights_UK, ids_UK).

    softmax_topk: p = softmax(logits); keep the k largest p (optionally renormalised to sum 1).
    topk_softmax: keep the k largest logits; softmax over those k only.
    ``probs_UE`` is always the full softmax (what the load-balancing loss averages).
    """
    probs_UE = torch.softmax(logits_UE, dim=-1)
    if score_order == "softmax_topk":
        weights_UK, ids_UK = torch.topk(probs_UE, top_k, dim=-1)
        if renormalize:
            weights_UK = weights_UK / weights_UK.sum(dim=-1, keepdim=True)
    else:
        top_logits_UK, ids_UK = torch.topk(logits_UE, top_k, dim=-1)
        weights_UK = torch.softmax(top_logits_UK, dim=-1)
    return probs_UE, weights_UK, ids_UK


def score_sequence(summed_UE: torch.Tensor, config: MoEConfig):
    """Fan et al. (2024), App. A, for logits summed over a sequence (or a sequence prefix).

    Top-2 and more (their eq. 2): p = softmax(h) of the summed logits h, keep the top k, and weight the
    chosen experts by a *second* softmax over their probabilities, w_i = e^{p_i} / Σ_{j∈top-k} e^{p_j}.
    As the p_i lie in [0, 1], top-2 weights stay within [1/(1+e), e/(1+e)] ≈ [0.27, 0.73] however long
    the sequence, where one softmax of a 256-token sum gives [1, 1e-9]. Top-1 follows their eq. 1
    (Switch): the chosen expert's probability p_i itself, whatever ``renormalize`` says (renormalised,
    the weight would be 1 and the router would get no gradient from the LM loss). Returns (probs_UE,
    weights_UK, ids_UK).
    """
    probs_UE = torch.softmax(summed_UE, dim=-1)
    if config.top_k == 1:
        weights_U1, ids_U1 = probs_UE.max(dim=-1, keepdim=True)
        return probs_UE, weights_U1, ids_U1
    # The top k of p are the top k of h (softmax is monotonic); choosing on h keeps the order where the
    # float32 softmax of a long sum rounds the runners-up to the same 0.
    ids_UK = torch.topk(summed_UE, config.top_k, dim=-1).indices
    return probs_UE, torch.softmax(probs_UE.gather(-1, ids_UK), dim=-1), ids_UK


class _RouterTensors(nn.Module):
    """Holds router tensors as parameters (learned router) or as persistent buffers (frozen and random
    routers), under the same names, so the state-dict keys are the same either way.

    Buffers make "this router does not train" structural (issue 10): ``from_pretrained`` hands back
    every *parameter* with ``requires_grad=True``, and an optimiser built over ``model.parameters()``
    would then train a frozen router; buffers have no gradient and are in no optimiser, whatever the
    load path, while ``save_pretrained`` still writes them (older checkpoints load unchanged).
    """

    def __init__(self, trainable: bool):
        super().__init__()
        self.trainable = trainable

    def _add(self, name: str, tensor: torch.Tensor | None) -> None:
        if self.trainable or tensor is None:
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor, persistent=True)


class RouterLinear(_RouterTensors):
    """The hidden layer (H×D) of a 2-layer MLP router: ``weight`` and optional ``bias`` (applied by
    :meth:`Router.forward`, which may substitute a random draw for the weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, trainable: bool):
        super().__init__(trainable)
        self._add("weight", torch.empty(out_features, in_features))
        self._add("bias", torch.zeros(out_features) if bias else None)


class Router(_RouterTensors):
    """Linear (E×D), 2-layer MLP (D→H→E) or Nexus embedding router, with optional noisy-gating weights.

    For linear and MLP routers ``weight`` is the matrix that produces the logits, so a linear router's
    ``weight`` has the same layout as Hugging Face Mixtral's ``gate.weight``. The embedding router has no
    ``weight``: its logit matrix is :meth:`effective_weight`, computed from the fixed ``domain_embeddings``
    buffer (E×M) through the learned ``projection_in`` (2H×M) and ``projection_out`` (D×H) layers. A
    learned router holds parameters; a frozen or random router holds buffers with the same names (see
    :class:`_RouterTensors`).
    """

    def __init__(self, config: MoEConfig):
        super().__init__(trainable=config.router_mode == "learned")
        self.config = config
        D, E = config.hidden_size, config.num_experts
        self.hidden: RouterLinear | None = None
        self.projection_in: RouterLinear | None = None
        self.projection_out: RouterLinear | None = None
        in_features = D
        if config.router_type == "mlp":
            H = config.router_hidden_size or D
            self.hidden = RouterLinear(D, H, config.router_bias, self.trainable)
            in_features = H
        if config.router_type == "embedding":
            H, M = config.router_hidden_size or D, config.domain_embedding_size or D
            # The domain embeddings are data, not weights: a buffer whatever the router mode (Nexus §3).
            self.register_buffer("domain_embeddings", torch.empty(E, M), persistent=True)
            self.projection_in = RouterLinear(M, 2 * H, False, self.trainable)
            self.projection_out = RouterLinear(H, D, False, self.trainable)
            self._add("weight", None)
        else:
            self._add("weight", torch.empty(E, in_features))
        self._add("bias", torch.zeros(E) if config.router_bias else None)
        # Shazeer et al. (2017) initialise W_noise to zero: noise starts at softplus(0)·N(0,1).
        self._add("noise_weight", torch.zeros(E, D) if config.noisy_gating else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        spec = self.config.router_init_spec
        if self.config.router_type == "embedding":
            self._reset_projection(spec, generator)
        else:
            init_router_weight(self.weight, spec, generator)
        if self.hidden is not None:
            init_router_weight(self.hidden.weight, spec, generator)
            if self.hidden.bias is not None:
                nn.init.zeros_(self.hidden.bias)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def _reset_projection(self, spec: tuple[str, float], generator: torch.Generator | None) -> None:
        """Initialise the embedding router so that each row of its logit matrix P(d_i) starts distributed as
        a linear router row drawn from ``spec`` (Nexus does not state its init; this is ours).

        Domain embeddings are unit vectors (see :meth:`set_domain_embeddings`), so W_in with unit-variance
        entries gives unit-variance SwiGLU pre-activations whatever M, and the SwiGLU outputs have second
        moment :data:`SWIGLU_SECOND_MOMENT`; W_out drawn from ``spec`` scaled by 1/sqrt(H·that moment) then
        gives P(d_i) entries of the spec's spread. A small W_in instead would start the router on the flat
        (quadratic) part of SwiGLU, where neither the logits nor their gradients move.
        """
        kind, scale = spec
        unit = (kind, 1.0 if kind == "normal" else 3.0**0.5)  # unit variance in the spec's family
        init_router_weight(self.projection_in.weight, unit, generator)
        H = self.projection_out.weight.shape[1]
        init_router_weight(
            self.projection_out.weight, (kind, scale / (H * SWIGLU_SECOND_MOMENT) ** 0.5), generator
        )
        # Placeholder directions for a freshly built model; conversion writes the real embeddings.
        nn.init.normal_(
            self.domain_embeddings, 0.0, self.domain_embeddings.shape[1] ** -0.5, generator=generator
        )

    def project(self, domain_EM: torch.Tensor) -> torch.Tensor:
        """Expert embeddings e_i = W_out · SwiGLU(W_in · d_i) (Nexus §3, "Domain to Expert Embeddings"),
        float32 (E, D). SwiGLU([a; b]) = silu(a) ⊙ b, a the first half of W_in's output."""
        gate_EH, value_EH = F.linear(domain_EM.float(), self.projection_in.weight.float()).chunk(2, dim=-1)
        return F.linear(F.silu(gate_EH) * value_EH, self.projection_out.weight.float())

    def effective_weight(self) -> torch.Tensor:
        """The (E, in) matrix whose product with the router input gives the logits: ``weight`` for linear
        and MLP routers (the MLP router's output layer), P(d_i) row by row for the embedding router."""
        if self.config.router_type == "embedding":
            return self.project(self.domain_embeddings)
        return self.weight

    @torch.no_grad()
    def set_domain_embeddings(self, domain_EM: torch.Tensor) -> None:
        """Store the embedding router's domain embeddings, scaled to unit length (Nexus embeds domains with
        Cohere Embed v3, whose vectors are unit-normalised; unit length keeps the projection's scale
        independent of the embedder)."""
        self.domain_embeddings.copy_(F.normalize(domain_EM.float(), dim=-1))

    @torch.no_grad()
    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fresh (weight, hidden weight) from the configured init, for ``router_mode='random'``.

        The draw is used for one call only and the stored weights are left as initialised, so a checkpoint
        does not change by running a forward. Under activation checkpointing the recompute restores the
        RNG state, so it draws the weights the forward used.
        """
        spec = self.config.router_init_spec
        weight = _sample(self.weight, spec)  # output layer first, then the hidden layer
        hidden = _sample(self.hidden.weight, spec) if self.hidden is not None else None
        return weight, hidden

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """float32 logits (T, E). Jitter and noise are applied here, in training only."""
        if torch.is_autocast_enabled(x_TD.device.type):
            # Autocast would run the linears below in bf16/fp16: router maths stays float32 (see above).
            with torch.autocast(x_TD.device.type, enabled=False):
                return self.forward(x_TD)
        cfg = self.config
        # Embedding router: the (E, D) matrix P(d_i) is rebuilt each call, so the projection trains (Nexus §3).
        weight = self.project(self.domain_embeddings) if cfg.router_type == "embedding" else self.weight
        hidden = self.hidden.weight if self.hidden is not None else None
        if cfg.router_mode == "random":
            # Fan et al. (2024) "Random" routing: fresh router weights at every call.
            weight, hidden = self.draw()
        x = x_TD.float()
        if self.training and cfg.router_jitter > 0:
            # Multiplicative jitter on the router input only: the experts still see the clean x
            # (Hugging Face Mixtral jitters hidden_states in place, changing what experts see).
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        h = x
        if self.hidden is not None:
            h = F.relu(F.linear(h, hidden.float(), _float(self.hidden.bias)))
        logits = F.linear(h, weight.float(), _float(self.bias))
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x, self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits


def _sample(like: torch.Tensor, spec: tuple[str, float]) -> torch.Tensor:
    """A fresh tensor shaped like ``like`` from the init ``spec``, drawn with tensor methods rather than
    ``torch.nn.init`` (which Hugging Face's ``no_init_weights`` turns into no-ops); same RNG stream."""
    kind, scale = spec
    out = torch.empty_like(like)
    if kind == "normal":
        return out.normal_(0.0, scale)
    if kind == "uniform":
        return out.uniform_(-scale, scale)
    return out.zero_()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
