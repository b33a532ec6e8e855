"""Training-step speed of `upcycle pretrain`: dense GPT-2-small vs its 8-expert top-1 MoE, side by side.

Both models go through the engine's own step (``upcycle.training.loop``, ``pretraining.forward_backward``): forward with labels (LM loss
plus, for the MoE, the weighted auxiliary losses), ``accelerator.backward``, gradient-norm clipping, the
fused AdamW step, the LR scheduler and ``zero_grad``. The MoE is the dense model drop-upcycled with the
founding report's recipe (8 experts, top-1, every other layer, r = 0.15): the same active FLOPs per token
and 2.6× the parameters. The candidates alternate round by round, so a slow drift of the machine (or a
neighbour's job) hits all; the ratio is the median over rounds of MoE ÷ dense timed in the same round.
Issue 4's target on CPU: MoE ÷ dense ≤ 1.10.

On CPU the process keeps freed memory as ``upcycle pretrain`` does (``upcycle.training.memory``: no
page faults for re-allocated activations and gradients); ``--default-malloc`` measures with glibc's
defaults instead (slower for both, noisier, and harder on the MoE, which frees a gradient per expert).

The dense model uses GPT-2's tanh-approximated GELU as one fused kernel (``gelu_pytorch_tanh``), like
the MoE's experts (``upcycle.moe.experts.activation_fn``), so the ratio measures the MoE and nothing
else. Hugging Face's own ``gelu_new`` computes the same function in five element-wise kernels; the
``dense-hf`` row shows what that costs the stock dense baseline (MoE ÷ dense-hf is printed too).

    python benchmarks/train_step.py                                   # CPU, fp32, seq 256, micro-batch 4
    python benchmarks/train_step.py --device cuda --precision bf16    # + model FLOPs utilisation
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from upcycle.analysis.accounting import account
from upcycle.models.presets import build_model
from upcycle.training.config import PretrainConfig
from upcycle.training.loop import clip_gradients, make_optimizer
from upcycle.training.memory import keep_freed_memory
from upcycle.training.pretraining import MOE_LOSSES, forward_backward
from upcycle.training.schedule import make_scheduler
from upcycle.upcycling import Source, UpcycleConfig, upcycle_model

#: Dense bf16 tensor-core peaks (FLOP/s) for MFU, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


@dataclasses.dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    keys: tuple[str, ...]
    params: int
    flops_per_token: float  # training (forward + backward) model FLOPs per token
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU"
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
    args = ap.parse_args()
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
    cfg = PretrainConfig(lr=2e-4, warmup=10, steps=1000)

    torch.manual_seed(0)
    dense = build_model("gpt2-small", {"activation_function": "gelu_pytorch_tanh"})
    torch.manual_seed(0)
    dense_hf = build_model("gpt2-small")  # gelu_new: Hugging Face's five-kernel GELU
    # "Its" MoE: the report's conversion of this very dense model (drop-upcycling, 8 experts, top-1).
    opts = UpcycleConfig(
        model=["dense"], method="drop", ratio=0.15, experts=8, top_k=1, layers="every_other", renormalize=False,
        jitter=0.01,
    )  # fmt: skip
    moe = upcycle_model(opts, sources=[Source("dense", dense, None)], progress=False).model

    candidates = []
    models = (
        ("dense", dense, ("loss",)),
        ("moe", moe, ("loss", *MOE_LOSSES)),
        ("dense-hf", dense_hf, ("loss",)),
    )
    for name, model, keys in models:
        model.train()
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(
            optimizer, lr=cfg.lr, min_lr=2e-5, warmup=10, steps=1000, schedule="cosine"
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        n = sum(p.numel() for p in model.parameters())
        flops = training_flops_per_token(accelerator.unwrap_model(model), args.seq_len)
        candidates.append(Candidate(name, model, optimizer, scheduler, keys, n, flops))

    g = torch.Generator().manual_seed(0)
    tokens = args.batch_size * args.seq_len
    print(
        f"device {accelerator.device} ({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads'}), "
        f"{precision}, seq {args.seq_len} × micro-batch {args.batch_size} = {tokens} tokens per step, "
        f"{warmup} warm-up + {rounds} timed rounds" + ("" if on_gpu else f"; {malloc}")
    )
    for r in range(warmup + rounds):
        batch = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
        # Rotate which candidate goes first so none always runs on a warmer cache.
        order = candidates[r % 3 :] + candidates[: r % 3]
        for c in order:
            one_step(c, accelerator, batch)
        if r < warmup:
            for c in candidates:
                c.step_s.clear(), c.fwd_bwd_s.clear(), c.opt_s.clear()

    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if on_gpu and peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    med = statistics.median
    print(
        f"{'model':<6} {'params':>8} {'step s':>8} {'fwd+bwd s':>10} {'optim s':>8} {'tokens/s':>10}"
        + (" MFU" if peak else "")
    )
    for c in candidates:
        tps = tokens / med(c.step_s)
        mfu = f" {c.flops_per_token * tps / peak:6.1%}" if peak else ""
        print(
            f"{c.name:<6} {c.params / 1e6:7.1f}M {med(c.step_s):8.3f} {med(c.fwd_bwd_s):10.3f} {med(c.opt_s):8.3f} "
            f"{tps:10,.0f}{mfu}"
        )
    dense_c, moe_c, hf_c = candidates
    ratios = [m / d for m, d in zip(moe_c.step_s, dense_c.step_s)]
    ratio = med(ratios)
    print(
        f"MoE ÷ dense step time: {ratio:.3f} (median of {rounds} rounds; per round "
        f"{', '.join(f'{x:.3f}' for x in ratios)}); target ≤ 1.10: {'met' if ratio <= 1.10 else 'NOT met'}"
    )
    print(
        f"breakdown MoE ÷ dense: forward+backward {med(moe_c.fwd_bwd_s) / med(dense_c.fwd_bwd_s):.3f}, "
        f"optimizer (clip + AdamW + zero_grad) {med(moe_c.opt_s) / med(dense_c.opt_s):.3f}; "
        f"MoE ÷ dense-hf step time {med(m / d for m, d in zip(moe_c.step_s, hf_c.step_s)):.3f}"
    )


if __name__ == "__main__":
    main()
