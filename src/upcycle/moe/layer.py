"""The MoE layer: a drop-in replacement for a transformer MLP.

Shape legend: B batch, S sequence, T = B·S tokens, U routing units (T or B), D hidden, E experts,
K top-k, N = T·K token→expert assignments.

Dispatch: assignments are sorted by expert (stable, first-choice slots before second-choice ones so a
capacity limit drops the later choices first), each expert runs once on its contiguous slice, outputs
are scaled by their combine weights and put back in token order with an inverse permutation. Expert
compute therefore costs the active FLOPs and nothing per inactive expert; every expert is still called
(on an empty slice when it got no tokens) so its parameters always receive a gradient, which keeps
DDP from failing on unused parameters. Three implementations run the experts (upcycle.moe.paths): one
grouped GEMM per projection with the row counts kept on the device (:mod:`upcycle.moe.grouped`, the
default on GPU and under ``torch.compile``), side by side on single-threaded CPU workers
(:mod:`upcycle.moe.bank`, the default on CPU), or the plain module loop. With a capacity factor, the loop
and the bank compute only the kept assignments; the grouped path computes all of them and masks the
dropped ones' combine weights (fixed shapes, no host synchronisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.moe import bank, grouped, losses, paths
from upcycle.moe.config import MoEConfig
from upcycle.moe.experts import ExpertList, make_expert
from upcycle.moe.router import Router, Routing, score
from upcycle.moe.stats import RouterStats


class MoEContext:
    """What an MLP-shaped call ``mlp(hidden_states)`` cannot receive as arguments, shared by the MoE
    layers of one model: the attention mask (to mask padding out of losses, statistics and sequence
    routing), per-sequence labels (fixed routing) and the routing decision of the first layer (global
    routing). A model sets it around its forward with :meth:`scope`.
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.sequence_labels: torch.Tensor | None = None
        self.global_routing: Routing | None = None
        self.num_layers = 0

    def register(self) -> int:
        """Give the next layer built with this context its rank (0 leads global routing)."""
        rank = self.num_layers
        self.num_layers += 1
        return rank

    def scope(self, attention_mask: torch.Tensor | None = None, sequence_labels: torch.Tensor | None = None):
        return _ContextScope(self, attention_mask, sequence_labels)

    def clear(self) -> None:
        self.attention_mask = None
        self.sequence_labels = None
        self.global_routing = None


class _ContextScope:
    def __init__(self, ctx: MoEContext, attention_mask, sequence_labels):
        self.ctx, self.mask, self.labels = ctx, attention_mask, sequence_labels
        self.saved: tuple | None = None

    def __enter__(self) -> MoEContext:
        c = self.ctx
        self.saved = (c.attention_mask, c.sequence_labels, c.global_routing)
        c.attention_mask, c.sequence_labels, c.global_routing = self.mask, self.labels, None
        return c

    def __exit__(self, *exc) -> None:
        c = self.ctx
        c.attention_mask, c.sequence_labels, c.global_routing = self.saved


class _ToSorted(torch.autograd.Function):
    """xs_N = x_TD[order % T]; backward gathers the gradient back with the inverse permutation and sums
    a token's K copies."""

    @staticmethod
    def forward(ctx, x_TD, order, inverse, K):
        ctx.save_for_backward(inverse)
        ctx.K, ctx.T = K, x_TD.shape[0]
        return x_TD[order % ctx.T]

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse,) = ctx.saved_tensors
        g = grad_ND[inverse]
        if ctx.K > 1:
            g = g.view(ctx.K, ctx.T, g.shape[-1]).sum(0)
        return g, None, None, None


class _FromSorted(torch.autograd.Function):
    """y_TD = Σ_k ys_N[inverse] (slot-major, K blocks of T rows); backward gathers with ``order``."""

    @staticmethod
    def forward(ctx, ys_ND, order, inverse, K):
        ctx.save_for_backward(order)
        ctx.K, ctx.T = K, ys_ND.shape[0] // K
        y = ys_ND[inverse]
        if K > 1:
            y = y.view(K, ctx.T, y.shape[-1]).sum(0)
        return y

    @staticmethod
    def backward(ctx, grad_TD):
        (order,) = ctx.saved_tensors
        index = order % ctx.T if ctx.K > 1 else order
        return grad_TD[index], None, None, None


