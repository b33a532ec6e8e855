"""torch.compile of MoE layers on CPU: no graph break inside the layer for a fixed token count, compiled
outputs and gradients equal to eager, statistics and losses still counted (issue 16)."""

from __future__ import annotations

import pytest
import torch

from tests.moe.test_grouped import tiny_moe_model
from upcycle.moe import MoE, MoEConfig, grouped

TRACED = [
    dict(top_k=1),
    dict(top_k=2, expert_type="glu"),
    dict(top_k=2, capacity_factor=1.0),
    dict(top_k=1, routing_unit="sequence"),
    dict(top_k=2, num_shared_experts=1, shared_expert_gate=True),
    dict(top_k=2, noisy_gating=True, router_jitter=0.1, router_type="mlp"),
    dict(top_k=1, router_mode="random"),
]


@pytest.mark.parametrize("kw", TRACED, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_layer_traces_as_one_graph(kw):
    """Dynamo alone (no code generation): the whole layer, padding mask included, is one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, **kw)).train()
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    explained = torch._dynamo.explain(moe)(torch.randn(2, 8, 16), attention_mask=mask)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_moe_layers_of_a_model_match_eager(monkeypatch):
    """Inductor on a tiny MoE GPT-2 (top-2, biases, capacity factor, padding): the MoE layers compiled
    with fullgraph=True (a graph break inside them would raise) run the grouped path, and the model's
    loss, auxiliary losses, logits, every gradient and the routing statistics equal eager mode."""
    torch._dynamo.reset()
    calls = []
    run = grouped.run
    monkeypatch.setattr(grouped, "run", lambda *a: calls.append(1) or run(*a))
    model = tiny_moe_model(capacity_factor=1.0, z_loss_weight=0.01).eval()  # no dropout, no jitter
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0

    def step():
        model.zero_grad(set_to_none=True)
        model.reset_routing_stats()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, model.routing_stats()

    eager, eager_grads, eager_stats = step()
    assert not calls  # eager on CPU: the bank (or the loop)
    for moe in model.moe_layers().values():
        moe.compile(fullgraph=True, backend="inductor")
    compiled, grads, stats = step()
    assert calls  # traced on the grouped path (auto while compiling)
    for name in ("loss", "aux_loss", "z_loss", "load_balancing_loss", "logits"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert stats == eager_stats and stats[1]["dropped"] > 0
    again, _, _ = step()  # a second call reuses the compiled graph
    torch.testing.assert_close(again.loss, eager.loss, atol=1e-5, rtol=1e-5)
