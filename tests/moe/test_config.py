"""MoEConfig validation: every bad value is an error naming the field and what is allowed."""

from __future__ import annotations

import pytest

from upcycle.config import ConfigError
from upcycle.moe import MoE, MoEConfig, parse_router_init

BASE = dict(hidden_size=8, intermediate_size=16)


@pytest.mark.parametrize(
    "kw,field,allowed",
    [
        (dict(top_k=9, num_experts=8), "top_k", "≤ num_experts"),
        (dict(top_k=0), "top_k", "positive integer"),
        (dict(num_experts=0), "num_experts", "positive integer"),
        (dict(score_order="softmax"), "score_order", "'softmax_topk', 'topk_softmax'"),
        (dict(expert_type="swiglu"), "expert_type", "'mlp', 'glu'"),
        (dict(router_type="conv"), "router_type", "'linear', 'mlp'"),
        (dict(router_mode="hash"), "router_mode", "'learned', 'frozen', 'random', 'fixed'"),
        (dict(routing_unit="doc"), "routing_unit", "'token', 'sequence', 'sequence_prefix'"),
        (dict(activation="tanh"), "activation", "gelu_new"),
        (dict(router_init="normal"), "router_init", "normal:STD"),
        (dict(router_init="uniform:-1"), "router_init", "positive"),
        (dict(router_init="xavier:1"), "router_init", "zeros"),
        (dict(router_jitter=1.5), "router_jitter", "[0, 1)"),
        (dict(router_jitter=-0.1), "router_jitter", "≥ 0"),
        (dict(capacity_factor=0), "capacity_factor", "> 0"),
        (dict(router_mode="fixed", top_k=2), "top_k", "one expert per sequence"),
        (dict(shared_expert_gate=True), "shared_expert_gate", "num_shared_experts"),
        (dict(router_type="mlp", router_init="zeros"), "router_init", "constant"),
        (dict(aux_loss_weight=-1), "aux_loss_weight", "≥ 0"),
    ],
)
def test_invalid_values_name_the_field(kw, field, allowed):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**BASE, **kw)
    assert err.value.field == field
    assert field in str(err.value) and allowed in str(err.value)


def test_defaults_follow_the_expert_type():
    mlp = MoEConfig(**BASE)
    glu = MoEConfig(**BASE, expert_type="glu")
    assert (mlp.activation, mlp.expert_bias) == ("gelu_new", True)
    assert (glu.activation, glu.expert_bias) == ("silu", False)
    assert mlp.router_init == "normal:0.02"


def test_round_trip_through_dict():
    cfg = MoEConfig(**BASE, num_experts=4, top_k=1, router_jitter=0.01, capacity_factor=1.25)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_lists_known_fields():
    with pytest.raises(ConfigError, match="known fields are .*top_k"):
        MoEConfig.from_dict({**BASE, "topk": 2})


def test_router_init_spec_is_applied():
    assert parse_router_init("uniform:0.0346") == ("uniform", 0.0346)
    moe = MoE(MoEConfig(**BASE, num_experts=4, router_init="uniform:0.1"))
    assert float(moe.router.weight.detach().abs().max()) <= 0.1
    moe = MoE(MoEConfig(**BASE, num_experts=4, router_init="zeros"))
    assert float(moe.router.weight.detach().abs().max()) == 0.0


@pytest.mark.parametrize(
    "kw,sums_to_one,lm_gradient",
    [
        (dict(top_k=1), True, False),  # renormalised top-1: weight ≡ 1
        (dict(top_k=1, score_order="topk_softmax"), True, False),
        (dict(top_k=1, renormalize=False), False, True),  # Switch
        (dict(top_k=2, renormalize=False), False, True),
        (dict(top_k=2, renormalize=False, routing_unit="sequence"), True, True),  # Fan et al. eq. 2
        (dict(top_k=1, renormalize=False, routing_unit="sequence_prefix"), False, True),  # eq. 1
        (dict(top_k=1, router_mode="fixed"), True, False),
    ],
)
def test_combine_weight_properties(kw, sums_to_one, lm_gradient):
    cfg = MoEConfig(**BASE, num_experts=4, **kw)
    assert cfg.weights_sum_to_one is sums_to_one
    assert cfg.router_learns_from_lm_loss is lm_gradient
