"""Overhead of collecting routing (``upcycle analyze routing``) over the same forward passes without it.

A GPT-2-small-shaped MoE (the founding report's layout: 8 experts, top-1, every other layer; random
weights, or ``--top-k 2`` / ``--all-layers``) runs the same padded batches twice per round, in the way the
analysis runs them (inference mode, ``use_cache=False``, logits of the last position only): once plain,
once with a :class:`~upcycle.analysis.hooks.RoutingCounter` on its MoE layers (group indices set per
batch, counts read back to the host at the end of the round, as the analysis does once at the end). The
two alternate, and which goes first alternates too, so drift and warm caches hit both alike. The ratio
is the median over rounds of (with hooks ÷ without) timed in the same round. Issue 13's target: ≤ 1.05.

    python benchmarks/routing_analysis.py                              # CPU, fp32, 2 batches of 4 × 128
    python benchmarks/routing_analysis.py --device cuda --dtype bfloat16 --batch 32 --seq 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from upcycle.analysis.hooks import RoutingCounter


class TimedCounter(RoutingCounter):
    """A RoutingCounter that also adds up the wall time spent inside its hooks (the overhead itself,
    free of the round-to-round noise of a busy machine; on a GPU it is the launch cost, which is what
    delays the forward pass as long as the GPU keeps up)."""

    seconds = 0.0

    def _count(self, *args) -> None:
        t0 = time.perf_counter()
        super()._count(*args)
        TimedCounter.seconds += time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(n: int, batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0):
    """Padded batches like the analysis's: right padding, a quarter of the rows shorter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for b in range(0, batch, 4):
            mask[b, int(torch.randint(seq // 4, seq, (1,), generator=gen)) :] = 0
        groups = torch.randint(0, 15, (batch,), generator=gen).tolist()
        out.append((ids.to(device), mask.to(device), groups))
    return out


def forward_all(model, batches, counter: RoutingCounter | None) -> None:
    for ids, mask, groups in batches:
        if counter is not None:
            counter.set_groups(groups)
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)


def timed_round(model, batches, hooks: bool, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if hooks:
            with TimedCounter(model.moe_layers(), 15) as counter:
                forward_all(model, batches, counter)
            counter.result()  # the host read-back the analysis does once at the end
        else:
            forward_all(model, batches, None)
    sync(device)
    return time.perf_counter() - t0


def build(args, device: torch.device):
    """The gpt2-small-moe preset with --top-k and --all-layers applied, randomly initialised."""
    import dataclasses

    from upcycle.models.modeling import MoEGPT2Config, MoEGPT2LMHeadModel
    from upcycle.models.presets import dense_config, get_preset, moe_config_fields
    from upcycle.upcycling.options import parse_layers

    base = get_preset("gpt2-small-moe")
    preset = dataclasses.replace(
        base,
        moe={**(base.moe or {}), "top_k": args.top_k},
        moe_layers="all" if args.all_layers else base.moe_layers,
    )
    dense = dense_config(preset)
    fields = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "architectures", "dtype")}
    config = MoEGPT2Config(
        **fields,
        moe=moe_config_fields(preset, dense),
        moe_layers=parse_layers(preset.moe_layers, dense.num_hidden_layers),
    )
    torch.manual_seed(0)
    return MoEGPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--all-layers", action="store_true", help="MoE in every layer (12 hooks, not 6)")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = build(args, device)
    batches = make_batches(args.batches, args.batch, args.seq, model.config.vocab_size, device)
    timed_round(model, batches, True, device)  # warm-up: kernels, allocator, expert workers
    timed_round(model, batches, False, device)
    plain, hooked, ratios = [], [], []
    TimedCounter.seconds = 0.0
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        t = {hooks: timed_round(model, batches, hooks, device) for hooks in order}
        plain.append(t[False])
        hooked.append(t[True])
        ratios.append(t[True] / t[False])
    tokens = args.batches * args.batch * args.seq
    layers = len(model.moe_layers())
    print(
        f"{device.type} {args.dtype}, threads={torch.get_num_threads()}: GPT-2-small MoE, {layers} MoE layers, "
        f"8 experts top-{args.top_k}; {args.batches} batches of {args.batch} × {args.seq} ({tokens:,} positions)"
    )
    print(f"forward without hooks: median {statistics.median(plain) * 1e3:.1f} ms")
    print(f"forward with routing counted: median {statistics.median(hooked) * 1e3:.1f} ms")
    inside = TimedCounter.seconds / args.rounds
    print(
        f"time inside the hooks: {inside * 1e3:.2f} ms per pass = {inside / statistics.median(plain):.2%} of the forward"
    )
    print(
        f"with ÷ without: median {statistics.median(ratios):.3f} (per round {min(ratios):.3f}–{max(ratios):.3f}; "
        "target ≤ 1.05)"
    )


if __name__ == "__main__":
    main()
