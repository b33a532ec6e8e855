"""Evaluation: language-modelling loss, perplexity and next-token accuracy (XNLI and more to come)."""

from upcycle.evaluation.lm import (
    LMEvalResult,
    evaluate_lm,
    isolated_routing_stats,
    next_token_counts,
    routing_summary,
    summed_lm_loss,
)

__all__ = [
    "LMEvalResult",
    "evaluate_lm",
    "isolated_routing_stats",
    "next_token_counts",
    "routing_summary",
    "summed_lm_loss",
]
