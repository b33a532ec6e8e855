"""Tiny MoE causal LMs built from a config (random experts, so routing changes the output)."""

from __future__ import annotations

import torch

from upcycle.models.modeling import MoEGPT2Config, MoEGPT2LMHeadModel, MoELlamaConfig, MoELlamaForCausalLM

VOCAB = 96


def tiny_moe(family: str, seed: int = 0, layers=(0, 1, 2), **moe):
    """A 3-layer MoE GPT-2 or Llama, all dropout off; ``moe`` overrides MoEConfig fields."""
    torch.manual_seed(seed)
    # A wide router init spreads the logits, so near-ties do not decide top-k.
    fields = {**dict(intermediate_size=32, num_experts=4, top_k=2, router_init="normal:0.3"), **moe}
    common = dict(vocab_size=VOCAB, moe_layers=list(layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        config = MoEGPT2Config(
            n_layer=3, n_embd=32, n_head=2, n_inner=64, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, moe=fields, **common,
        )  # fmt: skip
        return MoEGPT2LMHeadModel(config)
    config = MoELlamaConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, moe=dict(fields, expert_type="glu"), **common,
    )  # fmt: skip
    return MoELlamaForCausalLM(config)


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
