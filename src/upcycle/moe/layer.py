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

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.moe import bank, grouped, losses, paths
from upcycle.moe.config import MoEConfig
from upcycle.moe.experts import ExpertList, make_expert
from upcycle.moe.router import Router, Routing, score, score_sequence
from upcycle.moe.stats import RouterStats


@dataclass
class PrefixSums:
    """One MoE layer's running sums of (masked) router logits at every position a generation cache
    holds: what sequence and prefix routing need to continue a sequence from the cache (issue 10)."""

    sums_BLE: torch.Tensor
    """Sum of the router logits of the non-padding tokens up to each position (float32)."""
    counts_BL: torch.Tensor
    """Number of non-padding tokens up to each position (float32)."""

    @property
    def length(self) -> int:
        return self.sums_BLE.shape[1]

    def truncate(self, length: int) -> PrefixSums:
        return PrefixSums(self.sums_BLE[:, :length], self.counts_BL[:, :length])

    def after(self, past: PrefixSums | None) -> PrefixSums:
        """These positions appended to ``past``'s."""
        if past is None:
            return self
        return PrefixSums(
            torch.cat([past.sums_BLE, self.sums_BLE], 1), torch.cat([past.counts_BL, self.counts_BL], 1)
        )

    def select(self, index: torch.Tensor) -> PrefixSums:
        return PrefixSums(
            self.sums_BLE.index_select(0, index.to(self.sums_BLE.device)),
            self.counts_BL.index_select(0, index.to(self.counts_BL.device)),
        )


class MoEContext:
    """What an MLP-shaped call ``mlp(hidden_states)`` cannot receive as arguments, shared by the MoE
    layers of one model: the attention mask (to mask padding out of losses, statistics and sequence
    routing), per-sequence labels (fixed routing), the routing decision of the first layer (global
    routing) and, for sequence and prefix routing under a generation cache, the router-logit sums of the
    cached tokens. A model sets it around its forward with :meth:`scope`.

    Gradient checkpointing recomputes a block in backward, after the model's forward (and its scope)
    has ended; :meth:`checkpoint_function` wraps the checkpoint so that the recompute sees the context
    its forward saw (mask, labels, the leader's routing) and counts no statistics twice.
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.sequence_labels: torch.Tensor | None = None
        self.global_routing: Routing | None = None
        self.replaying = False
        """True while gradient checkpointing recomputes a block: same maths, no side effects."""
        self.prefix_past: dict[int, PrefixSums] | None = None
        """Per layer rank: the logit sums of the tokens already in the cache (None: a fresh sequence)."""
        self.prefix_new: dict[int, PrefixSums] = {}
        """Per layer rank: the logit sums of this call's tokens, written by the layers."""
        self.num_layers = 0
        self._prefix_store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def register(self) -> int:
        """Give the next layer built with this context its rank (0 leads global routing)."""
        rank = self.num_layers
        self.num_layers += 1
        return rank

    def scope(
        self,
        attention_mask: torch.Tensor | None = None,
        sequence_labels: torch.Tensor | None = None,
        cache: object | None = None,
    ):
        """Context of one model forward. ``cache``: the generation cache the forward continues (only for
        sequence and prefix routing), whose tokens' logit sums this context kept from earlier calls."""
        return _ContextScope(self, attention_mask, sequence_labels, cache)

    def clear(self) -> None:
        self.attention_mask = None
        self.sequence_labels = None
        self.global_routing = None
        self.prefix_past = None
        self.prefix_new = {}

    # ------------------------------------------------------------- generation cache (prefix sums)
    def load_prefix(self, cache) -> dict[int, PrefixSums] | None:
        """The logit sums of the tokens ``cache`` already holds, cut to its length (it may have been
        cropped, e.g. by assisted decoding); None for an empty cache."""
        past = cache.get_seq_length() if cache is not None else 0
        if not past:
            return None
        sums = self._prefix_store.get(cache)
        if sums is None or any(s.length < past for s in sums.values()):
            raise RuntimeError(
                f"sequence routing: the cache holds {past} tokens whose router sums this model did not record "
                "(a cache filled by another model, or by a forward that returned a tuple); run the whole "
                "sequence again without a cache"
            )
        return {rank: s.truncate(past) for rank, s in sums.items()}

    def save_prefix(self, cache) -> None:
        """Keep the sums of the cached tokens (past and this call's) for the next call with ``cache``."""
        if cache is None or not self.prefix_new:
            return
        past = self.prefix_past or {}
        merged = {rank: new.after(past.get(rank)) for rank, new in self.prefix_new.items()}
        if all(s.length == cache.get_seq_length() for s in merged.values()):
            self._prefix_store[cache] = merged
        else:  # the forward did not fill the cache (e.g. use_cache was switched off)
            self._prefix_store.pop(cache, None)

    def reorder_prefix(self, cache, beam_idx: torch.Tensor) -> None:
        """Follow a beam-search reordering of ``cache``'s batch rows."""
        sums = self._prefix_store.get(cache)
        if sums is not None:
            self._prefix_store[cache] = {rank: s.select(beam_idx) for rank, s in sums.items()}

    # ------------------------------------------------------------- gradient checkpointing
    def checkpoint_function(self, checkpoint_fn: Callable) -> Callable:
        """Wrap a gradient-checkpointing function (``torch.utils.checkpoint.checkpoint`` with Hugging Face's
        keyword arguments) so that every recompute of a block replays the context of the block's forward:
        the attention mask, the sequence labels and, for global routing, the leader's routing decision
        (a follower is recomputed in backward before its leader, after the model's scope has closed)."""

        def run(function, *args, **kwargs):
            state = (self.attention_mask, self.sequence_labels, self.global_routing)
            calls = 0

            def replayable(*a, **k):
                nonlocal calls
                calls += 1
                if calls == 1:  # the forward itself
                    return function(*a, **k)
                with self._replaying(state):
                    return function(*a, **k)

            return checkpoint_fn(replayable, *args, **kwargs)

        return run

    @contextlib.contextmanager
    def _replaying(self, state: tuple):
        saved = (self.attention_mask, self.sequence_labels, self.global_routing, self.replaying)
        self.attention_mask, self.sequence_labels, self.global_routing = state
        self.replaying = True
        try:
            yield
        finally:
            self.attention_mask, self.sequence_labels, self.global_routing, self.replaying = saved


