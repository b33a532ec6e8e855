"""Every routing variant against the dense reference: outputs and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.moe.reference import reference_forward, reference_logits
from upcycle.moe import MoE, MoEConfig, MoEContext

D, F_, E = 16, 24, 4


def make(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    kw.setdefault("router_init", "normal:0.5")  # spread logits so no near-ties decide top-k
    moe = MoE(MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=E, **kw))
    # Non-zero biases so bias handling is exercised.
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return moe


def check_against_reference(moe: MoE, B=3, S=7, mask=None, labels=None, atol=1e-5, x=None):
    torch.manual_seed(1)
    x = (torch.randn(B, S, D) if x is None else x).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(B, S, D)
    if mask is not None:
        # What a layer outputs at padding positions is unspecified (a prefix sum before the first real
        # token is zero, a tie); real tokens' outputs and every gradient through them are compared.
        grad = grad * mask.unsqueeze(-1)

    y = moe(x, attention_mask=mask, sequence_labels=labels)
    (y * grad).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    got_x = x.grad.clone()
    moe.zero_grad(set_to_none=True)

    y_ref = reference_forward(moe, x_ref, mask, labels)
    (y_ref * grad).sum().backward()
    real = 1.0 if mask is None else mask.unsqueeze(-1)
    torch.testing.assert_close(y * real, y_ref * real, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got_x, x_ref.grad, atol=atol, rtol=1e-5)
    for n, p in moe.named_parameters():
        if p.grad is None:
            continue
        assert n in got, f"{n} got no gradient from the sparse layer"
        torch.testing.assert_close(got[n], p.grad, atol=atol, rtol=1e-4, msg=f"gradient of {n}")
    return y


VARIANTS = [
    dict(top_k=1, renormalize=False),
    dict(top_k=1, renormalize=True),
    dict(top_k=2, renormalize=True),
    dict(top_k=2, renormalize=False),
    dict(top_k=3, score_order="topk_softmax"),
    dict(top_k=1, score_order="topk_softmax"),
    dict(top_k=2, expert_type="glu"),
    dict(top_k=2, expert_type="glu", expert_bias=True, activation="gelu"),
    dict(top_k=1, router_type="mlp", router_hidden_size=8, router_bias=True),
    dict(top_k=2, num_shared_experts=1),
    dict(
        top_k=2, expert_type="glu", num_shared_experts=2, shared_intermediate_size=12, shared_expert_gate=True
    ),
    dict(top_k=1, routing_unit="sequence", renormalize=False),
    dict(top_k=2, routing_unit="sequence"),
    dict(top_k=3, routing_unit="sequence", score_order="topk_softmax"),
    dict(top_k=1, routing_unit="sequence_prefix", renormalize=False),
    dict(top_k=2, routing_unit="sequence_prefix", renormalize=False),
    dict(top_k=1, capacity_factor=1.0, renormalize=False),
    dict(top_k=2, capacity_factor=0.5),
    dict(top_k=4),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_variant_matches_dense_reference(kw):
    check_against_reference(make(**kw))


@pytest.mark.parametrize("unit", ["token", "sequence", "sequence_prefix"])
def test_padding_mask_matches_reference(unit):
    # Right padding, and left padding in the last row (a prefix sum must start at the first real token).
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 3 + [1] * 4])
    check_against_reference(make(top_k=2, routing_unit=unit), mask=mask)


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_frozen_router_holds_buffers_that_no_optimizer_can_train(router_type):
    moe = make(top_k=2, router_mode="frozen", router_type=router_type, router_bias=True, noisy_gating=True)
    before = {k: v.clone() for k, v in moe.router.state_dict().items()}
    # Same state-dict keys as a learned router (checkpoints load either way), but no parameters.
    learned = make(top_k=2, router_type=router_type, router_bias=True, noisy_gating=True)
    assert before.keys() == learned.router.state_dict().keys()
    assert list(moe.router.parameters()) == []
    check_against_reference(moe.eval())  # eval: no gating noise, so the reference applies
    moe.train()
    # Even an optimiser over everything, with requires_grad switched on as from_pretrained does for
    # parameters, leaves the router unchanged.
    moe.requires_grad_(True)
    opt = torch.optim.SGD(moe.parameters(), lr=1.0)
    moe(torch.randn(2, 5, D)).sum().backward()
    opt.step()
    for k, v in moe.router.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_random_router_draws_fresh_weights_every_call_from_the_init(router_type):
    from upcycle.moe.router import init_router_weight

    moe = make(top_k=1, router_mode="random", router_init="normal:0.02", router_type=router_type)
    stored = {k: v.clone() for k, v in moe.router.state_dict().items()}
    x = torch.randn(2, 5, D)
    torch.manual_seed(7)
    moe(x).sum().backward()
    first = moe.last_routing.logits_UE
    # The draw is what the configured init gives from the same RNG state: output layer, then hidden.
    torch.manual_seed(7)
    w = torch.empty(E, moe.router.weight.shape[1])
    init_router_weight(w, ("normal", 0.02))
    h = x.view(-1, D)
    if router_type == "mlp":
        hw = torch.empty_like(moe.router.hidden.weight)
        init_router_weight(hw, ("normal", 0.02))
        h = torch.relu(h @ hw.t())
    torch.testing.assert_close(first, h @ w.t())
    moe(x)
    assert not torch.equal(moe.last_routing.logits_UE, first)  # redrawn
    assert list(moe.router.parameters()) == []
    # The stored weights are never changed by a forward: a checkpoint stays what was converted.
    assert all(torch.equal(v, stored[k]) for k, v in moe.router.state_dict().items())


def test_fixed_routing_follows_sequence_labels():
    moe = make(top_k=1, router_mode="fixed")
    assert moe.router is None
    labels = torch.tensor([2, 0, 3])
    check_against_reference(moe, labels=labels)
    ids = moe.last_routing.ids_TK.view(3, 7)
    assert (ids == labels.view(3, 1)).all()
    assert moe.aux_losses == {}
    with pytest.raises(ValueError, match="sequence labels|one label per sequence"):
        moe(torch.randn(3, 7, D))


def test_sequence_routing_sends_a_sequence_to_the_same_experts():
    moe = make(top_k=2, routing_unit="sequence")
    moe(torch.randn(4, 9, D))
    ids = moe.last_routing.ids_TK.view(4, 9, 2)
    assert (ids == ids[:, :1]).all()


def test_sequence_routing_ignores_padding_tokens():
    moe = make(top_k=1, routing_unit="sequence")
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    moe(x, attention_mask=mask)
    first = moe.last_routing.logits_UE.clone()
    x2 = x.clone()
    x2[0, 3:] = torch.randn(3, D) * 10  # change only padding
    moe(x2, attention_mask=mask)
    torch.testing.assert_close(moe.last_routing.logits_UE, first)


def test_global_routing_followers_reuse_the_first_layer_decision():
    torch.manual_seed(0)
    ctx = MoEContext()
    cfg = MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=E, top_k=2, global_routing=True)
    layers = [MoE(cfg, context=ctx) for _ in range(3)]
    assert layers[0].router is not None and layers[1].router is None and layers[2].router is None
    x = torch.randn(2, 5, D, requires_grad=True)
    with ctx.scope():
        h = x
        for layer in layers:
            h = h + layer(h)
    ids0 = layers[0].last_routing.ids_TK
    assert all(torch.equal(layer.last_routing.ids_TK, ids0) for layer in layers[1:])
    # Followers' outputs equal the dense reference routed by the leader's router on the leader's input.
    ref = reference_forward(layers[1], x.detach(), routing_from=layers[0])
    with ctx.scope():
        layers[0](x.detach())
        torch.testing.assert_close(layers[1](x.detach()), ref, atol=1e-5, rtol=1e-5)
    h.sum().backward()
    assert layers[0].router.weight.grad is not None and layers[0].router.weight.grad.abs().sum() > 0
    # A follower called before the leader in a pass is an error, not a silent reuse of stale routing.
    with ctx.scope(), pytest.raises(RuntimeError, match="global routing"):
        layers[1](x)


def test_jitter_touches_router_input_only_and_is_off_in_eval():
    moe = make(top_k=1, router_jitter=0.5, renormalize=False)
    x = torch.randn(2, 8, D)
    moe.eval()
    y1, y2 = moe(x), moe(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(moe.last_routing.logits_UE, reference_logits(moe, x.view(-1, D)))
    moe.train()
    torch.manual_seed(3)
    y = moe(x)
    logits = moe.last_routing.logits_UE
    assert not torch.allclose(logits, reference_logits(moe, x.view(-1, D)))
    # The experts saw the clean input: recompute the output from the recorded routing on clean x.
    r = moe.last_routing
    out = torch.zeros(16, D)
    for t in range(16):
        e = int(r.ids_TK[t, 0])
        out[t] = r.weights_TK[t, 0] * moe.experts[e](x.view(-1, D)[t])
    torch.testing.assert_close(y.view(-1, D), out, atol=1e-5, rtol=1e-5)
    # Jitter is multiplicative U(1-ε, 1+ε) per input entry, so each logit moves by at most
    # ε · Σ_d |W_ed x_d| from its clean value, and by a visible fraction of that bound.
    clean = reference_logits(moe, x.view(-1, D))
    bound = 0.5 * (x.view(-1, 1, D).abs() * moe.router.weight.detach().abs()).sum(-1)
    moved = (logits - clean).abs()
    assert (moved <= bound + 1e-5).all()
    assert float((moved / bound).max()) > 0.1


def test_noisy_gating_trains_noise_weights_and_is_off_in_eval():
    moe = make(top_k=2, noisy_gating=True)
    x = torch.randn(3, 6, D)
    moe.eval()
    moe(x)
    torch.testing.assert_close(moe.last_routing.logits_UE, reference_logits(moe, x.view(-1, D)))
    moe.train()
    y = moe(x)
    assert not torch.allclose(moe.last_routing.logits_UE, reference_logits(moe, x.view(-1, D)))
    (y.sum() + moe.aux_losses["load_balancing"]).backward()
    assert moe.router.noise_weight.grad is not None and moe.router.noise_weight.grad.abs().sum() > 0


def test_capacity_drops_overflow_in_priority_order():
    moe = make(top_k=1, capacity_factor=1.0, renormalize=False)
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight.zero_()
        moe.router.weight[0] = 0  # logits from the bias alone
        moe.router.bias = torch.nn.Parameter(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    B, S = 1, 8
    x = torch.randn(B, S, D)
    y = moe(x)
    capacity = 2  # ceil(1.0 * 8 * 1 / 4)
    kept = y.view(S, D).abs().sum(-1) > 0
    assert kept.tolist() == [True] * capacity + [False] * (S - capacity)
    assert int(moe.stats.dropped) == S - capacity
    assert moe.stats.tokens_per_expert.tolist() == [capacity, 0, 0, 0]
    assert moe.stats.summary()["dropped_fraction"] == pytest.approx((S - capacity) / S)


def test_capacity_keeps_first_choices_before_second_choices():
    moe = make(top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias = torch.nn.Parameter(torch.tensor([3.0, 2.0, -5.0, -5.0]))
    torch.manual_seed(0)
    x = torch.randn(1, 4, D)
    # capacity = ceil(1·4·2/4) = 2: expert 0 takes two first choices, expert 1 two second choices.
    moe(x)
    assert moe.stats.tokens_per_expert.tolist() == [2, 2, 0, 0]
    assert int(moe.stats.dropped) == 4
    check_against_reference(moe, B=1, S=4)


def test_all_experts_get_gradients_even_when_unused():
    moe = make(top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0  # route everything to one expert
    x = torch.ones(1, 4, D)
    moe(x).sum().backward()
    for e in moe.experts:
        for p in e.parameters():
            assert p.grad is not None  # zeros, not None: DDP needs every parameter in the graph


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_math_is_float32_in_low_precision(dtype):
    moe = make(top_k=2).to(dtype)
    x = torch.randn(2, 5, D, dtype=dtype)
    y = moe(x)
    assert y.dtype == dtype
    assert moe.last_routing.logits_UE.dtype == torch.float32
    assert moe.last_routing.weights_TK.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in moe.aux_losses.values())


def test_two_dimensional_input_and_inference_mode():
    moe = make(top_k=2)
    x = torch.randn(10, D)
    with torch.inference_mode():
        y = moe(x)
    assert y.shape == (10, D)
    assert int(moe.stats.tokens) == 10


@pytest.mark.parametrize("k,unit", list(itertools.product([1, 2], ["token", "sequence"])))
def test_combine_weights_sum_as_configured(k, unit):
    moe = make(top_k=k, routing_unit=unit)
    moe(torch.randn(2, 5, D))
    total = moe.last_routing.weights_TK.sum(-1)
    assert moe.config.weights_sum_to_one == (unit == "token" or k > 1)
    if moe.config.weights_sum_to_one:
        torch.testing.assert_close(total, torch.ones(10))
    else:  # sequence top-1: Fan et al.'s eq. 1, the raw probability of the chosen expert
        assert float(total.max()) < 1


# ----------------------------------------------------------------------------- sequence units (Fan et al.)


def hidden_states(B: int, S: int, seed: int = 5) -> torch.Tensor:
    """Hidden states with a component shared by the sequence's tokens (as real ones have), so that summed
    logits grow with length and sequences agree on their experts (an imbalance for the loss to see)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g) + torch.randn(1, 1, D, generator=g)


