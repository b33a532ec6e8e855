"""Evaluation: ``upcycle evaluate`` (classifier accuracy per language with paired tests, held-out language
modelling, lm-evaluation-harness tasks) and the language-modelling figures ``upcycle pretrain`` logs.

    from upcycle.evaluation import EvaluateConfig, evaluate
    results = evaluate(EvaluateConfig(models=["runs/dense/best", "runs/moe/best"], out="results"))
"""

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "EvaluateConfig": "upcycle.evaluation.config",
    "evaluate": "upcycle.evaluation.cli",
    "LMEvalResult": "upcycle.evaluation.lm",
    "evaluate_lm": "upcycle.evaluation.lm",
    "isolated_routing_stats": "upcycle.evaluation.lm",
    "next_token_counts": "upcycle.evaluation.lm",
    "routing_summary": "upcycle.evaluation.lm",
    "summed_lm_loss": "upcycle.evaluation.lm",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "EvaluateConfig",
    "LMEvalResult",
    "evaluate",
    "evaluate_lm",
    "isolated_routing_stats",
    "next_token_counts",
    "routing_summary",
    "summed_lm_loss",
]
