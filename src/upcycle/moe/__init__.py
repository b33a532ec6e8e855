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

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "cpu_expert_workers": "upcycle.moe.bank",
    "cpu_expert_workers_set": "upcycle.moe.bank",
    "set_cpu_expert_workers": "upcycle.moe.bank",
    "MoEConfig": "upcycle.moe.config",
    "parse_router_init": "upcycle.moe.config",
    "GLUExpert": "upcycle.moe.experts",
    "MLPExpert": "upcycle.moe.experts",
    "ExpertList": "upcycle.moe.experts",
    "activation_fn": "upcycle.moe.experts",
    "MoE": "upcycle.moe.layer",
    "MoEContext": "upcycle.moe.layer",
    "expert_path": "upcycle.moe.paths",
    "expert_path_set": "upcycle.moe.paths",
    "set_expert_path": "upcycle.moe.paths",
    "importance_loss": "upcycle.moe.losses",
    "load_balancing_loss": "upcycle.moe.losses",
    "z_loss": "upcycle.moe.losses",
    "equivalent_aux_loss_weights": "upcycle.moe.losses",
    "Router": "upcycle.moe.router",
    "Routing": "upcycle.moe.router",
    "score": "upcycle.moe.router",
    "score_sequence": "upcycle.moe.router",
    "RouterStats": "upcycle.moe.stats",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "equivalent_aux_loss_weights",
    "expert_path",
    "expert_path_set",
    "importance_loss",
    "load_balancing_loss",
    "parse_router_init",
    "score",
    "score_sequence",
    "set_cpu_expert_workers",
    "set_expert_path",
    "z_loss",
]
