"""The MoE layer: routers, experts, dispatch, auxiliary losses and routing statistics.

    from upcycle.moe import MoE, MoEConfig
    moe = MoE(MoEConfig(hidden_size=768, intermediate_size=3072, num_experts=8, top_k=1))
    y = moe(x)                      # (batch, seq, 768) -> (batch, seq, 768)
    moe.aux_losses                  # {'load_balancing', 'z', 'importance'} for this call
    moe.stats.summary()             # tokens per expert, balance, dropped

The routed experts run on one of three paths (``upcycle.moe.paths``): one grouped GEMM per projection
without host synchronisation (``upcycle.moe.grouped``; the default on GPU and under ``torch.compile``),
side by side on single-threaded CPU workers (``upcycle.moe.bank``; the default on CPU), or one after
another. ``set_expert_path("loop")`` or ``UPCYCLE_EXPERT_PATH`` chooses; all compute the same thing.

No training code lives here (design notes, rules of the house).
"""

from upcycle.moe.bank import cpu_expert_workers, cpu_expert_workers_set, set_cpu_expert_workers
from upcycle.moe.config import MoEConfig, parse_router_init
from upcycle.moe.experts import ExpertList, GLUExpert, MLPExpert, activation_fn
from upcycle.moe.layer import MoE, MoEContext
from upcycle.moe.losses import importance_loss, load_balancing_loss, z_loss
from upcycle.moe.paths import expert_path, expert_path_set, set_expert_path
from upcycle.moe.router import Router, Routing, score
from upcycle.moe.stats import RouterStats

__all__ = [
    "ExpertList",
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
    "expert_path",
    "expert_path_set",
    "importance_loss",
    "load_balancing_loss",
    "parse_router_init",
    "score",
    "set_cpu_expert_workers",
    "set_expert_path",
    "z_loss",
]
