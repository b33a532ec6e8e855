"""Explicit state-dict mappings between our MoE layer and Hugging Face's stacked-expert layouts.

Hugging Face Mixtral / Qwen2-MoE (transformers ≥ 5) store routed experts as 3-D tensors:
``gate_up_proj`` (E, 2F, D) with the gate rows first, and ``down_proj`` (E, D, F). Our experts are
separate ``GLUExpert`` modules (see upcycle/moe/experts.py for why).
"""

from __future__ import annotations

import torch

from upcycle.moe import MoE


def stacked_glu_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj (E, 2F, D), down_proj (E, D, F)) of a MoE with glu experts and no biases."""
    if moe.config.expert_type != "glu" or moe.config.expert_bias:
        raise ValueError("only gated (glu) experts without biases map onto Mixtral/Qwen2-MoE experts")
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight], 0) for e in moe.experts])
    down = torch.stack([e.down_proj.weight for e in moe.experts])
    return gate_up.detach(), down.detach()


@torch.no_grad()
def load_stacked_glu_experts(moe: MoE, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Copy Hugging Face stacked expert tensors into ``moe``'s experts."""
    F_ = moe.config.intermediate_size
    for e, expert in enumerate(moe.experts):
        expert.gate_proj.weight.copy_(gate_up[e, :F_])
        expert.up_proj.weight.copy_(gate_up[e, F_:])
        expert.down_proj.weight.copy_(down[e])
