"""The MoE layer: routers, experts, dispatch, auxiliary losses and routing statistics.

    from upcycle.moe import MoE, MoEConfig
    moe = MoE(MoEConfig(hidden_size=768, intermediate_size=3072, num_experts=8, top_k=1))
    y = moe(x)                      # (batch, seq, 768) -> (batch, seq, 768)
    moe.aux_losses                  # {'load_balancing', 'z', 'importance'} for this call
    moe.stats.summary()             # tokens per expert, balance, dropped

On CPU the experts of a call run side by side on single-threaded workers (``upcycle.moe.bank``);
``set_cpu_expert_workers(1)`` runs them one after another instead.

No training code lives here (design notes, rules of the house).
"""

from upcycle.moe.bank import cpu_expert_workers, cpu_expert_workers_set, set_cpu_expert_workers
from upcycle.moe.config import MoEConfig, parse_router_init
from upcycle.moe.experts import GLUExpert, MLPExpert, activation_fn
from upcycle.moe.layer import MoE, MoEContext
from upcycle.moe.losses import equivalent_aux_loss_weights, importance_loss, load_balancing_loss, z_loss
from upcycle.moe.router import Router, Routing, score, score_sequence
from upcycle.moe.stats import RouterStats

__all__ = [
    "GLUExpert",
    "MLPExpert",
    "MoE",
    "MoEConfig",
    "MoEContext",
    "Router",
    "RouterStats",
    "Routing",
    "activation_fn",
    "cpu_expert_workers",
    "cpu_expert_workers_set",
    "equivalent_aux_loss_weights",
    "importance_loss",
    "load_balancing_loss",
    "parse_router_init",
    "score",
    "score_sequence",
    "set_cpu_expert_workers",
    "z_loss",
]
