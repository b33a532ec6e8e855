"""Two CPU processes (DDP over gloo) match one process with twice the accumulation (issue 4).

Both runs see the same micro-batches (the global block stream), so the only differences are the order of
floating-point sums. The MoE has load-balancing weight 1.0 and z-loss weight 0.1, large enough that
scaling the auxiliary losses differently from the LM loss under accumulation or DDP (e.g. backward of
``lm_loss / accum + aux_loss``, or an aux loss summed instead of averaged over processes) moves the
parameters far outside the tolerance. Dropout and router jitter are off: the two runs' RNG streams differ.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.conftest import tiny_config
from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from tests.training.test_resilience import subprocess_env, weights
from upcycle.training import pretrain
from upcycle.training.reporting import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strong_aux_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    dense = save_tiny_gpt2(root / "dense", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return save_tiny_moe(root / "moe", dense, aux_loss_weight=1.0, z_loss_weight=0.1, jitter=0.0)


@pytest.mark.slow
def test_two_processes_match_one_with_double_accumulation(corpus, strong_aux_moe, tmp_path):
    two = tiny_config(
        corpus, tmp_path / "two", model=strong_aux_moe, steps=6, batch_size=2, grad_accum=2, lr=3e-3,
        save_every=0, eval_every=3, eval_batches=3, log_every=1,
    )  # fmt: skip
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(two.to_dict()))
    # ACCELERATE_USE_CPU makes Accelerate pick MULTI_CPU (gloo) under torchrun.
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    proc = subprocess.run(
        [*cmd, "-m", "upcycle", "pretrain", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()][:5]
    assert proc.returncode == 0, "\n".join(errors) + proc.stderr[-3000:]
    assert "= 2 per process × 2 accumulation × 2 processes" in proc.stdout
    assert proc.stdout.count("done:") == 1  # only the main process reports

    one = pretrain(dataclasses.replace(two, out=str(tmp_path / "one"), grad_accum=4))
    a, b = weights(Path(two.out) / "final"), weights(one.final_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")

    log_two = read_metrics(Path(two.out) / "metrics.jsonl")
    log_one = read_metrics(Path(one.run_dir) / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in log_two] == [(r["kind"], r["step"]) for r in log_one]
    for r2, r1 in zip(log_two, log_one):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "accuracy"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (r1["step"], key)
        # Routing counts are summed over processes (the eval's padding call is not counted).
        counts = [[layer["tokens_per_expert"] for layer in r.get("routing", {}).values()] for r in (r2, r1)]
        assert counts[0] == counts[1], (r1["kind"], r1["step"])
    last_train = [r for r in log_one if r["kind"] == "train"][-1]
    assert last_train["aux_loss"] > 0.5  # the auxiliary terms are a large part of the objective here
