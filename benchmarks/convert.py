"""Conversion speed and memory: a randomly initialised GPT-2-small (124M) into 8 experts in every other
layer with Drop-Upcycling r = 0.15 (the founding report's setting), end to end: load the dense folder,
build and initialise the MoE, measure function preservation, write the checkpoint.

Prints the wall time and the peak resident memory the conversion added to the process (peak RSS minus
the RSS after imports), as a ratio to the size of the dense and MoE weights together.
Targets (issue 3): ≤ 10 s on 2 cores, peak ≤ 1.5 × (dense + MoE weights).

    python benchmarks/convert.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, resource, sys, time
import torch
import upcycle
from upcycle.upcycling import UpcycleConfig, convert

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

src, out = sys.argv[1], sys.argv[2]
base = rss_bytes()
t0 = time.perf_counter()
result = convert(UpcycleConfig(model=[src], out=out, preset="report-gpt2", method="drop", ratio=0.15, experts=8,
                               top_k=1, layers="every_other", renormalize=False, jitter=0.01), progress=False)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
moe_bytes = sum(p.numel() * p.element_size() for p in result.model.parameters())
print(json.dumps({"wall_s": wall, "base_rss": base, "peak_rss": peak, "moe_bytes": moe_bytes,
                  "fp": result.function_preservation}))
"""


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "gpt2-small-random")
        dense = GPT2LMHeadModel(GPT2Config())  # 12 layers, 768 hidden, 3072 d_ff: 124M parameters
        dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
        dense.save_pretrained(src)
        del dense
        out = os.path.join(tmp, "moe")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, src, out], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        total = time.perf_counter() - t0
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    added = r["peak_rss"] - r["base_rss"]
    weights = dense_bytes + r["moe_bytes"]
    print(
        f"threads={os.cpu_count()}  dense weights {dense_bytes / 2**20:.0f} MiB, MoE weights {r['moe_bytes'] / 2**20:.0f} MiB"
    )
    print(
        f"convert wall time: {r['wall_s']:.2f} s (target ≤ 10 s); with interpreter start and imports: {total:.2f} s"
    )
    print(
        f"peak memory added: {added / 2**20:.0f} MiB = {added / weights:.2f} × (dense + MoE weights) (target ≤ 1.5)"
        f"; process peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
    )
    print(
        f"function preservation: max |Δlogits| {r['fp']['max_abs_logit_diff']:.3g}, mean KL {r['fp']['mean_kl']:.3g}"
    )


if __name__ == "__main__":
    main()
