"""Auxiliary losses on hand-computed cases, and routing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.moe import MoE, MoEConfig, importance_loss, load_balancing_loss, z_loss


def test_load_balancing_is_one_when_perfectly_balanced():
    for E, K in [(4, 1), (8, 2), (8, 3)]:
        U = E * 5
        probs = torch.full((U, E), 1.0 / E)
        ids = torch.stack([(torch.arange(U) + k) % E for k in range(K)], dim=1)
        assert float(load_balancing_loss(probs, ids)) == pytest.approx(1.0)


def test_load_balancing_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.85, 0.15]  ->  2 · (1·0.85) = 1.7
    assert float(load_balancing_loss(probs, ids)) == pytest.approx(1.7)
    # Collapsed routing costs more than balanced routing with the same confidence.
    balanced = load_balancing_loss(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([[0], [1]]))
    assert float(balanced) == pytest.approx(1.0)


def test_load_balancing_gradient_flows_through_probabilities_only():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(1, -1).indices
    load_balancing_loss(probs, ids).backward()
    assert logits.grad.abs().sum() > 0


def test_padding_changes_nothing():
    probs = torch.softmax(torch.randn(5, 4), -1)
    ids = probs.topk(2, -1).indices
    logits = torch.randn(5, 4)
    gates = torch.zeros(5, 4).scatter(1, ids, 0.5)
    pad_probs = torch.cat([probs, torch.softmax(torch.randn(3, 4) * 5, -1)])
    pad_ids = torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)])
    pad_logits = torch.cat([logits, torch.randn(3, 4) * 10])
    pad_gates = torch.cat([gates, torch.rand(3, 4)])
    mask = torch.tensor([1.0] * 5 + [0.0] * 3)
    torch.testing.assert_close(load_balancing_loss(pad_probs, pad_ids, mask), load_balancing_loss(probs, ids))
    torch.testing.assert_close(z_loss(pad_logits, mask), z_loss(logits))
    torch.testing.assert_close(importance_loss(pad_gates, mask), importance_loss(gates))


def test_layer_losses_ignore_padding_tokens():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2))
    x = torch.randn(1, 5, 8)
    moe(x)
    clean = {k: v.detach().clone() for k, v in moe.aux_losses.items()}
    counts = moe.stats.tokens_per_expert.clone()
    moe.stats.reset()
    padded = torch.cat([x, torch.randn(1, 3, 8) * 10], dim=1)
    moe(padded, attention_mask=torch.tensor([[1] * 5 + [0] * 3]))
    for k, v in clean.items():
        torch.testing.assert_close(moe.aux_losses[k], v, msg=k)
    assert torch.equal(moe.stats.tokens_per_expert, counts)
    assert int(moe.stats.tokens) == 5


def test_z_loss_hand_computed():
    assert float(z_loss(torch.zeros(3, 2))) == pytest.approx(math.log(2) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(z_loss(logits)) == pytest.approx(float(torch.logsumexp(logits, -1)) ** 2)


def test_importance_loss_hand_computed():
    assert float(importance_loss(torch.full((4, 2), 0.5))) == pytest.approx(0.0)
    # importance = [2, 0]: population variance 1, mean 1 -> CV² = 1
    assert float(importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == pytest.approx(1.0)


def test_uniform_router_gives_load_balancing_one_through_the_layer():
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=1, router_init="zeros"))
    moe(torch.randn(2, 3, 8))
    # P is uniform, so E·Σ f·P = Σ f = 1 whatever the (tie-broken) assignment.
    assert float(moe.aux_losses["load_balancing"]) == pytest.approx(1.0)
    assert float(moe.aux_losses["z"]) == pytest.approx(math.log(4) ** 2)


def test_weighted_aux_loss_uses_config_weights():
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=8,
        intermediate_size=16,
        num_experts=4,
        aux_loss_weight=0.5,
        z_loss_weight=0.1,
        importance_loss_weight=0.2,
    )
    moe = MoE(cfg)
    moe(torch.randn(2, 3, 8))
    a = moe.aux_losses
    expected = 0.5 * a["load_balancing"] + 0.1 * a["z"] + 0.2 * a["importance"]
    torch.testing.assert_close(moe.weighted_aux_loss(), expected)


def test_stats_accumulate_in_train_and_eval_and_reset():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2))
    moe.train()
    moe(torch.randn(2, 5, 8))
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(1, 5, 8))
    assert int(moe.stats.tokens) == 15
    assert int(moe.stats.tokens_per_expert.sum()) == 30  # two assignments per token
    s = moe.stats.summary()
    assert sum(s["fraction"]) == pytest.approx(1.0)
    assert 0.0 < s["balance"] <= 1.0
    assert s["max_violation"] >= 0.0
    moe.stats.reset()
    assert int(moe.stats.tokens) == 0 and moe.stats.summary()["balance"] == 1.0


def test_balance_figure_extremes():
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=1))
    moe.stats.update(torch.tensor([5, 5, 5, 5]), 0, 20)
    assert moe.stats.balance() == pytest.approx(1.0) and moe.stats.max_violation() == pytest.approx(0.0)
    moe.stats.reset()
    moe.stats.update(torch.tensor([20, 0, 0, 0]), 0, 20)
    assert moe.stats.balance() == pytest.approx(0.0) and moe.stats.max_violation() == pytest.approx(3.0)


def test_stats_are_not_saved_with_the_weights():
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4))
    assert not any("stats" in k for k in moe.state_dict())


def test_equivalent_aux_loss_weights_give_the_same_total():
    from upcycle.moe.losses import equivalent_aux_loss_weights

    torch.manual_seed(0)
    L, K, w = 3, 2, 0.01
    probs = [torch.softmax(torch.randn(20, 4) * 2, -1) for _ in range(L)]
    ids = [p.topk(K, -1).indices for p in probs]
    ours = w * torch.stack([load_balancing_loss(p, i) for p, i in zip(probs, ids)]).mean()
    eq = equivalent_aux_loss_weights(w, L, K)
    # Switch / Megatron-LM: α · loss added per layer.
    per_layer = eq["per_layer_sum"] * sum(load_balancing_loss(p, i) for p, i in zip(probs, ids))
    torch.testing.assert_close(per_layer, ours)

    # Hugging Face's per-layer value (f per token sums to k) is k times ours.
    def hf_value(p, i):
        f = torch.zeros_like(p).scatter(1, i, 1.0).mean(0)
        return p.shape[-1] * (f * p.mean(0)).sum()

    hf = eq["hugging_face"] * torch.stack([hf_value(p, i) for p, i in zip(probs, ids)]).mean()
    torch.testing.assert_close(hf, ours)


@pytest.mark.parametrize("unit", ["sequence", "sequence_prefix"])
def test_sequence_unit_losses_ignore_padding(unit):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2, routing_unit=unit))
    x = torch.randn(1, 5, 8)
    moe(x)
    clean = {k: v.detach().clone() for k, v in moe.aux_losses.items()}
    padded = torch.cat([x, torch.randn(1, 3, 8) * 10], dim=1)
    moe(padded, attention_mask=torch.tensor([[1] * 5 + [0] * 3]))
    for k, v in clean.items():
        torch.testing.assert_close(moe.aux_losses[k], v, msg=k)
