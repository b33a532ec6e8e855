"""Training-step speed of `upcycle pretrain`: dense GPT-2 vs its 8-expert top-1 MoE, side by side.

Both models go through the engine's own step (``upcycle.training.loop``, ``pretraining.forward_backward``): forward with labels (LM loss
plus, for the MoE, the weighted auxiliary losses), ``accelerator.backward``, gradient-norm clipping, the
fused AdamW step, the LR scheduler and ``zero_grad``. The MoE is the dense model drop-upcycled with the
founding report's recipe (8 experts, top-1, every other layer, r = 0.15): the same active FLOPs per token
and 2.6× the parameters. The candidates alternate round by round, so a slow drift of the machine (or a
neighbour's job) hits all; the ratio is the median over rounds of MoE ÷ dense timed in the same round.
Targets: on CPU MoE ÷ dense step time ≤ 1.10 (issue 4); on a GPU MoE ÷ dense tokens/s ≥ 0.85 (issue 16).

The MoE runs its experts as it does by default (``moe``: ``auto``, the CPU bank or the GPU's grouped
GEMMs) and, sharing the same model and optimizer, on the other path (``moe-grouped`` on CPU,
``moe-loop`` on a GPU), for the record. Sizes: GPT-2-small dims (12 × 768) and, with ``--size medium``,
GPT-2-medium dims (24 × 1024); random weights, GPT-2's vocabulary.

On CPU the process keeps freed memory as ``upcycle pretrain`` does (``upcycle.training.memory``: no
page faults for re-allocated activations and gradients); ``--default-malloc`` measures with glibc's
defaults instead (slower for both, noisier, and harder on the MoE, which frees a gradient per expert).

The dense model uses GPT-2's tanh-approximated GELU as one fused kernel (``gelu_pytorch_tanh``), like
the MoE's experts (``upcycle.moe.experts.activation_fn``), so the ratio measures the MoE and nothing
else. Hugging Face's own ``gelu_new`` computes the same function in five element-wise kernels; the
``dense-hf`` row shows what that costs the stock dense baseline (MoE ÷ dense-hf is printed too).

    python benchmarks/train_step.py                                   # CPU, fp32, seq 256, micro-batch 4
    python benchmarks/train_step.py --device cuda --precision bf16 --size small --size medium \
        --seq-len 1024 --batch-size 8                                 # + tokens/s and model FLOPs utilisation
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from upcycle.analysis.accounting import account
from upcycle.models.presets import build_model
from upcycle.moe.paths import expert_path_set
from upcycle.training.config import PretrainConfig
from upcycle.training.loop import clip_gradients, make_optimizer
from upcycle.training.memory import keep_freed_memory
from upcycle.training.pretraining import MOE_LOSSES, forward_backward
from upcycle.training.schedule import make_scheduler
from upcycle.upcycling import Source, UpcycleConfig, upcycle_model

#: Dense bf16 tensor-core peaks (FLOP/s) for MFU, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


#: GPT-2 dims by size (Radford et al. 2019, Table 2).
SIZES = {"small": dict(n_layer=12, n_embd=768, n_head=12), "medium": dict(n_layer=24, n_embd=1024, n_head=16)}


@dataclasses.dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    keys: tuple[str, ...]
    params: int
    flops_per_token: float  # training (forward + backward) model FLOPs per token
    expert_path: str | None = None  # None: the process default (auto)
    step_s: list[float] = dataclasses.field(default_factory=list)
    fwd_bwd_s: list[float] = dataclasses.field(default_factory=list)
    opt_s: list[float] = dataclasses.field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops_per_token(model, seq_len: int) -> float:
    """3 × forward FLOPs per token (Drop-Upcycling Table 3, without its embedding-lookup term)."""
    cfg = model.config
    acc = account(cfg, sum(p.numel() for p in model.parameters()), seq_len)
    return 3 * (acc.flops_per_token - 2 * cfg.vocab_size * cfg.hidden_size)


def one_step(c: Candidate, accelerator, batch_BS: torch.Tensor) -> None:
    sync(accelerator.device)
    t0 = time.perf_counter()
    with expert_path_set(c.expert_path):
        sums = forward_backward(accelerator, c.model, [batch_BS], c.keys)
    sync(accelerator.device)
    t1 = time.perf_counter()
    clip_gradients(accelerator, c.model, 1.0)
    c.optimizer.step()
    c.scheduler.step()
    c.optimizer.zero_grad(set_to_none=True)
    accelerator.reduce(sums, "sum").tolist()  # the loop's per-step host sync
    sync(accelerator.device)
    t2 = time.perf_counter()
    c.fwd_bwd_s.append(t1 - t0)
    c.opt_s.append(t2 - t1)
    c.step_s.append(t2 - t0)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU"
    )
    ap.add_argument(
        "--size", choices=list(SIZES), action="append", help="GPT-2 dims (repeatable; default small)"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7 on CPU, 20 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2 on CPU, 5 on GPU)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)"
    )
    ap.add_argument(
        "--default-malloc", action="store_true", help="CPU: glibc's default malloc settings, not pretrain's"
    )
    ap.add_argument(
        "--no-hf-gelu", action="store_true", help="skip the dense model with HF's five-kernel GELU"
    )
    return ap.parse_args()


def build_candidates(size: str, accelerator, on_gpu: bool, args) -> list[Candidate]:
    """Dense (fused GELU), its drop-upcycled MoE on the default path and on the other one, dense-hf."""
    cfg = PretrainConfig(lr=2e-4, warmup=10, steps=1000)
    dims = SIZES[size]
    torch.manual_seed(0)
    dense = build_model("gpt2-small", {**dims, "activation_function": "gelu_pytorch_tanh"})
    # "Its" MoE: the report's conversion of this very dense model (drop-upcycling, 8 experts, top-1).
    opts = UpcycleConfig(
        model=["dense"], method="drop", ratio=0.15, experts=8, top_k=1, layers="every_other", renormalize=False,
        jitter=0.01,
    )  # fmt: skip
    moe = upcycle_model(opts, sources=[Source("dense", dense, None)], progress=False).model
    models = [("dense", dense, ("loss",)), ("moe", moe, ("loss", *MOE_LOSSES))]
    if not args.no_hf_gelu:
        torch.manual_seed(0)
        models.append(("dense-hf", build_model("gpt2-small", dims), ("loss",)))  # gelu_new: five kernels
    candidates = []
    for name, model, keys in models:
        model.train()
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(
            optimizer, lr=cfg.lr, min_lr=2e-5, warmup=10, steps=1000, schedule="cosine"
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        n = sum(p.numel() for p in model.parameters())
        flops = training_flops_per_token(accelerator.unwrap_model(model), args.seq_len)
        candidates.append(Candidate(f"{name}", model, optimizer, scheduler, keys, n, flops))
    # The same MoE on the path auto does not take on this device (same model and optimizer: the timing is
    # what matters, not the trajectory).
    other = "loop" if on_gpu else "grouped"
    candidates.insert(2, dataclasses.replace(candidates[1], name=f"moe-{other}", expert_path=other, step_s=[],
                                             fwd_bwd_s=[], opt_s=[]))  # fmt: skip
    return candidates


def run_rounds(candidates: list[Candidate], accelerator, args, rounds: int, warmup: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    for r in range(warmup + rounds):
        batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
        # Rotate which candidate goes first so none always runs on a warmer cache.
        k = r % len(candidates)
        for c in candidates[k:] + candidates[:k]:
            one_step(c, accelerator, batch)
        if r < warmup:
            for c in candidates:
                c.step_s.clear(), c.fwd_bwd_s.clear(), c.opt_s.clear()


def report(candidates: list[Candidate], tokens: int, rounds: int, peak: float | None, on_gpu: bool) -> None:
    med = statistics.median
    print(
        f"{'model':<12} {'params':>8} {'step s':>8} {'fwd+bwd s':>10} {'optim s':>8} {'tokens/s':>10}"
        + (" MFU" if peak else "")
    )
    for c in candidates:
        tps = tokens / med(c.step_s)
        mfu = f" {c.flops_per_token * tps / peak:6.1%}" if peak else ""
        print(
            f"{c.name:<12} {c.params / 1e6:7.1f}M {med(c.step_s):8.3f} {med(c.fwd_bwd_s):10.3f} {med(c.opt_s):8.3f} "
            f"{tps:10,.0f}{mfu}"
        )
    by = {c.name: c for c in candidates}
    dense_c, moe_c = by["dense"], by["moe"]
    ratios = [m / d for m, d in zip(moe_c.step_s, dense_c.step_s)]
    ratio = med(ratios)
    goal = f"tokens/s ratio {1 / ratio:.3f}, target ≥ 0.85: {'met' if 1 / ratio >= 0.85 else 'NOT met'}" if on_gpu else (
        f"target ≤ 1.10: {'met' if ratio <= 1.10 else 'NOT met'}")  # fmt: skip
    print(
        f"MoE ÷ dense step time: {ratio:.3f} (median of {rounds} rounds; per round "
        f"{', '.join(f'{x:.3f}' for x in ratios)}); {goal}"
    )
    other = next(c for c in candidates if c.name.startswith("moe-"))
    print(
        f"breakdown MoE ÷ dense: forward+backward {med(moe_c.fwd_bwd_s) / med(dense_c.fwd_bwd_s):.3f}, "
        f"optimizer (clip + AdamW + zero_grad) {med(moe_c.opt_s) / med(dense_c.opt_s):.3f}; "
        f"{other.name} ÷ dense step time {med(m / d for m, d in zip(other.step_s, dense_c.step_s)):.3f}"
        + (
            f"; MoE ÷ dense-hf step time {med(m / d for m, d in zip(moe_c.step_s, by['dense-hf'].step_s)):.3f}"
            if "dense-hf" in by
            else ""
        )
    )


def main() -> None:
    args = parse_args()
    on_gpu = args.device.startswith("cuda")
    malloc = "default malloc"
    if not on_gpu and not args.default_malloc:
        malloc = "malloc keeps freed memory" if keep_freed_memory() else "default malloc (not glibc)"

    precision = args.precision or ("bf16" if on_gpu else "fp32")
    rounds = args.rounds or (20 if on_gpu else 7)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)

    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16"}[precision],
        cpu=not on_gpu,
        gradient_accumulation_steps=1,
    )
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if on_gpu and peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    tokens = args.batch_size * args.seq_len
    for size in args.size or ["small"]:
        candidates = build_candidates(size, accelerator, on_gpu, args)
        print(
            f"GPT-2-{size} dims on {accelerator.device} "
            f"({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads'}), {precision}, "
            f"seq {args.seq_len} × micro-batch {args.batch_size} = {tokens} tokens per step, "
            f"{warmup} warm-up + {rounds} timed rounds" + ("" if on_gpu else f"; {malloc}")
        )
        run_rounds(candidates, accelerator, args, rounds, warmup, candidates[0].model.config.vocab_size)
        report(candidates, tokens, rounds, peak, on_gpu)
        del candidates
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
