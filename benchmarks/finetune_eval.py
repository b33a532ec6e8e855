"""Speed of XNLI evaluation (`upcycle evaluate`): MoE vs dense, length grouping, and Hugging Face's
``Trainer.predict`` padded to 128 as transformers' ``run_xnli.py`` evaluates, side by side in one run.

Models: GPT-2 small's dimensions (12 layers, 768 wide) as sequence classifiers; the MoE is the dense model
drop-upcycled with the founding report's recipe (8 experts, top-1, every other layer, r = 0.15), so both
do the same active FLOPs per token. Weights are random (speed does not depend on training).

Data: XNLI-length pairs in the report's 15 languages. XNLI's English premise and hypothesis average 21.7
and 10.7 words (Conneau et al. 2018, Table 2); each language's pair length in GPT-2 tokens is that word
count (±30 %, per example) times the language's fertility from the founding report's Table 2 (English
1.11 … Thai 9.48 tokens per word), plus one separator, truncated at 128 tokens as the models are
fine-tuned. Random token ids of those lengths (content does not change the cost; at initialisation the
router spreads tokens evenly). Seven of the fifteen languages exceed 128 tokens on most pairs, so
padding to 128 wastes less on all fifteen than on English, French and Spanish: both sets are timed.

Candidates, each over the same examples, language by language, the three back to back in an order that
rotates with the language and the round (medians over rounds of the totals; ratios by wall time and,
less sensitive to a busy shared machine, by process CPU time):
- ``dense`` and ``moe``: :func:`upcycle.evaluation.classify.predict`, what ``upcycle evaluate`` runs
  (length-grouped batches, ``torch.inference_mode``, pooled at the last real token);
- ``hf-128``: the dense model through ``transformers.Trainer.predict`` on rows padded to 128 tokens
  (``run_xnli.py``'s ``padding="max_length"``), same batch size (default 8, run_xnli.py's).

Targets (issue 12): MoE ÷ dense ≤ 1.10; tokens computed ÷ real tokens ≤ 1.15; hf-128 ÷ dense ≥ 2.

    python benchmarks/finetune_eval.py                       # CPU: 32 pairs per language, 2 rounds
    python benchmarks/finetune_eval.py --device cuda --per-language 512 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from upcycle.data.xnli import XNLI_LANGUAGES
from upcycle.evaluation.classify import predict

#: GPT-2 tokens per word, the founding report's Table 2.
FERTILITY = {
    "en": 1.11, "ar": 4.70, "bg": 5.53, "de": 2.10, "el": 6.16, "es": 1.83, "fr": 1.75, "hi": 5.12,
    "ru": 5.90, "sw": 2.08, "th": 9.48, "tr": 2.73, "ur": 5.16, "vi": 3.62, "zh": 3.77,
}  # fmt: skip
#: XNLI's average English premise and hypothesis lengths in words (Conneau et al. 2018, Table 2).
PREMISE_WORDS, HYPOTHESIS_WORDS = 21.7, 10.7
MAX_LENGTH = 128


def xnli_like_rows(languages, per_language: int, vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """{language: random token ids with XNLI-like pair lengths in GPT-2 tokens} (module docstring)."""
    rng = np.random.default_rng(seed)
    rows = {}
    for lang in languages:
        words = (PREMISE_WORDS + HYPOTHESIS_WORDS) * rng.uniform(0.7, 1.3, per_language)
        lengths = np.minimum(MAX_LENGTH, np.round(words * FERTILITY[lang]).astype(int) + 1)
        rows[lang] = [rng.integers(0, vocab - 1, n).tolist() for n in lengths]
    return rows


def padding_at_full_size(languages, batch_size: int, per_language: int = 5010) -> float:
    """Tokens computed ÷ real tokens of ``upcycle evaluate``'s length grouping (per language, as the
    command batches) on XNLI's test size, from the lengths alone (no model needed)."""
    from upcycle.evaluation.classify import length_batches

    real = computed = 0
    for rows in xnli_like_rows(languages, per_language, vocab=2, seed=2).values():
        lengths = np.array([len(r) for r in rows])
        real += int(lengths.sum())
        computed += sum(len(b) * int(lengths[b].max()) for b in length_batches(lengths, batch_size))
    return computed / real


def build_classifiers():
    """(dense, moe) GPT-2-small-sized sequence classifiers (3 labels, pad = EOS), the MoE upcycled from
    the dense one."""
    from transformers import GPT2ForSequenceClassification

    from upcycle.models.modeling import MoEGPT2ForSequenceClassification
    from upcycle.models.presets import build_model
    from upcycle.upcycling import Source, UpcycleConfig, upcycle_model

    torch.manual_seed(0)
    dense_lm = build_model("gpt2-small")
    opts = UpcycleConfig(
        model=["dense"],
        method="drop",
        ratio=0.15,
        experts=8,
        top_k=1,
        layers="every_other",
        renormalize=False,
    )
    moe_lm = upcycle_model(opts, sources=[Source("dense", dense_lm, None)], progress=False).model
    out = []
    for lm, cls in ((dense_lm, GPT2ForSequenceClassification), (moe_lm, MoEGPT2ForSequenceClassification)):
        config = lm.config
        config.num_labels, config.pad_token_id = 3, config.eos_token_id
        model = cls(config)
        missing, _ = model.load_state_dict(lm.state_dict(), strict=False)
        assert missing == ["score.weight"], missing  # every weight but the new head comes from the LM
        out.append(model.eval())
    return out


