"""Published numbers the report prints beside a run's own, transcribed from the papers.

- The founding report: Lee Sean, "NLP Extended Task" (SUTD; GPT-2 upcycled into an 8-expert top-1 MoE
  with Drop-Upcycling r = 0.15, continued pretraining on C4, XNLI fine-tuning): Table 1 (fertility of
  GPT-2's tokenizer on XNLI), Table 2 (XNLI test accuracy after fine-tuning on French), Table 3 (after
  fine-tuning on English, French and Spanish), and §3.3 (the MoE's C4 validation figures). Its "GPT2"
  rows are GPT-2 *without* continued pretraining (its future work 1); ours is the equal baseline.
- Drop-Upcycling: Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
  Re-initialization" (ICLR 2025, arXiv 2502.19261): Table 1's 8×152M rows (downstream scores; the
  English tasks we can run through lm-evaluation-harness are named below) and Table 4 (parameters).

Transcribed by hand from the text in ``shared/papers/`` (founding-report-gpt2-moe-xnli.txt,
drop-upcycling.txt); tests check a few cells against those files when they are present.
"""

from __future__ import annotations

XNLI_ORDER = ("en", "ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")


def _row(values: str) -> dict[str, float]:
    return dict(zip(XNLI_ORDER, (float(v) for v in values.split())))


FOUNDING_REPORT = {
    "citation": "Lee Sean, “NLP Extended Task” (the founding report: GPT-2 upcycled to an 8-expert top-1 "
    "MoE, Drop-Upcycling r = 0.15, C4, XNLI)",
    "table1_fertility": _row("1.11 4.70 5.53 2.10 6.16 1.83 1.75 5.12 5.90 2.08 9.48 2.73 5.16 3.62 3.77"),
    # Accuracy in %, XNLI test, 15 languages. Keyed by the set of train languages.
    "tables": {
        frozenset({"fr"}): {
            "name": "Table 2 (fine-tuned on French)",
            "MoE": _row(
                "56.01 36.73 37.11 45.41 35.65 52.93 64.91 36.65 36.65 40.92 36.99 42.30 36.53 40.76 39.08"
            ),
            "GPT2": _row(
                "57.15 37.09 37.76 45.53 36.47 52.53 63.79 36.35 36.89 43.29 35.13 41.98 34.43 39.50 43.43"
            ),
        },
        frozenset({"en", "fr", "es"}): {
            "name": "Table 3 (fine-tuned on English, French and Spanish)",
            "MoE": _row(
                "75.31 35.11 34.75 47.05 35.53 67.11 65.49 36.19 34.70 41.22 35.71 42.20 34.33 36.11 35.11"
            ),
            "GPT2": _row(
                "76.51 37.60 37.33 44.49 37.82 66.25 66.71 39.04 38.12 41.54 39.82 42.16 37.47 39.06 38.02"
            ),
        },
    },
    # §3.3: after 14,649 steps at an effective batch of 256 (≈ 1.6B tokens), on C4's validation split.
    "pretraining": {"steps": 14649, "tokens": 1.6e9, "accuracy": 0.3823, "loss": 3.4},
}

DROP_UPCYCLING = {
    "citation": "Nakamura et al. 2025, “Drop-Upcycling: Training Sparse Mixture of Experts with Partial "
    "Re-initialization” (ICLR 2025, arXiv 2502.19261)",
    # Table 1, dense 152M → MoE 8×152M, scores in %.
    "columns": (
        "JEMHQA",
        "NIILC",
        "JSQ",
        "XL-Sum",
        "WMT E→J",
        "WMT J→E",
        "OBQA",
        "TQA",
        "HS",
        "SQv2",
        "XW-EN",
        "BBH",
        "Avg",
    ),
    "rows": {
        "Dense": "17.6 7.9 10.6 2.4 0.5 0.5 14.6 3.0 28.6 2.0 60.6 11.5 13.3",
        "FS": "25.2 13.6 19.4 1.8 0.9 0.4 16.6 2.6 31.2 12.9 64.4 10.7 16.6",
        "BTX": "28.6 17.1 26.6 4.3 2.7 1.1 18.4 5.1 32.5 5.3 65.0 15.9 18.5",
        "NU": "28.2 16.2 24.4 3.5 3.0 1.1 18.2 5.8 31.9 4.5 63.5 14.7 17.9",
        "DU (r=0.5)": "32.2 18.0 30.6 3.7 4.7 2.3 16.8 6.1 32.5 6.2 64.2 19.1 19.7",
        "DU (r=1.0)": "27.2 16.8 32.5 4.1 3.7 1.6 17.0 5.9 32.4 4.9 64.8 15.4 18.9",
    },
    # The English tasks of Table 1 that lm-evaluation-harness runs (our `evaluate --task lm-eval:TASK`).
    "lm_eval_tasks": {
        "openbookqa": "OBQA",
        "triviaqa": "TQA",
        "hellaswag": "HS",
        "squadv2": "SQv2",
        "xwinograd_en": "XW-EN",
    },
    # Table 4: active / total parameters.
    "parameters": {"Dense 152M": (152e6, 152e6), "MoE 8×152M": (190e6, 417e6)},
}

PUBLISHED = {"founding-report": FOUNDING_REPORT, "drop-upcycling": DROP_UPCYCLING}


def drop_upcycling_row(method: str | None, ratio: float | None, role: str | None) -> str | None:
    """The Table 1 row our model corresponds to: the dense baseline, naive (NU), drop r = 0.5 or 1.0 (DU),
    btx (BTX), and scratch (random experts with the seed's other weights: the construction of the
    paper's r = 1.0 ablation, not its FS row, which trains every weight from random)."""
    if role == "dense":
        return "Dense"
    if method == "naive":
        return "NU"
    if method == "btx":
        return "BTX"
    if method == "scratch":
        return "DU (r=1.0)"
    if method == "drop" and ratio in (0.5, 1.0):
        return f"DU (r={ratio})"
    return None


def drop_upcycling_scores(row: str) -> dict[str, float]:
    values = [float(v) for v in DROP_UPCYCLING["rows"][row].split()]
    return dict(zip(DROP_UPCYCLING["columns"], values))


__all__ = [
    "DROP_UPCYCLING",
    "FOUNDING_REPORT",
    "PUBLISHED",
    "XNLI_ORDER",
    "drop_upcycling_row",
    "drop_upcycling_scores",
]
