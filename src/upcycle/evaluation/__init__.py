"""Evaluation: language-modelling loss, perplexity and next-token accuracy (XNLI and more to come)."""

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "LMEvalResult": "upcycle.evaluation.lm",
    "evaluate_lm": "upcycle.evaluation.lm",
    "isolated_routing_stats": "upcycle.evaluation.lm",
    "next_token_counts": "upcycle.evaluation.lm",
    "routing_summary": "upcycle.evaluation.lm",
    "summed_lm_loss": "upcycle.evaluation.lm",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "LMEvalResult",
    "evaluate_lm",
    "isolated_routing_stats",
    "next_token_counts",
    "routing_summary",
    "summed_lm_loss",
]