def padded_dataset(rows, pad: int):
    """``rows`` padded to 128 tokens, as run_xnli.py tokenizes (``padding="max_length"``)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r + [pad] * (MAX_LENGTH - len(r)) for r in rows],
            "attention_mask": [[1] * len(r) + [0] * (MAX_LENGTH - len(r)) for r in rows],
        }
    )


def make_trainer(model, batch_size: int, device: str, out_dir: str):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_eval_batch_size=batch_size,
        report_to=[],
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args)


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``. CPU time (all threads) is reported beside wall
    time because a busy shared machine inflates wall time far more."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_languages(dense, moe, rows: dict[str, list[list[int]]], args):
    """{candidate: {language: [(wall, cpu) per round]}} and {language: (computed, real) tokens}.

    Each language is timed for the three candidates back to back, in an order that rotates with the
    language and the round, so a neighbour's load hits all three alike."""
    names = ["dense", "moe", "hf-128"]
    pad = dense.config.pad_token_id
    padded = {lang: padded_dataset(r, pad) for lang, r in rows.items()}
    times = {name: {lang: [] for lang in rows} for name in names}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(dense, args.batch_size, args.device, tmp)
        for r in range(args.rounds):
            for i, (lang, lang_rows) in enumerate(rows.items()):
                shift = (r + i) % 3
                for name in names[shift:] + names[:shift]:
                    if name == "hf-128":
                        times[name][lang].append(
                            timed(lambda lang=lang: trainer.predict(padded[lang]), args.device)
                        )
                        continue
                    model = dense if name == "dense" else moe
                    out = {}

                    def run(model=model, lang_rows=lang_rows, out=out):
                        out["p"] = predict(
                            model, lang_rows, pad, batch_size=args.batch_size, device=args.device
                        )

                    times[name][lang].append(timed(run, args.device))
                    tokens[lang] = (out["p"].computed_tokens, out["p"].real_tokens)
    return times, tokens


def set_line(label: str, languages, times, tokens, rows, args) -> str:
    """One table row: medians over rounds of each candidate's total over ``languages``."""
    rounds = range(args.rounds)
    total, cpu = (
        {name: [sum(times[name][lang][r][k] for lang in languages) for r in rounds] for name in times}
        for k in (0, 1)
    )
    med = {k: statistics.median(v) for k, v in total.items()}

    def ratio(a, b, table):
        return statistics.median(x / y for x, y in zip(table[a], table[b]))

    computed = sum(tokens[lang][0] for lang in languages)
    real = sum(tokens[lang][1] for lang in languages)
    n = sum(len(rows[lang]) for lang in languages)
    return (
        f"{label:<9} {n:>5} {real / n:>8.1f} {med['dense']:>8.2f} {med['moe']:>8.2f} {med['hf-128']:>8.2f} "
        f"{ratio('moe', 'dense', total):>9.3f} ({ratio('moe', 'dense', cpu):.3f}) "
        f"{computed / real:>13.3f} {padding_at_full_size(languages, args.batch_size):>13.3f} "
        f"{ratio('hf-128', 'dense', total):>12.2f} ({ratio('hf-128', 'dense', cpu):.2f})"
    )


def evaluation_rows(args) -> list[str]:
    """Time the candidates on XNLI-length pairs; returns the printed lines."""
    dense, moe = (m.to(args.device) for m in build_classifiers())
    rows = xnli_like_rows(XNLI_LANGUAGES, args.per_language, dense.config.vocab_size, seed=1)
    for model in (dense, moe):  # warm-up: first calls allocate and pick kernels
        predict(model, rows["en"][: args.batch_size], dense.config.pad_token_id, batch_size=args.batch_size)
    times, tokens = time_languages(dense, moe, rows, args)
    lines = [
        f"evaluation: GPT-2-small dims, device {args.device} ({torch.get_num_threads()} threads), batch "
        f"{args.batch_size}, {args.per_language} XNLI-length pairs per language, median of {args.rounds} "
        "rounds; ratios by wall time (by process CPU time)",
        f"{'languages':<9} {'pairs':>5} {'mean len':>8} {'dense s':>8} {'moe s':>8} {'hf-128 s':>8} "
        f"{'moe÷dense':>17} {'computed÷real':>13} {'at 5,010/lang':>13} {'hf-128÷dense':>19}",
    ]
    for label, languages in {"all 15": list(XNLI_LANGUAGES), "en,fr,es": ["en", "fr", "es"]}.items():
        lines.append(set_line(label, languages, times, tokens, rows, args))
    lines.append(
        "targets (issue 12): moe÷dense ≤ 1.10, computed÷real ≤ 1.15 (at XNLI's 5,010 per language), "
        "hf-128÷dense ≥ 2"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--per-language", type=int, default=32, help="pairs per language")
    # 8: run_xnli.py's evaluation batch (TrainingArguments' per_device_eval_batch_size default).
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (candidates alternate)")
    args = ap.parse_args()
    for line in evaluation_rows(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
