"""A slow, independent MoE reference: routes with plain loops and runs every expert on every token.

It reads the layer's parameters but none of its routing or dispatch code, so agreement checks the
sparse implementation (sorting, capacity, permutations, combine) against the textbook definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upcycle.moe import MoE


def reference_logits(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    r = moe.router
    if r.config.router_type == "embedding":
        return x_TD.float() @ expert_embeddings(moe).t()
    h = x_TD.float()
    if r.hidden is not None:
        h = F.relu(h @ r.hidden.weight.float().t() + (0 if r.hidden.bias is None else r.hidden.bias.float()))
    logits = h @ r.weight.float().t()
    if r.bias is not None:
        logits = logits + r.bias.float()
    return logits


def expert_embeddings(moe: MoE) -> torch.Tensor:
    """Nexus §3 written out: e_i = W_2 · SwiGLU(W_1 · d_i), SwiGLU: R^{2H} → R^H, [a; b] ↦ silu(a) ⊙ b;
    one domain at a time. (E, D) float32."""
    r = moe.router
    W1, W2 = r.projection_in.weight.float(), r.projection_out.weight.float()
    H = W2.shape[1]
    rows = []
    for d in r.domain_embeddings.float():
        pre = W1 @ d
        rows.append(W2 @ (F.silu(pre[:H]) * pre[H:]))
    return torch.stack(rows)


def reference_forward(
    moe: MoE,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sequence_labels: torch.Tensor | None = None,
    routing_from: MoE | None = None,
) -> torch.Tensor:
    """The layer's output computed densely. Deterministic configurations only (no jitter/noise)."""
    cfg = moe.config
    B, S, D = x.shape
    T, E, K = B * S, cfg.num_experts, cfg.top_k
    x_TD = x.reshape(T, D)
    mask = torch.ones(B, S) if attention_mask is None else attention_mask.float()

    combine = torch.zeros(T, E)  # combine weight of expert e for token t
    slots: list[list[int]] = [[] for _ in range(T)]  # chosen experts per token, first choice first
    if cfg.router_mode == "fixed":
        for b in range(B):
            combine[b * S : (b + 1) * S, int(sequence_labels[b])] = 1.0
            for t in range(b * S, (b + 1) * S):
                slots[t] = [int(sequence_labels[b])]
    else:
        leader = routing_from or moe
        logits = reference_logits(leader, x_TD).view(B, S, E)
        units, owners = _routing_units(cfg.routing_unit, logits, mask)
        for unit_logits, tokens in zip(units, owners):
            order = sorted(range(E), key=lambda e: -float(unit_logits[e].detach()))[:K]
            w = _weights(cfg, unit_logits, order)
            for t in tokens:
                slots[t] = order
                for e, we in zip(order, w):
                    combine[t, e] = combine[t, e] + we

    if cfg.capacity_factor is not None:
        capacity = math.ceil(cfg.capacity_factor * T * K / E)
        # Priority: every first choice before any second choice, then by token position.
        choices = sorted((k, t, e) for t in range(T) for k, e in enumerate(slots[t]))
        used = [0] * E
        keep = torch.zeros(T, E)
        for _, t, e in choices:
            if used[e] < capacity:
                keep[t, e] = 1.0
                used[e] += 1
        combine = combine * keep

    out = torch.zeros(T, D, dtype=x.dtype)
    for e, expert in enumerate(moe.experts):
        out = out + combine[:, e : e + 1].to(x.dtype) * expert(x_TD)
    for expert in moe.shared_experts:
        s = expert(x_TD)
        if moe.shared_expert_gate is not None:
            s = torch.sigmoid(moe.shared_expert_gate(x_TD)) * s
        out = out + s
    return out.view(B, S, D)


def _routing_units(unit: str, logits_BSE: torch.Tensor, mask_BS: torch.Tensor):
    """(logits of each routing unit, the token indices it routes). Sequence units sum the gate logits of
    the non-padding tokens: of the whole sequence, or of the tokens up to and including t (prefix)."""
    B, S, E = logits_BSE.shape
    units, owners = [], []
    for b in range(B):
        for t in range(S):
            if unit == "token":
                units.append(logits_BSE[b, t])
                owners.append([b * S + t])
            elif unit == "sequence_prefix":
                total = torch.zeros(E)
                for s in range(t + 1):
                    if mask_BS[b, s] > 0:
                        total = total + logits_BSE[b, s]
                units.append(total)
                owners.append([b * S + t])
        if unit == "sequence":
            total = torch.zeros(E)
            for s in range(S):
                if mask_BS[b, s] > 0:
                    total = total + logits_BSE[b, s]
            units.append(total)
            owners.append([b * S + t for t in range(S)])
    return units, owners


def _weights(cfg, unit_logits: torch.Tensor, order: list[int]) -> list[torch.Tensor]:
    """Combine weights of the chosen experts ``order`` (best first)."""
    p = torch.softmax(unit_logits, -1)
    if cfg.routing_unit != "token":
        if len(order) == 1:
            return [p[order[0]]]  # Fan et al. (2024), App. A, eq. 1 (Switch): y = p_i E_i(x)
        # Fan et al. (2024), App. A, eq. 2: w_i = exp(p_i) / sum_{j in top-k} exp(p_j).
        denominator = sum(torch.exp(p[j]) for j in order)
        return [torch.exp(p[i]) / denominator for i in order]
    if cfg.score_order == "softmax_topk":
        w = [p[e] for e in order]
        if cfg.renormalize:
            total = sum(w)
            w = [we / total for we in w]
        return w
    top = torch.stack([unit_logits[e] for e in order])
    return list(torch.softmax(top, -1))