class _ContextScope:
    def __init__(self, ctx: MoEContext, attention_mask, sequence_labels, cache):
        self.ctx, self.mask, self.labels, self.cache = ctx, attention_mask, sequence_labels, cache
        self.saved: tuple | None = None

    def __enter__(self) -> MoEContext:
        c = self.ctx
        past = c.load_prefix(self.cache)
        self.saved = (c.attention_mask, c.sequence_labels, c.global_routing, c.prefix_past, c.prefix_new)
        c.attention_mask, c.sequence_labels, c.global_routing = self.mask, self.labels, None
        c.prefix_past, c.prefix_new = past, {}
        return c

    def __exit__(self, *exc) -> None:
        c = self.ctx
        (c.attention_mask, c.sequence_labels, c.global_routing, c.prefix_past, c.prefix_new) = self.saved


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

        if (cfg.sequence_units or cfg.router_mode == "fixed") and hidden_states.dim() != 3:
            raise ValueError(
                f"sequence-level routing needs (batch, sequence, hidden) input, got {tuple(hidden_states.shape)}"
            )
        if cfg.router_mode == "fixed":
            routing = self._route_fixed(hidden_states, sequence_labels)
        elif cfg.sequence_units:
            routing = self._route_sequences(self.router(x_TD), hidden_states.shape[0], mask_T)
        else:
            logits_TE = self.router(x_TD)
            probs_TE, weights_TK, ids_TK = score(logits_TE, cfg.top_k, cfg.score_order, cfg.renormalize)
            gates_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, weights_TK)
            routing = Routing(ids_TK, weights_TK, logits_TE, probs_TE, ids_TK, gates_TE, "token")

        if cfg.global_routing and self.context is not None:
            self.context.global_routing = routing
        return routing

    def _route_fixed(self, hidden_states: torch.Tensor, sequence_labels: torch.Tensor | None) -> Routing:
        B, S = hidden_states.shape[0], hidden_states.shape[1]
        ids_BK = self._labels(sequence_labels, B).to(hidden_states.device).unsqueeze(-1)
        weights_BK = torch.ones(ids_BK.shape, dtype=torch.float32, device=hidden_states.device)
        return Routing(
            ids_BK.repeat_interleave(S, 0), weights_BK.repeat_interleave(S, 0), ids_UK=ids_BK, unit="sequence"
        )

    def _route_sequences(self, logits_TE: torch.Tensor, B: int, mask_T: torch.Tensor | None) -> Routing:
        """Fan et al. (2024): route on gate logits summed over the sequence's non-padding tokens
        ('sequence', one decision per sequence) or over those up to each token ('sequence_prefix', one
        decision per token, causal), scored by :func:`score_sequence` (their App. A)."""
        cfg = self.config
        E = logits_TE.shape[-1]
        logits_BSE = logits_TE.view(B, -1, E)
        S = logits_BSE.shape[1]
        real_BS = mask_T.view(B, S) if mask_T is not None else logits_TE.new_ones(B, S)
        # Running sums from the first real token, continued from the tokens a generation cache holds, so
        # cached decoding routes exactly as a forward over the whole sequence does.
        start_BE, start_B = self._cached_sums(B, E, logits_TE)
        sums_BSE = start_BE.unsqueeze(1) + (logits_BSE * real_BS.unsqueeze(-1)).cumsum(1)
        counts_BS = start_B.unsqueeze(1) + real_BS.cumsum(1)
        if self.context is not None and not self.context.replaying:
            self.context.prefix_new[self.rank] = PrefixSums(sums_BSE.detach(), counts_BS.detach())
        if cfg.routing_unit == "sequence":
            summed_UE, counts_U = sums_BSE[:, -1], counts_BS[:, -1]
        else:
            summed_UE, counts_U = sums_BSE.reshape(-1, E), counts_BS.reshape(-1)
        probs_UE, weights_UK, ids_UK = score_sequence(summed_UE, cfg)
        # The load-balancing loss sees the mean logits: same top-k, a softmax that is not one-hot for long
        # sequences, so its gradient does not vanish with length.
        balance_UE = torch.softmax(summed_UE / counts_U.clamp_min(1.0).unsqueeze(-1), dim=-1)
        gates_UE = torch.zeros_like(probs_UE).scatter(1, ids_UK, weights_UK)
        if cfg.routing_unit == "sequence":
            ids_TK, weights_TK = ids_UK.repeat_interleave(S, 0), weights_UK.repeat_interleave(S, 0)
        else:
            ids_TK, weights_TK = ids_UK, weights_UK
        return Routing(
            ids_TK, weights_TK, summed_UE, probs_UE, ids_UK, gates_UE, cfg.routing_unit, logits_TE, balance_UE
        )

    def _cached_sums(self, B: int, E: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums_BE, counts_B) of the tokens before this call: zeros unless a generation cache is continued."""
        past = self.context.prefix_past if self.context is not None else None
        state = past.get(self.rank) if past else None
        if state is None:
            return like.new_zeros(B, E), like.new_zeros(B)
        if state.sums_BLE.shape[0] != B:
            raise RuntimeError(
                f"sequence routing: the cache holds sums for {state.sums_BLE.shape[0]} sequences, the batch has {B}"
            )
        return state.sums_BLE[:, -1].to(like.device), state.counts_BL[:, -1].to(like.device)

    def _unit_mask(self, routing: Routing, mask_T: torch.Tensor | None, B: int) -> torch.Tensor | None:
        if mask_T is None or routing.unit != "sequence":
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
        # Gradient checkpointing's recompute runs the same maths (it must save the same tensors) but
        # must not count the tokens again or replace what the forward reported.
        replaying = self.context is not None and self.context.replaying
        stats = self.stats
        if replaying:
            self.stats = RouterStats(self.config.num_experts)
        try:
            y_TD = self._dispatch(x_TD, routing, mask_T)
        finally:
            self.stats = stats

        if len(self.shared_experts):
            shared_TD = sum(expert(x_TD) for expert in self.shared_experts)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        aux_losses = self._compute_losses(routing, mask_T, shape[0] if len(shape) == 3 else 1)
        if not replaying:
            self.aux_losses = aux_losses
            self.last_routing = Routing(
                routing.ids_TK.detach(),
                routing.weights_TK.detach(),
                _detach(routing.logits_UE),
                _detach(routing.probs_UE),
                _detach(routing.ids_UK),
                None,
                routing.unit,
            )
        y = y_TD.view(shape)
        # nn.Dropout(p=0) still copies the tensor in training; skip it.
        return self.dropout(y) if self.config.dropout > 0 else y

    def _compute_losses(
        self, routing: Routing, mask_T: torch.Tensor | None, B: int
    ) -> dict[str, torch.Tensor]:
        if self.router is None or routing.probs_UE is None:
            return {}
        mask_U = self._unit_mask(routing, mask_T, B)
        # z-loss on the per-token logits (ST-MoE's quantity), also for sequence units: the logsumexp of a
        # sum over the sequence grows with its length; the per-token logits bound that sum.
        token_logits_TE = (
            routing.token_logits_TE if routing.token_logits_TE is not None else routing.logits_UE
        )
        balance_UE = routing.balance_probs_UE if routing.balance_probs_UE is not None else routing.probs_UE
        return {
            "load_balancing": losses.load_balancing_loss(balance_UE, routing.ids_UK, mask_U),
            "z": losses.z_loss(token_logits_TE, mask_T),
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


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
