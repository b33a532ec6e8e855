"""Fine-tuning and evaluation speed on XNLI-length pairs (issue 12), candidates side by side in one run.

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

    python benchmarks/finetune_eval.py                                   # CPU, fp32
    python benchmarks/finetune_eval.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

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
    add_finetune_arguments(ap)
    args = ap.parse_args()
    print_finetune_rows(finetune_step_rows(args), args.batch_size)


if __name__ == "__main__":
    main()
