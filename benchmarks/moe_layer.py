"""MoE layer speed: forward+backward time relative to a dense MLP, ours vs Hugging Face, in one run.

For each shape family (GPT-2: 768/3072 GELU with biases; SwiGLU: 768/2048 no biases), top-k, number of
experts and token count, the script times forward+backward on the same tokens for

- the dense MLP whose FLOPs equal one expert's (the dense model being upcycled, i.e. the active FLOPs
  of top-1 routing),
- our ``MoE`` layer as it runs by default (``auto``: on CPU the experts side by side on single-threaded
  workers, ``upcycle.moe.bank``; on CUDA one grouped GEMM per projection, ``upcycle.moe.grouped``), the
  same layer with its experts one after another (``loop×``) and on the grouped path (``grouped×``),
- Hugging Face's ``MixtralSparseMoeBlock`` with its ``eager`` and ``grouped_mm`` expert implementations
  (Mixtral experts are always gated, so its ratio is against a dense gated MLP of the same sizes). For the
  SwiGLU family our layer carries the very weights of the Hugging Face block and runs in the same rounds:
  ``eager÷ours`` and ``grouped÷ours`` are Hugging Face's times over ours (above 1: ours is faster),

interleaving the candidates round by round and reporting medians. The ratio columns are the median over
rounds of candidate ÷ dense timed in the same round; for top-2 the active FLOPs are twice the dense ones,
so the ideal is 2.0. Targets: on CPU (4096 tokens) issue 2's, on CUDA (16k tokens) issue 16's.

On CPU the process serves every allocation from a heap it never trims (``--malloc heap``, the default;
``upcycle.training.memory.keep_freed_memory(heap_only=True)``), so after warm-up nobody page-faults and the
ratios compare compute alone. ``--malloc keep`` is what ``upcycle pretrain`` sets (mmap above 32 MiB, no
trimming): there the dense MLP's 4096-token hidden activations (≥ 32 MiB) are fresh ``mmap``s that
page-fault every call while the experts' smaller slices are reused, which flatters the MoE by a few
percent. ``--malloc default`` keeps glibc's defaults.

    python benchmarks/moe_layer.py                         # CPU, float32, 4096 tokens (issue 2's targets)
    python benchmarks/moe_layer.py --device cuda --dtype bf16          # 4k, 16k and 64k tokens
    python benchmarks/moe_layer.py --tokens 16384 --family swiglu      # one token count, one family
    python benchmarks/moe_layer.py --uneven                            # CPU: uneven slices (fine-tuning)

``--uneven`` times the CPU expert schedule (``upcycle.moe.bank.schedule``) on uneven slices: GPT-2's 8
experts on slice sizes recorded from ``benchmarks/finetune_eval.py``'s fine-tuning steps (32 pairs, about
1,440 tokens, where the router sends most of a layer's tokens to one or two experts), forward+backward
of the experts alone, each ÷ the dense MLP on the same rows: the loop (every expert with all threads),
every expert on the worker pool, and ours (the largest slices with all threads, the rest on the pool).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from upcycle.models.mapping import load_stacked_glu_experts
from upcycle.moe import MoE, MoEConfig, bank
from upcycle.moe.experts import make_expert
from upcycle.moe.paths import expert_path_set
from upcycle.training.memory import keep_freed_memory

#: MoE ÷ dense targets by device: issue 2's on CPU (4096 tokens), issue 16's on CUDA (16k tokens).
TARGETS = {
    "cpu": {("top1", 8): 1.05, ("top2", 8): 2.1, ("top1", 32): 1.25},
    "cuda": {("top1", 8): 1.15, ("top1", 32): 1.3},
}


class GatedDense(nn.Module):
    """Dense gated MLP with HF Mixtral's fused gate_up layout: the reference for Mixtral's blocks."""

    def __init__(self, D: int, F_: int, act):
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * F_, bias=False)
        self.down = nn.Linear(F_, D, bias=False)
        self.act = act

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(g) * u)


class OnPath(nn.Module):
    """The same layer with its experts on one path (upcycle.moe.paths): ``loop`` runs them one after
    another, each GEMM on all intra-op threads; ``grouped`` in one grouped GEMM per projection."""

    def __init__(self, moe: MoE, path: str):
        super().__init__()
        self.moe, self.path = moe, path

    def forward(self, x):
        with expert_path_set(self.path):
            return self.moe(x)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward+backward on (1, T, D); every candidate gets the same input and output gradient."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad.view_as(out))


def bench(candidates: dict, x, grad, device: str, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per-round wall times of each candidate; candidates run back to back within a round, so the ratio
    of two candidates in the same round cancels slow drifts of the machine."""
    for _ in range(warmup):
        for m in candidates.values():
            fwd_bwd(m, x, grad)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, m in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd(m, x, grad)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num/den measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median_ms(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name]) * 1e3


