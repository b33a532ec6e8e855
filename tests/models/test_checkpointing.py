"""Gradient checkpointing with every routing option: the recomputed blocks route as their forward did,
so losses, gradients and routing statistics equal those of the run without checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.models.tiny import tiny_moe, token_ids
from upcycle.config import ConfigError

OPTIONS = {
    "token": {},
    "sequence": {"routing_unit": "sequence"},
    "sequence_prefix": {"routing_unit": "sequence_prefix"},
    "global": {"global_routing": True},
    "global_sequence_prefix": {"global_routing": True, "routing_unit": "sequence_prefix"},
    "fixed": {"router_mode": "fixed", "top_k": 1},
    "frozen": {"router_mode": "frozen"},
    "random": {"router_mode": "random"},
    "noisy": {"noisy_gating": True},
    "jitter": {"router_jitter": 0.2},
    "mlp_router": {"router_type": "mlp", "router_bias": True},
    "embedding_router": {"router_type": "embedding", "domain_embedding_size": 8, "router_hidden_size": 16},
    "capacity": {"capacity_factor": 1.0},
}


def enable_checkpointing(model, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it; the old name still works
        model.gradient_checkpointing_enable(**kwargs)


def train_step(model, labels_per_sequence=None):
    ids = token_ids(3, 12)
    # Left padding in row 1 and right padding in row 2: the recompute must see the mask as well.
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, -3:] = 0
    kwargs = {"sequence_labels": labels_per_sequence} if labels_per_sequence is not None else {}
    model.train()
    model.reset_routing_stats()
    torch.manual_seed(1)  # jitter, gating noise and random routers draw the same in both runs
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, model.routing_stats()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_checkpointed_gradients_equal_plain_ones(family, option):
    moe = OPTIONS[option]
    labels = torch.tensor([2, 0, 3]) if moe.get("router_mode") == "fixed" else None
    plain = tiny_moe(family, **moe)
    checkpointed = tiny_moe(family, **moe)
    enable_checkpointing(checkpointed)
    loss, grads, stats = train_step(plain, labels)
    loss_ckpt, grads_ckpt, stats_ckpt = train_step(checkpointed, labels)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if option.startswith("global") or option in ("token", "sequence", "embedding_router"):
        router = [n for n in grads if ".router." in n]
        assert router and all(grads[n].abs().sum() > 0 for n in router)  # the router does learn
    # The recompute does not count the tokens a second time.
    assert stats_ckpt == stats


def test_reentrant_checkpointing_replays_the_sequence_labels():
    # A reentrant checkpoint recomputes in backward too; fixed routing has no router (no auxiliary losses).
    labels = torch.tensor([1, 3, 0])
    plain = tiny_moe("gpt2", router_mode="fixed", top_k=1)
    checkpointed = tiny_moe("gpt2", router_mode="fixed", top_k=1)
    enable_checkpointing(checkpointed, gradient_checkpointing_kwargs={"use_reentrant": True})
    _, grads, _ = train_step(plain, labels)
    _, grads_ckpt, _ = train_step(checkpointed, labels)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("moe", [{}, {"global_routing": True}])
def test_reentrant_checkpointing_of_routers_is_refused(moe):
    # Its forward runs without autograd: the auxiliary losses, which leave the block beside its output,
    # would silently get no gradient.
    model = tiny_moe("llama", **moe)
    with pytest.raises(ConfigError, match="use_reentrant"):
        enable_checkpointing(model, gradient_checkpointing_kwargs={"use_reentrant": True})
