"""RoutingCounter against a hand loop over the router's choices: every top-k choice and the top-1 choice,
per layer and group, padding excluded, for token and sequence routing units and global routing."""

from __future__ import annotations

import pytest
import torch

from upcycle.analysis.hooks import RoutingCounter
from upcycle.models.modeling import MoEGPT2Config, MoEGPT2LMHeadModel
from upcycle.moe import MoEConfig
from upcycle.moe.router import Router

E, G = 4, 3


def tiny_moe(top_k: int, unit: str, global_routing: bool, score_order: str = "softmax_topk"):
    torch.manual_seed(0)
    moe = MoEConfig(
        hidden_size=32,
        intermediate_size=48,
        num_experts=E,
        top_k=top_k,
        routing_unit=unit,
        global_routing=global_routing,
        score_order=score_order,
        router_init="normal:0.5",  # wide enough that choices differ from token to token
    )
    config = MoEGPT2Config(
        n_layer=3, n_embd=32, n_head=2, vocab_size=97, n_positions=64, moe=moe.to_dict(), moe_layers=[0, 2]
    )
    return MoEGPT2LMHeadModel(config).eval()


def padded_batches():
    """(ids, mask, groups) with rows of different lengths, right and left padding, groups mixed."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for lengths, side, groups in (([9, 4, 7], "right", [0, 2, 1]), ([3, 9, 6, 1], "left", [1, 1, 0, 2])):
        S = max(lengths)
        ids = torch.randint(0, 97, (len(lengths), S), generator=gen)
        mask = torch.zeros(len(lengths), S, dtype=torch.long)
        for b, n in enumerate(lengths):
            if side == "right":
                mask[b, :n] = 1
            else:
                mask[b, S - n :] = 1
        out.append((ids, mask, groups))
    return out


def hand_counts(model, batches, top_k: int, unit: str):
    """Per MoE layer, G×E counts from the routers' logits: top-k written out as a sort, a sequence's
    logits summed over its real tokens, followers of global routing taking the first layer's choice."""
    layers = sorted(model.moe_layers())
    routers = [m.router for m in model.moe_layers().values() if m.router is not None]
    logits_calls: list[torch.Tensor] = []
    handles = [
        r.register_forward_hook(lambda mod, a, out: logits_calls.append(out.detach())) for r in routers
    ]
    topk = {i: [[0] * E for _ in range(G)] for i in layers}
    top1 = {i: [[0] * E for _ in range(G)] for i in layers}
    try:
        for ids, mask, groups in batches:
            logits_calls.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            B, S = ids.shape
            per_layer = logits_calls if len(logits_calls) == len(layers) else logits_calls * len(layers)
            for layer, logits_TE in zip(layers, per_layer):
                logits = logits_TE.view(B, S, E)
                for b in range(B):
                    seq = sum(logits[b, s] for s in range(S) if mask[b, s])
                    for s in range(S):
                        if not mask[b, s]:
                            continue
                        scores = seq if unit == "sequence" else logits[b, s]
                        ranked = sorted(range(E), key=lambda e, sc=scores: -float(sc[e]))[:top_k]
                        for k, e in enumerate(ranked):
                            topk[layer][groups[b]][e] += 1
                            if k == 0:
                                top1[layer][groups[b]][e] += 1
    finally:
        for h in handles:
            h.remove()
    return topk, top1


@pytest.mark.parametrize(
    "top_k,unit,global_routing,score_order",
    [
        (1, "token", False, "softmax_topk"),
        (2, "token", False, "softmax_topk"),
        (2, "token", False, "topk_softmax"),
        (1, "sequence", False, "softmax_topk"),
        (2, "sequence", False, "softmax_topk"),
        (2, "token", True, "softmax_topk"),
        (1, "sequence", True, "softmax_topk"),
    ],
)
def test_counts_equal_a_hand_loop_over_the_routers_choices(top_k, unit, global_routing, score_order):
    model = tiny_moe(top_k, unit, global_routing, score_order)
    batches = padded_batches()
    with RoutingCounter(model.moe_layers(), G) as counter:
        for ids, mask, groups in batches:
            counter.set_groups(groups)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    got = counter.result()
    want_topk, want_top1 = hand_counts(model, batches, top_k, unit)
    real = [0] * G
    for _, mask, groups in batches:
        for b, g in enumerate(groups):
            real[g] += int(mask[b].sum())
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert got[layer]["topk"] == want_topk[layer]
        assert got[layer]["top1"] == want_top1[layer]
        assert got[layer]["tokens"] == real
        # Not a degenerate routing: several experts chosen, so the comparison can tell counts apart.
        assert sum(1 for e in range(E) if any(row[e] for row in want_top1[layer])) >= 2
    if global_routing:
        assert got[0]["topk"] == got[2]["topk"]  # the follower reused the leader's decision


def test_padding_changes_nothing_and_hooks_are_removed():
    """The same rows counted with and without extra padding give the same counts; hooks go away."""
    model = tiny_moe(2, "token", False)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], 1)
    results = []
    for x, m in ((ids, None), (padded, mask)):
        with RoutingCounter(model.moe_layers(), 1) as counter:
            counter.set_groups([0, 0])
            with torch.no_grad():
                model(input_ids=x, attention_mask=m)
        results.append(counter.result())
    assert results[0] == results[1]
    assert results[0][0]["tokens"] == [10]
    assert all(not m._forward_hooks for m in model.moe_layers().values())


def test_routers_are_the_only_gates():
    """The hand loop reads routers; a global-routing follower must really have none."""
    model = tiny_moe(1, "token", True)
    assert [m.router is None for m in model.moe_layers().values()] == [False, True]
    assert sum(isinstance(m, Router) for m in model.modules()) == 1