def hf_block(D, F_, E, K, act, impl, device, dtype):
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K, hidden_act=act
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.02)
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    return block.to(device, dtype)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="token counts (default: 4096 on CPU, 4k 16k 64k on CUDA)",
    )
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds for dense vs ours")
    ap.add_argument("--hf-rounds", type=int, default=3, help="timed rounds for the Hugging Face blocks")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face blocks")
    ap.add_argument(
        "--family", choices=["gpt2", "swiglu"], action="append", help="only these shapes (repeatable)"
    )
    ap.add_argument(
        "--routing", choices=["top1/8", "top2/8", "top1/32"], action="append", help="only these (repeatable)"
    )
    ap.add_argument(
        "--uneven", action="store_true", help="CPU: time the expert schedule on uneven slices only"
    )
    ap.add_argument(
        "--malloc",
        choices=["heap", "keep", "default"],
        default="heap",
        help="CPU allocator: heap (no page faults after warm-up), keep (upcycle pretrain's), default (glibc's)",
    )
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = [4096, 16384, 65536] if args.device.startswith("cuda") else [4096]
    return args


def hf_columns(args, family, D, F_, E, K, act, ours, x, grad, dtype) -> tuple[str, str, str, str]:
    """Hugging Face eager and grouped_mm ÷ their gated dense MLP; for SwiGLU also HF ÷ ours on HF's weights."""
    if args.no_hf:
        return "-", "-", "-", "-"
    hf_act = "gelu_pytorch_tanh" if act == "gelu_new" else act
    act_fn = F.silu if act == "silu" else (lambda v: F.gelu(v, approximate="tanh"))
    hf = {
        "gdense": GatedDense(D, F_, act_fn).to(args.device, dtype),
        "hf_eager": hf_block(D, F_, E, K, hf_act, "eager", args.device, dtype),
        "hf_grouped": hf_block(D, F_, E, K, hf_act, "grouped_mm", args.device, dtype),
    }
    if family == "swiglu":
        with torch.no_grad():
            ours.router.weight.copy_(hf["hf_eager"].gate.weight)
            hf["hf_grouped"].load_state_dict(hf["hf_eager"].state_dict())
        load_stacked_glu_experts(ours, hf["hf_eager"].experts.gate_up_proj, hf["hf_eager"].experts.down_proj)
        hf["ours"] = ours
    th = bench(hf, x, grad, args.device, args.hf_rounds, 1)
    eager, grouped = paired_ratio(th, "hf_eager", "gdense"), paired_ratio(th, "hf_grouped", "gdense")
    if family != "swiglu":
        return f"{eager:.2f}", f"{grouped:.2f}", "-", "-"
    vs_eager, vs_grouped = paired_ratio(th, "hf_eager", "ours"), paired_ratio(th, "hf_grouped", "ours")
    return f"{eager:.2f}", f"{grouped:.2f}", f"{vs_eager:.2f}", f"{vs_grouped:.2f}"


#: Slice sizes of GPT-2's 8 experts in one MoE layer, recorded in fine-tuning steps of 32 XNLI-length pairs
#: (``benchmarks/finetune_eval.py``), from even to one expert taking nearly every token.
UNEVEN_SIZES = (
    (359, 338, 167, 18, 142, 67, 184, 197),
    (64, 714, 27, 0, 128, 0, 34, 25),
    (33, 19, 0, 510, 48, 59, 0, 3),
    (560, 0, 0, 16, 28, 0, 18, 50),
    (0, 0, 0, 0, 1091, 0, 318, 95),
    (3, 4, 0, 976, 0, 9, 0, 0),
    (0, 0, 0, 1455, 0, 49, 0, 0),
)


class Slices(nn.Module):
    """Experts on fixed contiguous slices of the rows: ``loop`` one after another with all threads,
    ``pool`` all on the worker pool, ``ours`` as :func:`upcycle.moe.bank.schedule` splits them."""

    def __init__(self, experts: nn.ModuleList, sizes, how: str):
        super().__init__()
        self.experts, self.sizes, self.how = experts, list(sizes), how

    def forward(self, x):
        xs = x.view(-1, x.shape[-1])
        if self.how == "loop":
            return torch.cat([e(c) for e, c in zip(self.experts, xs.split(self.sizes))])
        plan = None
        if self.how == "pool":  # every expert, empty ones too, on the workers, largest slice first
            plan = bank.Schedule([], sorted(range(len(self.sizes)), key=lambda i: -self.sizes[i]))
        return bank.run_parallel(self.experts, xs, self.sizes, bank.cpu_expert_workers(), plan)


