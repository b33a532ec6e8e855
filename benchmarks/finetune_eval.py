"""Fine-tuning and evaluation speed on XNLI-length pairs (issue 12), candidates side by side in one run.

Two halves, both printed by one run (``--only step`` or ``--only eval`` runs one).

Evaluation half (:func:`evaluation_rows`). Models: GPT-2 small's dimensions (12 layers, 768 wide) as sequence classifiers; the MoE is the dense model
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

Fine-tuning half (:func:`finetune_step_rows`): the optimizer step of ``upcycle finetune`` for dense
GPT-2-small and its MoE (8 experts, top-1, every other layer, drop-upcycled with the founding report's
recipe: the same active FLOPs per token, 2.6× the parameters). Each candidate goes through the engine's
own step (``upcycle.training.finetuning.forward_backward``: forward, logits at the last real token,
cross-entropy plus the MoE's weighted auxiliary losses, ``accelerator.backward``; then clipping, fused
AdamW, the LR schedule, ``zero_grad`` and the per-step all-reduce) on the same length-grouped
micro-batches of 32 pairs (run_xnli.py's batch), each padded only to its own longest row. Issue 12's
target on CPU: MoE ÷ dense ≤ 1.10. A third row pads every pair to 128 tokens, as run_xnli.py does by
default (``pad_to_max_length``), to show what dynamic padding saves.

Pair lengths: XNLI's premises average about 22 words and its hypotheses about 11 (Conneau et al. 2018
describe MultiNLI's genres), about 45 GPT-2 tokens a pair with the separator; the benchmark draws
lengths from a log-normal with that median (spread 0.35, clipped to 8–128), so nothing needs the Hub.
The candidates alternate round by round and the ratio is the median of per-round ratios.

    python benchmarks/finetune_eval.py                                    # CPU, fp32, both halves
    python benchmarks/finetune_eval.py --only eval --per-language 64 --rounds 3
    python benchmarks/finetune_eval.py --device cuda --precision bf16 --per-language 512 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
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


#: Median GPT-2 tokens of an XNLI pair (premise + SEP + hypothesis); see the module docstring.
MEDIAN_PAIR_TOKENS = 45


@dataclasses.dataclass
class StepCandidate:
    name: str
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    keys: tuple[str, ...]
    params: int
    pad_to: int | None = None
    step_s: list[float] = dataclasses.field(default_factory=list)
    fwd_bwd_s: list[float] = dataclasses.field(default_factory=list)
    opt_s: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


def add_finetune_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (run_xnli.py: 32)")
    ap.add_argument(
        "--step-rounds", type=int, default=None, help="timed fine-tune rounds (default 5 CPU, 20 GPU)"
    )
    ap.add_argument("--step-warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 5 GPU)")
    ap.add_argument("--no-padded-128", action="store_true", help="skip the dense row padded to 128")


def xnli_like_pairs(n: int, vocab: int, seed: int = 0):
    """Random token ids with XNLI-like pair lengths, as :class:`EncodedExamples`."""
    from upcycle.data.classification import EncodedExamples

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_PAIR_TOKENS), 0.35, n).astype(int), 8, 128)
    rows = [rng.integers(0, vocab, k).tolist() for k in lengths]
    return EncodedExamples.from_rows(rows, rng.integers(0, 3, n).tolist(), "en")


def classifiers(device: str):
    """Dense GPT-2-small and its report-style MoE as sequence classifiers (same body weights)."""
    from transformers import GPT2ForSequenceClassification

    from upcycle.models.modeling import MoEGPT2ForSequenceClassification
    from upcycle.models.presets import build_model
    from upcycle.upcycling import Source, UpcycleConfig, upcycle_model

    torch.manual_seed(0)
    # The fused tanh-GELU, like the MoE's experts, so the ratio measures the MoE and nothing else
    # (benchmarks/train_step.py explains; Hugging Face's gelu_new is the same function in five kernels).
    dense_lm = build_model("gpt2-small", {"activation_function": "gelu_pytorch_tanh"})
    opts = UpcycleConfig(
        model=["dense"], method="drop", ratio=0.15, experts=8, top_k=1, layers="every_other", renormalize=False,
        jitter=0.01,
    )  # fmt: skip
    moe_lm = upcycle_model(opts, sources=[Source("dense", dense_lm, None)], progress=False).model
    out = []
    for lm, cls in ((dense_lm, GPT2ForSequenceClassification), (moe_lm, MoEGPT2ForSequenceClassification)):
        config = lm.config
        config.num_labels, config.pad_token_id = 3, config.eos_token_id
        torch.manual_seed(1)
        clf = cls(config)
        clf.transformer.load_state_dict(lm.transformer.state_dict())
        out.append(clf.to(device))
    return out


def _step(c: StepCandidate, accelerator, batch: dict, sync) -> None:
    from upcycle.training.finetuning import forward_backward
    from upcycle.training.loop import clip_gradients

    if c.pad_to is not None:  # run_xnli.py's default: every pair padded to --max-length
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pad = c.pad_to - ids.shape[1]
        batch = {**batch, "input_ids": torch.nn.functional.pad(ids, (0, pad), value=int(ids[0, -1])),
                 "attention_mask": torch.nn.functional.pad(mask, (0, pad))}  # fmt: skip
    sync()
    t0 = time.perf_counter()
    sums = forward_backward(accelerator, c.model, [batch], c.keys)
    sync()
    t1 = time.perf_counter()
    clip_gradients(accelerator, c.model, 1.0)
    c.optimizer.step()
    c.scheduler.step()
    c.optimizer.zero_grad(set_to_none=True)
    accelerator.reduce(sums, "sum").tolist()  # the engine's per-step host sync
    sync()
    t2 = time.perf_counter()
    c.fwd_bwd_s.append(t1 - t0)
    c.opt_s.append(t2 - t1)
    c.step_s.append(t2 - t0)
    c.tokens.append(int(batch["attention_mask"].numel()))


def _candidates(accelerator, device: str, padded: bool) -> list[StepCandidate]:
    from upcycle.training.finetune_config import FinetuneConfig
    from upcycle.training.finetuning import MOE_TASK_LOSSES
    from upcycle.training.loop import make_optimizer
    from upcycle.training.schedule import make_scheduler

    cfg = FinetuneConfig()  # run_xnli.py's optimizer settings
    dense, moe = classifiers(device)
    specs = [("dense", dense, ("loss",), None), ("moe", moe, ("loss", *MOE_TASK_LOSSES), None)]
    if padded:
        specs.append(("dense-pad128", dense, ("loss",), 128))
    out, prepared = [], {}
    for name, model, keys, pad_to in specs:
        if id(model) not in prepared:  # the padded row trains the dense model too (its own optimizer state)
            model.train()
            optimizer = make_optimizer(model, cfg)
            scheduler = make_scheduler(
                optimizer, lr=cfg.lr, min_lr=0.0, warmup=0, steps=10_000, schedule="linear"
            )
            prepared[id(model)] = (*accelerator.prepare(model, optimizer), scheduler)
        m, optimizer, scheduler = prepared[id(model)]
        n = sum(p.numel() for p in m.parameters())
        out.append(StepCandidate(name, m, optimizer, scheduler, keys, n, pad_to))
    return out


def finetune_step_rows(args) -> list[dict]:
    """Time the fine-tuning optimizer step of each candidate, interleaved round by round; one row each
    (medians), the MoE row carrying ``moe_over_dense`` (median of per-round ratios)."""
    from accelerate import Accelerator

    from upcycle.data.classification import TrainBatches
    from upcycle.training.memory import keep_freed_memory

    on_gpu = args.device.startswith("cuda")
    if not on_gpu:
        keep_freed_memory()  # as upcycle finetune does on CPU
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16"}[precision], cpu=not on_gpu)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    candidates = _candidates(accelerator, accelerator.device, not args.no_padded_128)
    rounds = args.step_rounds or (20 if on_gpu else 5)
    warmup = args.step_warmup if args.step_warmup is not None else (5 if on_gpu else 1)
    pairs = xnli_like_pairs(args.batch_size * 64, candidates[0].model.config.vocab_size)
    stream = TrainBatches(pairs, args.batch_size, per_step=1, seed=0, group=True)
    pad_id = candidates[0].model.config.pad_token_id
    real = []
    for r in range(warmup + rounds):
        (idx,) = stream.next_step(0, 1)
        batch = pairs.batch(idx, pad_id)
        real.append(int(batch["attention_mask"].sum()))
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        for c in order:
            _step(c, accelerator, batch, sync)
        if r < warmup:
            for c in candidates:
                c.step_s.clear(), c.fwd_bwd_s.clear(), c.opt_s.clear(), c.tokens.clear()
            real.clear()
    return _rows(candidates, real, args.batch_size, precision, accelerator.device)


def _rows(
    candidates: list[StepCandidate], real: list[int], batch_size: int, precision: str, device
) -> list[dict]:
    med = statistics.median
    dense = candidates[0]
    rows = []
    for c in candidates:
        row = {
            "benchmark": "finetune step", "model": c.name, "device": str(device), "precision": precision,
            "params_M": round(c.params / 1e6, 1), "step_s": med(c.step_s), "fwd_bwd_s": med(c.fwd_bwd_s),
            "optim_s": med(c.opt_s), "pairs_per_s": batch_size / med(c.step_s),
            "real_tokens_per_s": sum(real) / sum(c.step_s),
            "computed_over_real_tokens": sum(c.tokens) / sum(real),
        }  # fmt: skip
        if c is not dense:
            ratios = [a / b for a, b in zip(c.step_s, dense.step_s)]
            row["over_dense"] = med(ratios)
            row["over_dense_rounds"] = ratios
        rows.append(row)
    return rows


def print_finetune_rows(rows: list[dict], batch_size: int) -> None:
    first = rows[0]
    print(f"fine-tune step: {first['device']}, {first['precision']}, {batch_size} XNLI-length pairs per step, "
          f"length-grouped micro-batches (dynamic padding)")  # fmt: skip
    print(f"{'model':<13} {'params':>8} {'step s':>8} {'fwd+bwd s':>10} {'optim s':>8} {'pairs/s':>8} "
          f"{'real tok/s':>10} {'computed÷real':>14}")  # fmt: skip
    for r in rows:
        print(
            f"{r['model']:<13} {r['params_M']:7.1f}M {r['step_s']:8.3f} {r['fwd_bwd_s']:10.3f} {r['optim_s']:8.3f} "
            f"{r['pairs_per_s']:8.1f} {r['real_tokens_per_s']:10,.0f} {r['computed_over_real_tokens']:14.3f}"
        )
    moe = next(r for r in rows if r["model"] == "moe")
    rounds = ", ".join(f"{x:.3f}" for x in moe["over_dense_rounds"])
    verdict = "met" if moe["over_dense"] <= 1.10 else "NOT met"
    print(
        f"MoE ÷ dense fine-tune step: {moe['over_dense']:.3f} (median of per-round ratios {rounds}); target ≤ 1.10: {verdict}"
    )
    padded = next((r for r in rows if r["model"] == "dense-pad128"), None)
    if padded is not None:
        print(f"dense padded to 128 ÷ dense with dynamic padding: {padded['over_dense']:.3f} "
              f"({padded['computed_over_real_tokens']:.2f}× the real tokens computed)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU"
    )
    ap.add_argument("--only", choices=["eval", "step"], default=None, help="run one half only")
    ap.add_argument("--per-language", type=int, default=32, help="evaluation: pairs per language")
    # 8: run_xnli.py's evaluation batch (TrainingArguments' per_device_eval_batch_size default).
    ap.add_argument("--eval-batch-size", type=int, default=8, help="evaluation: pairs per batch")
    ap.add_argument("--rounds", type=int, default=2, help="evaluation: timed rounds (candidates alternate)")
    add_finetune_arguments(ap)
    args = ap.parse_args()
    if args.only in (None, "eval"):
        eval_args = argparse.Namespace(**{**vars(args), "batch_size": args.eval_batch_size})
        for line in evaluation_rows(eval_args):
            print(line, flush=True)
    if args.only in (None, "step"):
        print_finetune_rows(finetune_step_rows(args), args.batch_size)


if __name__ == "__main__":
    main()