def test_sequence_routing_is_fan_et_al_eq2_on_long_sequences():
    """256-token sequences, top-2: one softmax of the summed logits is one-hot ([1, 1e-9]); Fan et al.'s
    second softmax over the chosen probabilities keeps the weights within [1/(1+e), e/(1+e)]."""
    moe = make(top_k=2, routing_unit="sequence")
    B, S = 3, 256
    check_against_reference(moe, B=B, S=S, atol=2e-5, x=hidden_states(B, S))
    r = moe.last_routing
    summed = r.logits_UE
    single = torch.softmax(summed, -1).topk(2, -1).values
    assert float(single[:, 1].max()) < 1e-6  # the input tells the two formulas apart
    w = r.weights_TK.view(B, S, 2)[:, 0]
    low, high = 1 / (1 + math.e), math.e / (1 + math.e)
    assert float(w.min()) >= low - 1e-6 and float(w.max()) <= high + 1e-6
    assert float(w[:, 1].min()) > 0.25
    # Top-1 follows eq. 1 (Switch), y = p_i E_i(x), with the default renormalize=True too (which would
    # make the weight 1 and cut the router off from the LM loss), for both sequence units.
    for unit in ("sequence", "sequence_prefix"):
        for renormalize in (True, False):
            one = make(top_k=1, routing_unit=unit, renormalize=renormalize, router_init="normal:0.02")
            one(torch.randn(2, 9, D))
            w = one.last_routing.weights_TK.view(2, 9)
            p = torch.softmax(one.last_routing.logits_UE, -1).max(-1).values  # per unit
            torch.testing.assert_close(w[:, :1] if unit == "sequence" else w, p.view(2, -1))
            assert float(w.max()) < 0.99


