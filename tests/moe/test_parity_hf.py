"""Parity with Hugging Face's MoE blocks on identical weights: outputs, router logits and losses."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from upcycle.models.mapping import load_stacked_glu_experts
from upcycle.moe import MoE, MoEConfig, expert_path_set

D, F_, E = 32, 48, 8


def init_(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def capture_router_logits(block):
    store = {}
    block.gate.register_forward_hook(lambda m, i, o: store.__setitem__("logits", o[0]))
    return store


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(
    ("path", "hf_impl"), [("auto", "eager"), ("grouped", "eager"), ("grouped", "grouped_mm")]
)
def test_mixtral_block_parity(top_k, path, hf_impl):
    hf_cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=top_k, hidden_act="silu"
    )
    hf_cfg._experts_implementation = hf_impl
    hf = init_(MixtralSparseMoeBlock(hf_cfg)).eval()
    ours = MoE(MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=E, top_k=top_k, expert_type="glu"))
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
    load_stacked_glu_experts(ours, hf.experts.gate_up_proj, hf.experts.down_proj)
    ours.eval()

    x = torch.randn(3, 11, D)
    logits = capture_router_logits(hf)
    y_hf = hf(x)
    with expert_path_set(path):
        y = ours(x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_routing.logits_UE, logits["logits"], atol=1e-6, rtol=1e-6)

    # Load-balancing loss for one layer: HF normalises f per token (Σf = K); ours per assignment (Σf = 1).
    hf_loss = load_balancing_loss_func((logits["logits"],), E, top_k)
    torch.testing.assert_close(ours.aux_losses["load_balancing"] * top_k, hf_loss, atol=1e-6, rtol=1e-5)


def test_mixtral_loss_parity_with_padding():
    torch.manual_seed(0)
    ours = MoE(MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=E, top_k=2, expert_type="glu"))
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ours(x, attention_mask=mask)
    hf_loss = load_balancing_loss_func((ours.last_routing.logits_UE,), E, 2, attention_mask=mask)
    torch.testing.assert_close(ours.aux_losses["load_balancing"] * 2, hf_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("path", ["auto", "grouped"])
def test_qwen2_moe_block_parity_with_gated_shared_expert(norm_topk_prob, path):
    hf_cfg = Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F_,
        shared_expert_intermediate_size=2 * F_,
        num_experts=E,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
    )
    hf_cfg._experts_implementation = "eager"
    hf = init_(Qwen2MoeSparseMoeBlock(hf_cfg)).eval()
    ours = MoE(
        MoEConfig(
            hidden_size=D,
            intermediate_size=F_,
            num_experts=E,
            top_k=2,
            expert_type="glu",
            renormalize=norm_topk_prob,
            num_shared_experts=1,
            shared_intermediate_size=2 * F_,
            shared_expert_gate=True,
        )
    ).eval()
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
        shared = ours.shared_experts[0]
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(shared, name).weight.copy_(getattr(hf.shared_expert, name).weight)
    load_stacked_glu_experts(ours, hf.experts.gate_up_proj, hf.experts.down_proj)

    x = torch.randn(2, 9, D)
    logits = capture_router_logits(hf)
    with expert_path_set(path):
        y = ours(x)
    torch.testing.assert_close(y, hf(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_routing.logits_UE, logits["logits"], atol=1e-6, rtol=1e-6)
