"""The Nexus embedding router (Gritsch et al. 2024, §3): logits x · P(d_i), P a 2-layer SwiGLU projection of
fixed domain embeddings, against the paper's equations written out in ``tests/moe/reference.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.moe.reference import expert_embeddings, reference_logits
from tests.moe.test_routing import check_against_reference
from upcycle.config import ConfigError
from upcycle.moe import MoE, MoEConfig

D, F_, E, M, H = 16, 24, 4, 5, 12


def make(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    kw = {"router_init": "normal:0.5", "router_type": "embedding", "domain_embedding_size": M,
          "router_hidden_size": H, **kw}  # fmt: skip
    moe = MoE(MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=E, **kw))
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() == 1:  # non-zero expert biases, so bias handling is exercised
                p.normal_(0, 0.1)
        # Domain embeddings of uneven scale: stored as unit vectors.
        moe.router.set_domain_embeddings(torch.randn(E, M) * torch.tensor([[0.1], [1.0], [5.0], [30.0]]))
    return moe


def test_logits_are_tokens_dot_projected_domain_embeddings():
    moe = make()
    x = torch.randn(2, 9, D)
    moe(x)
    d = moe.router.domain_embeddings
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(E))
    # Nexus §3 by hand: e_i = W2 · SwiGLU(W1 · d_i), logit_i = x · e_i.
    W1, W2 = moe.router.projection_in.weight, moe.router.projection_out.weight
    a, b = (d @ W1.t()).split(H, dim=-1)
    e = (F.silu(a) * b) @ W2.t()
    torch.testing.assert_close(moe.last_routing.logits_UE, x.reshape(-1, D) @ e.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.effective_weight(), expert_embeddings(moe), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=1, renormalize=False, num_shared_experts=1),  # the paper's layer: shared + p·routed
        dict(top_k=2, renormalize=True),
        dict(top_k=2, score_order="topk_softmax", capacity_factor=1.0),
        dict(top_k=2, routing_unit="sequence_prefix"),
    ],
)
def test_outputs_and_gradients_match_the_dense_reference(kw):
    check_against_reference(make(**kw))


def test_paper_layer_is_shared_plus_probability_times_top1_expert():
    # Fig. 2 of the paper: y = E_0(x) + gate · E_index(x), gate the top-1 softmax probability.
    moe = make(top_k=1, renormalize=False, num_shared_experts=1)
    x = torch.randn(3, 5, D)
    y = moe(x).reshape(-1, D)
    x_TD = x.reshape(-1, D)
    probs = torch.softmax(reference_logits(moe, x_TD), -1)
    gate, index = probs.max(-1)
    for t in range(x_TD.shape[0]):
        expected = moe.shared_experts[0](x_TD[t]) + gate[t] * moe.experts[int(index[t])](x_TD[t])
        torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=1e-5)


def test_projection_trains_and_domain_embeddings_are_a_buffer():
    moe = make(top_k=1, renormalize=False)
    params = dict(moe.router.named_parameters())
    assert set(params) == {"projection_in.weight", "projection_out.weight"}
    assert "domain_embeddings" in dict(moe.router.named_buffers())
    assert "domain_embeddings" in moe.router.state_dict()
    moe(torch.randn(2, 6, D)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())

    frozen = make(router_mode="frozen")
    assert list(frozen.router.parameters()) == []
    assert set(frozen.router.state_dict()) == {
        "domain_embeddings", "projection_in.weight", "projection_out.weight"
    }  # fmt: skip


def test_initial_logit_matrix_has_the_spread_of_a_linear_router_row():
    # W_in unit variance on unit domain embeddings, W_out scaled by the SwiGLU second moment: the rows of
    # P(d_i) start distributed like N(0, σ) linear-router rows (here σ = 0.02), for any M and H.
    torch.manual_seed(0)
    for m, h in ((7, 512), (300, 64)):
        cfg = MoEConfig(hidden_size=256, intermediate_size=8, num_experts=64, router_type="embedding",
                        domain_embedding_size=m, router_hidden_size=h)  # fmt: skip
        moe = MoE(cfg)
        moe.router.set_domain_embeddings(torch.randn(64, m))
        std = float(moe.router.effective_weight().std())
        assert 0.017 < std < 0.023, (m, h, std)


@pytest.mark.parametrize(
    "kw,field,allowed",
    [
        (dict(router_bias=True), "router_bias", "no bias"),
        (dict(router_mode="random"), "router_mode", "learned or frozen"),
        (dict(router_init="zeros"), "router_init", "constant"),
        (dict(domain_embedding_size=0), "domain_embedding_size", "positive integer"),
        (dict(router_type="linear", domain_embedding_size=8), "domain_embedding_size", "only the embedding router"),
    ],
)  # fmt: skip
def test_invalid_embedding_router_settings_name_the_field(kw, field, allowed):
    with pytest.raises(ConfigError) as err:
        MoEConfig(hidden_size=D, intermediate_size=F_, **{"router_type": "embedding", **kw})
    assert err.value.field == field and allowed in str(err.value)