def test_sequence_losses_stay_bounded_and_keep_a_gradient_on_long_sequences():
    moe = make(top_k=2, routing_unit="sequence")
    token = make(top_k=2)  # same seed: the same router
    x = hidden_states(4, 256)
    moe(x)
    token(x)
    # z-loss on the per-token logits: equal to the token-level z-loss over the same tokens, not the
    # square of a logsumexp of 256-token sums.
    torch.testing.assert_close(moe.aux_losses["z"], token.aux_losses["z"])
    assert float(moe.aux_losses["z"]) < 100
    # The load-balancing loss averages softmax(mean logits): its gradient does not vanish with length.
    moe.aux_losses["load_balancing"].backward()
    assert float(moe.router.weight.grad.norm()) > 1e-3


def test_sequence_prefix_is_causal_and_sequence_leaks_the_future():
    x = torch.randn(2, 12, D)
    x2 = x.clone()
    x2[:, -1] = torch.randn(2, D) * 5  # change only the last token
    for unit, leaks in (("sequence_prefix", False), ("sequence", True)):
        moe = make(top_k=2, routing_unit=unit)
        with torch.no_grad():
            y, y2 = moe(x), moe(x2)
        earlier_moved = not torch.allclose(y[:, :-1], y2[:, :-1], atol=1e-6, rtol=0)
        assert earlier_moved == leaks, unit


def test_sequence_prefix_routes_each_token_on_the_sum_up_to_it():
    moe = make(top_k=2, routing_unit="sequence_prefix")
    x = torch.randn(1, 6, D)
    moe(x)
    logits = reference_logits(moe, x.view(-1, D))
    torch.testing.assert_close(moe.last_routing.logits_UE, logits.cumsum(0))
    # The first token is routed on its own logits, so its choice equals token routing's.
    assert torch.equal(moe.last_routing.ids_TK[0].sort().values, logits[0].topk(2).indices.sort().values)
