"""Evaluation: ``upcycle evaluate`` (classifier accuracy per language with paired tests, held-out language
modelling, lm-evaluation-harness tasks) and the language-modelling figures ``upcycle pretrain`` logs.

    from upcycle.evaluation import EvaluateConfig, evaluate
    results = evaluate(EvaluateConfig(models=["runs/dense/best", "runs/moe/best"], out="results"))
"""

from upcycle.evaluation.cli import evaluate
from upcycle.evaluation.config import EvaluateConfig
from upcycle.evaluation.lm import (
    LMEvalResult,
    evaluate_lm,
    isolated_routing_stats,
    next_token_counts,
    routing_summary,
    summed_lm_loss,
)

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