def _count(ids: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Occurrences of 0..n-1 in ``ids`` (optionally weighted, integer weights): a fixed-size result, unlike
    ``bincount``, whose length depends on the values (a graph break under ``torch.compile``)."""
    ones = torch.ones_like(ids) if weights is None else weights
    return torch.zeros(n, dtype=ones.dtype, device=ids.device).index_add_(0, ids, ones)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN.

    ``moe(x)`` maps (B, S, D) (or (T, D) with token routing) to the same shape. After each call:

    - ``moe.aux_losses``: dict of unweighted per-layer losses, float32 scalars with gradient:
      ``load_balancing`` (Switch/GShard, 1.0 when perfectly balanced), ``z`` (ST-MoE router z-loss),
      ``importance`` (Shazeer CV²). Empty for layers without a router (fixed routing, global-routing
      followers). :meth:`weighted_aux_loss` combines them with the config's weights.
    - ``moe.last_routing``: the detached :class:`Routing` (ids, weights, logits) for analysis hooks.
    - ``moe.stats``: accumulated :class:`RouterStats` (tokens per expert, dropped, balance).

    Padding is excluded from losses and statistics when an attention mask is passed as
    ``attention_mask=`` or through the shared :class:`MoEContext`.
    """

    def __init__(self, config: MoEConfig, context: MoEContext | None = None):
        super().__init__()
        self.config = config
        self.context = context
        self.rank = context.register() if context is not None else 0
        # Global routing (Fan et al. 2024): only the first layer has gating parameters; the others
        # reuse its decision, so they build no router at all.
        self.is_follower = config.global_routing and context is not None and self.rank > 0
        self.router = Router(config) if config.has_router and not self.is_follower else None
        # Routed experts: per-expert modules whose weights are views into one stack per projection
        # (upcycle.moe.experts.ExpertList), for the grouped GEMM path.
        self.experts = ExpertList(
            make_expert(
                config.expert_type,
                config.hidden_size,
                config.intermediate_size,
                config.activation,
                config.expert_bias,
            )
            for _ in range(config.num_experts)
        )
        #: Expert path of this layer (upcycle.moe.paths); None follows the process-wide setting.
        self.expert_path: str | None = None
        self.shared_experts = nn.ModuleList(
            make_expert(
                config.expert_type,
                config.hidden_size,
                config.shared_size,
                config.activation,
                config.expert_bias,
            )
            for _ in range(config.num_shared_experts)
        )
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.stats = RouterStats(config.num_experts)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: Routing | None = None

    # ------------------------------------------------------------------ routing
    def _token_mask(self, shape: torch.Size, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if attention_mask is None and self.context is not None:
            attention_mask = self.context.attention_mask
        if attention_mask is None:
            return None
        if len(shape) == 3:
            B, S = shape[0], shape[1]
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} does not fit hidden states of shape "
                    f"{tuple(shape)}: expected (batch, ≥ sequence)"
                )
            # During cached generation the mask covers past + current tokens; ours are the last S.
            attention_mask = attention_mask[:, -S:]
        return attention_mask.reshape(-1).to(torch.float32)

    def _labels(self, sequence_labels: torch.Tensor | None, B: int) -> torch.Tensor:
        if sequence_labels is None and self.context is not None:
            sequence_labels = self.context.sequence_labels
        if sequence_labels is None:
            raise ValueError(
                "router_mode='fixed' needs one label per sequence: pass sequence_labels=... to the layer or "
                "set them on the model's MoE context"
            )
        labels = torch.as_tensor(sequence_labels).reshape(-1).long()
        if labels.numel() != B:
            raise ValueError(f"got {labels.numel()} sequence labels for a batch of {B} sequences")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_experts):
            raise ValueError(f"sequence labels must be expert indices in [0, {self.config.num_experts})")
        return labels

    def route(
        self,
        hidden_states: torch.Tensor,
        mask_T: torch.Tensor | None = None,
        sequence_labels: torch.Tensor | None = None,
    ) -> Routing:
        """Decide experts and combine weights for every token of ``hidden_states``."""
        cfg = self.config
        D = hidden_states.shape[-1]
        x_TD = hidden_states.reshape(-1, D)
        T = x_TD.shape[0]
        if self.is_follower:
            routing = self.context.global_routing if self.context is not None else None
            if routing is None or routing.ids_TK.shape[0] != T:
                raise RuntimeError(
                    "global routing: this layer follows the first MoE layer, which has not routed these tokens "
                    "in the current forward pass"
                )
            return routing

        sequence = cfg.routing_unit == "sequence" or cfg.router_mode == "fixed"
        if sequence and hidden_states.dim() != 3:
            raise ValueError(
                f"sequence-level routing needs (batch, sequence, hidden) input, got {tuple(hidden_states.shape)}"
            )
        B, S = (hidden_states.shape[0], hidden_states.shape[1]) if hidden_states.dim() == 3 else (1, T)

        if cfg.router_mode == "fixed":
            ids_BK = self._labels(sequence_labels, B).to(x_TD.device).unsqueeze(-1)
            weights_BK = torch.ones(ids_BK.shape, dtype=torch.float32, device=x_TD.device)
            routing = Routing(
                ids_BK.repeat_interleave(S, 0), weights_BK.repeat_interleave(S, 0), ids_UK=ids_BK
            )
            routing.unit = "sequence"
        else:
            logits_TE = self.router(x_TD)
            if cfg.routing_unit == "sequence":
                # Fan et al. (2024): sum the gate logits over the sequence's tokens, then score.
                logits_BSE = logits_TE.view(B, S, -1)
                if mask_T is not None:
                    logits_BSE = logits_BSE * mask_T.view(B, S, 1)
                logits_UE = logits_BSE.sum(1)
            else:
                logits_UE = logits_TE
            probs_UE, weights_UK, ids_UK = score(logits_UE, cfg.top_k, cfg.score_order, cfg.renormalize)
            if cfg.routing_unit == "sequence":
                ids_TK, weights_TK = ids_UK.repeat_interleave(S, 0), weights_UK.repeat_interleave(S, 0)
            else:
                ids_TK, weights_TK = ids_UK, weights_UK
            gates_UE = torch.zeros_like(probs_UE).scatter(1, ids_UK, weights_UK)
            routing = Routing(ids_TK, weights_TK, logits_UE, probs_UE, ids_UK, gates_UE, cfg.routing_unit)

        if cfg.global_routing and self.context is not None:
            self.context.global_routing = routing
        return routing

    def _unit_mask(self, routing: Routing, mask_T: torch.Tensor | None, B: int) -> torch.Tensor | None:
        if mask_T is None or routing.unit == "token":
            return mask_T
        # A sequence counts if it has at least one real token.
        return (mask_T.view(B, -1).sum(1) > 0).float()

    # ------------------------------------------------------------------ experts
    def _dispatch(self, x_TD: torch.Tensor, routing: Routing, mask_T: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        E = cfg.num_experts
        T, K = routing.ids_TK.shape
        # Slot-major flattening (all first choices, then all second choices): the stable sort keeps that
        # priority inside each expert, which is the order a capacity limit should drop in.
        flat_e = routing.ids_TK.t().reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        sorted_w = routing.weights_TK.t().reshape(-1)[order]
        real = mask_T.repeat(K)[order] > 0 if mask_T is not None else None  # non-padding, sorted
        counts_E = _count(sorted_e, E)
        keep = None
        if cfg.capacity_factor is not None:
            keep = self._within_capacity(sorted_e, counts_E, real, mask_T, T, K)

        path = paths.resolve(self.expert_path, x_TD.device)
        params = grouped.usable(self.experts, x_TD) if path == "grouped" else None
        if params is not None:
            y_TD = self._run_grouped(x_TD, order, sorted_e, sorted_w, counts_E, keep, K, params)
        else:
            y_TD = self._run_looped(x_TD, order, sorted_e, sorted_w, counts_E, keep, K, path)
        self._update_stats(sorted_e, counts_E, keep, real, mask_T, T)
        return y_TD

    def _within_capacity(self, sorted_e, counts_E, real, mask_T, T: int, K: int) -> torch.Tensor:
        """Which sorted assignments fit their expert's capacity ceil(c·n·K/E), n the tokens. Padding takes
        no slot and is not counted in n (issue 10), so real tokens fare as in the unpadded batch."""
        c, E = self.config.capacity_factor, self.config.num_experts
        if real is None:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            position = torch.arange(sorted_e.numel(), device=sorted_e.device) - starts_E[sorted_e]
            return position < math.ceil(c * T * K / E)
        r = real.long()
        real_E = _count(sorted_e, E, r)
        position = (torch.cumsum(r, 0) - r) - (torch.cumsum(real_E, 0) - real_E)[sorted_e]
        # Same operation order as math.ceil(c * T * K / E) in float64, so equal to the unpadded batch's.
        capacity = torch.ceil((mask_T > 0).sum().double() * c * K / E)
        return real & (position < capacity)

    def _run_grouped(self, x_TD, order, sorted_e, sorted_w, counts_E, keep, K: int, params) -> torch.Tensor:
        # Every assignment is computed, also those over capacity (their combine weight is masked): fixed
        # shapes, no host synchronisation, and the sort is a permutation, so both directions are gathers.
        inverse = _inverse(order)
        xs = _ToSorted.apply(x_TD, order, inverse, K)
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        ys = grouped.run(self.experts, xs, offs_E, sorted_e, params)
        ys = ys * sorted_w.unsqueeze(-1).to(ys.dtype)
        if keep is not None:
            ys = torch.where(keep.unsqueeze(-1), ys, 0)
        return _FromSorted.apply(ys, order, inverse, K)

    def _run_looped(self, x_TD, order, sorted_e, sorted_w, counts_E, keep, K: int, path: str) -> torch.Tensor:
        if keep is None:
            # Dropless: the sort is a permutation of the N = K·T assignments, so both directions are
            # gathers (no index_put accumulation in backward, deterministic on GPU).
            inverse = _inverse(order)
            xs = _ToSorted.apply(x_TD, order, inverse, K)
        else:
            order, sorted_w = order[keep], sorted_w[keep]
            counts_E = _count(sorted_e[keep], self.config.num_experts)
            xs = x_TD[order % x_TD.shape[0]]
        ys = self._run_experts(xs, counts_E.tolist(), path)
        ys = ys * sorted_w.unsqueeze(-1).to(ys.dtype)
        if keep is None:
            return _FromSorted.apply(ys, order, inverse, K)
        return torch.zeros_like(x_TD, dtype=ys.dtype).index_add(0, order % x_TD.shape[0], ys)

    def _run_experts(self, xs_ND: torch.Tensor, sizes: list[int], path: str = "bank") -> torch.Tensor:
        # On CPU, experts run on single-threaded workers side by side when that computes the same thing
        # (upcycle.moe.bank explains why and when); otherwise one after another with all threads each.
        if path == "bank":
            workers = bank.parallel_plan(self.experts, xs_ND, sizes)
            if workers:
                return bank.run_parallel(self.experts, xs_ND, sizes, workers)
        return torch.cat([e(c) for e, c in zip(self.experts, xs_ND.split(sizes))])

    @torch.no_grad()
    def _update_stats(self, sorted_e, counts_E, keep, real, mask_T, T: int) -> None:
        """Statistics count the non-padding assignments that were computed, and the dropped ones."""
        E = self.config.num_experts
        dropped = 0
        if keep is None and real is None:
            counts = counts_E
        else:
            counted = keep if real is None else (real if keep is None else keep & real)
            counts = _count(sorted_e, E, counted.long())
            if keep is not None:
                dropped = (~keep if real is None else real & ~keep).sum()
        tokens = int(T) if mask_T is None else (mask_T > 0).sum()
        self.stats.update(counts, dropped, tokens)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sequence_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        mask_T = self._token_mask(shape, attention_mask)
        routing = self.route(hidden_states, mask_T, sequence_labels)
        y_TD = self._dispatch(x_TD, routing, mask_T)

        if len(self.shared_experts):
            shared_TD = sum(expert(x_TD) for expert in self.shared_experts)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        self._compute_losses(routing, mask_T, shape[0] if len(shape) == 3 else 1)
        self.last_routing = Routing(
            routing.ids_TK.detach(),
            routing.weights_TK.detach(),
            None if routing.logits_UE is None else routing.logits_UE.detach(),
            None if routing.probs_UE is None else routing.probs_UE.detach(),
            None if routing.ids_UK is None else routing.ids_UK.detach(),
            None,
            routing.unit,
        )
        y = y_TD.view(shape)
        # nn.Dropout(p=0) still copies the tensor in training; skip it.
        return self.dropout(y) if self.config.dropout > 0 else y

    def _compute_losses(self, routing: Routing, mask_T: torch.Tensor | None, B: int) -> None:
        if self.router is None or routing.probs_UE is None:
            self.aux_losses = {}
            return
        mask_U = self._unit_mask(routing, mask_T, B)
        self.aux_losses = {
            "load_balancing": losses.load_balancing_loss(routing.probs_UE, routing.ids_UK, mask_U),
            "z": losses.z_loss(routing.logits_UE, mask_U),
            "importance": losses.importance_loss(routing.gates_UE, mask_U),
        }

    def weighted_aux_loss(self) -> torch.Tensor | None:
        """aux_loss_weight·load_balancing + z_loss_weight·z + importance_loss_weight·importance, or None."""
        if not self.aux_losses:
            return None
        cfg = self.config
        return (
            cfg.aux_loss_weight * self.aux_losses["load_balancing"]
            + cfg.z_loss_weight * self.aux_losses["z"]
            + cfg.importance_loss_weight * self.aux_losses["importance"]
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={c.num_experts}, top_k={c.top_k}, type={c.expert_type}, score={c.score_order}"
            f"{'+renorm' if c.renormalize and c.score_order == 'softmax_topk' else ''}, unit={c.routing_unit}, "
            f"router={c.router_type}/{c.router_mode}, shared={c.num_shared_experts}"
        )
