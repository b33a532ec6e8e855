"""Parameter and FLOPs accounting for dense and MoE checkpoints, read from their config alone.

FLOPs follow Drop-Upcycling's Table 3 (forward pass, 2·m·k·n per matrix product, embeddings counted as a
product with the vocabulary, element-wise ops, norms and router omitted):

    embeddings      2·s·v·d_h
    attention/layer 4·s·d_h·d_k·n_kv + 2·s·d_h·d_k·n_h + 4·s²·d_k·n_h + 2·s·d_k·n_h·d_h
    FFN/layer       dense: (2 or 3 matrices)·2·s·d_h·d_f ; MoE: top_k experts + shared experts
    logits          2·s·d_h·v

reported per token (divided by s) at a given sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.moe import MoEConfig


@dataclass
class Accounting:
    total_params: int
    active_params: int
    flops_per_token: float
    dense_flops_per_token: float
    """FLOPs per token of the same model with dense MLPs (the source it was upcycled from)."""
    seq_len: int


def _dims(config) -> dict:
    d_h = config.hidden_size
    n_h = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_h
    d_k = getattr(config, "head_dim", None) or d_h // n_h
    n_inner = getattr(config, "n_inner", None)
    d_f = getattr(config, "intermediate_size", None) or n_inner or 4 * d_h
    return dict(
        d_h=d_h, n_h=n_h, n_kv=n_kv, d_k=d_k, d_f=d_f, v=config.vocab_size, n_l=config.num_hidden_layers
    )


def _mlp_matrices(expert_type: str) -> int:
    return 3 if expert_type == "glu" else 2


def expert_params(moe: MoEConfig, intermediate: int | None = None) -> int:
    F_ = moe.intermediate_size if intermediate is None else intermediate
    D = moe.hidden_size
    n = _mlp_matrices(moe.expert_type) * D * F_
    if moe.expert_bias:
        n += (_mlp_matrices(moe.expert_type) - 1) * F_ + D
    return n


def account(config, total_params: int, seq_len: int | None = None) -> Accounting:
    """Active parameters and FLOPs per token of a (possibly MoE) causal-LM config."""
    dims = _dims(config)
    s = seq_len or getattr(config, "max_position_embeddings", None) or 1024
    d_h, n_h, n_kv, d_k, d_f, v, n_l = (dims[k] for k in ("d_h", "n_h", "n_kv", "d_k", "d_f", "v", "n_l"))
    glu = config.model_type not in ("gpt2", "moe_gpt2")
    attn = (
        4 * s * d_h * d_k * n_kv + 2 * s * d_h * d_k * n_h + 4 * s * s * d_k * n_h + 2 * s * d_k * n_h * d_h
    )
    dense_ffn = (3 if glu else 2) * 2 * s * d_h * d_f
    embed_logits = 2 * s * v * d_h + 2 * s * d_h * v

    moe_layers = list(getattr(config, "moe_layers", None) or [])
    moe_cfg = None
    if moe_layers:
        data = dict(config.moe)
        data.setdefault("hidden_size", d_h)
        moe_cfg = MoEConfig.from_dict(data)
    flops = embed_logits + n_l * attn
    active = total_params
    for layer in range(n_l):
        if moe_cfg is not None and layer in moe_layers:
            m = moe_cfg
            per_expert = _mlp_matrices(m.expert_type) * 2 * s * d_h * m.intermediate_size
            shared = m.num_shared_experts * _mlp_matrices(m.expert_type) * 2 * s * d_h * m.shared_size
            flops += m.top_k * per_expert + shared
            active -= (m.num_experts - m.top_k) * expert_params(m)
        else:
            flops += dense_ffn
    dense_flops = embed_logits + n_l * (attn + dense_ffn)
    return Accounting(total_params, active, flops / s, dense_flops / s, s)