def uneven_table(args) -> None:
    """Forward+backward of GPT-2's 8 experts on each of :data:`UNEVEN_SIZES` ÷ the dense MLP on the same rows."""
    D, F_ = 768, 3072
    experts = MoE(
        MoEConfig(hidden_size=D, intermediate_size=F_, num_experts=8, activation="gelu_new")
    ).experts
    dense = make_expert("mlp", D, F_, "gelu_new", True)
    print(
        f"uneven slices: GPT-2 experts (768/3072), {bank.cpu_expert_workers()} workers; ratios ÷ dense MLP on the same rows"
    )
    print(f"{'slice sizes':42} {'wide':>5} {'dense ms':>9} {'loop×':>6} {'pool×':>6} {'ours×':>6}")
    for sizes in UNEVEN_SIZES:
        x = torch.randn(1, sum(sizes), D, requires_grad=True)
        grad = torch.randn_like(x)
        candidates = {
            "dense": dense,
            **{how: Slices(experts, sizes, how) for how in ("loop", "pool", "ours")},
        }
        t = bench(candidates, x, grad, "cpu", args.rounds, args.warmup)
        wide = len(bank.schedule(sizes, bank.cpu_expert_workers()).wide)
        r = {how: paired_ratio(t, how, "dense") for how in ("loop", "pool", "ours")}
        print(
            f"{str(list(sizes)):42} {wide:>5} {median_ms(t, 'dense'):9.1f} {r['loop']:6.2f} {r['pool']:6.2f} "
            f"{r['ours']:6.2f}",
            flush=True,
        )


def main() -> None:
    args = parse_args()
    malloc = "default malloc"
    if args.device == "cpu" and args.malloc != "default":
        if keep_freed_memory(heap_only=args.malloc == "heap"):
            malloc = f"malloc={args.malloc}"
        else:
            malloc = "default malloc (not glibc)"
    targets = TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]
    if args.uneven:
        if args.device != "cpu":
            raise SystemExit("--uneven times the CPU worker pool: use it with --device cpu")
        return uneven_table(args)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(f"device={args.device} ({name}) dtype={args.dtype} ({malloc})")
    print(
        f"{'shape':8} {'route':5} {'E':>3} {'tokens':>6} {'dense ms':>9} {'ours ms':>8} {'ours×':>6} {'target':>7} "
        f"{'loop×':>6} {'grouped×':>8} {'hf-eager×':>9} {'hf-grouped×':>11} {'eager÷ours':>10} {'grouped÷ours':>12}"
    )
    failures = []
    families = (("gpt2", 768, 3072, "mlp", "gelu_new"), ("swiglu", 768, 2048, "glu", "silu"))
    for tokens in args.tokens:
        for family, D, F_, expert_type, act in families:
            if args.family and family not in args.family:
                continue
            for K, E in ((1, 8), (2, 8), (1, 32)):
                if args.routing and f"top{K}/{E}" not in args.routing:
                    continue
                x = torch.randn(1, tokens, D, device=args.device, dtype=dtype, requires_grad=True)
                grad = torch.randn_like(x)
                cfg = MoEConfig(
                    hidden_size=D,
                    intermediate_size=F_,
                    num_experts=E,
                    top_k=K,
                    expert_type=expert_type,
                    activation=act,
                    renormalize=K > 1,
                )
                ours = MoE(cfg).to(args.device, dtype)
                dense = make_expert(expert_type, D, F_, act, expert_type == "mlp").to(args.device, dtype)
                candidates = {
                    "dense": dense,
                    "ours": ours,
                    "loop": OnPath(ours, "loop"),
                    "grouped": OnPath(ours, "grouped"),
                }
                t = bench(candidates, x, grad, args.device, args.rounds, args.warmup)
                ratio = paired_ratio(t, "ours", "dense")
                loop, grouped = paired_ratio(t, "loop", "dense"), paired_ratio(t, "grouped", "dense")
                hf_e, hf_g, e_vs, g_vs = hf_columns(args, family, D, F_, E, K, act, ours, x, grad, dtype)
                target = targets.get((f"top{K}", E))
                mark = ""
                if target is not None and ratio > target:
                    mark = "  <-- above target"
                    failures.append((family, K, E, tokens, ratio, target))
                shown_target = f"≤{target}" if target else ""
                print(
                    f"{family:8} top{K:<2}  {E:>3} {tokens:>6} {median_ms(t, 'dense'):9.1f} {median_ms(t, 'ours'):8.1f} "
                    f"{ratio:6.2f} {shown_target:>7} {loop:6.2f} {grouped:8.2f} {hf_e:>9} {hf_g:>11} {e_vs:>10} "
                    f"{g_vs:>12}{mark}",
                    flush=True,
                )
                del ours, dense, candidates, x, grad
    print(f"{len(failures)} configuration(s) above target" if failures else "all targets met")


if __name__ == "__main__":
    main()
