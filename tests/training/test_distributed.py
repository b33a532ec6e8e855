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


# --------------------------------------------------------------------------- fine-tuning, and FSDP
# FSDP needs an accelerator launch: Accelerate (1.16, state.py, AcceleratorState.__init__) turns a launch
# into DistributedType.FSDP only for MULTI_GPU / NPU / XPU / HPU / MLU / MUSA / SDAA / NEURON; a CPU
# launch (MULTI_CPU, gloo) stays DDP whatever ACCELERATE_USE_FSDP or the config file says. PyTorch's
# FSDP2 itself runs on CPU with gloo, but not through Accelerate, so the FSDP cases run where two GPUs are.
FSDP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp.yaml"
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP through Accelerate needs 2 GPUs (a CPU launch is always MULTI_CPU: accelerate/state.py)",
)


def launch_two(kind: str, command: str, config_file: Path) -> subprocess.CompletedProcess:
    if kind == "ddp-cpu":
        env = {
            **subprocess_env(),
            "ACCELERATE_USE_CPU": "1",
        }  # Accelerate picks MULTI_CPU (gloo) under torchrun
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
    else:
        env = subprocess_env()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--main_process_port", str(free_port())]  # fmt: skip
    proc = subprocess.run(
        [*cmd, "-m", "upcycle", command, "--config", str(config_file)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()][:5]
    assert proc.returncode == 0, "\n".join(errors) + proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # only the main process reports
    return proc


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp-cpu", pytest.param("fsdp", marks=needs_two_gpus)])
def test_finetune_two_processes_match_one_with_double_accumulation(xnli, strong_aux_moe, tmp_path, kind):
    from tests.training.conftest import tiny_finetune_config
    from upcycle.training import finetune

    two = tiny_finetune_config(
        xnli, tmp_path / "two", model=strong_aux_moe, train_languages="fr,es", steps=6, batch_size=4,
        grad_accum=2, eval_every=3, eval_examples=10, eval_batch_size=4, save_every=0, log_every=1,
    )  # fmt: skip
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(two.to_dict()))
    proc = launch_two(kind, "finetune", config_file)
    assert "= 4 per process × 2 accumulation × 2 processes" in proc.stdout

    one = finetune(dataclasses.replace(two, out=str(tmp_path / "one"), grad_accum=4))
    assert_same_weights(Path(two.out) / "final", one.final_dir)
    assert_same_weights(Path(two.out) / "best", Path(one.run_dir) / "best")
    log_two = read_metrics(Path(two.out) / "metrics.jsonl")
    log_one = read_metrics(Path(one.run_dir) / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in log_two] == [(r["kind"], r["step"]) for r in log_one]
    for r2, r1 in zip(log_two, log_one):
        for key in ("loss", "task_loss", "aux_loss", "z_loss", "accuracy", "tokens", "examples"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (r1["kind"], r1["step"], key)
        if r1["kind"] == "eval":  # every validation example counted once, by exactly one process
            for lang, figures in r1["languages"].items():
                assert r2["languages"][lang] == pytest.approx(figures, rel=1e-5, abs=1e-6), lang
            assert [v["n"] for v in r2["languages"].values()] == [10, 10]
        counts = [[layer["tokens_per_expert"] for layer in r.get("routing", {}).values()] for r in (r2, r1)]
        assert counts[0] == counts[1], (r1["kind"], r1["step"])
    assert [r for r in log_one if r["kind"] == "train"][-1]["aux_loss"] > 0.5


@pytest.mark.slow
@needs_two_gpus
def test_pretrain_fsdp_two_processes_match_one_with_double_accumulation(corpus, strong_aux_moe, tmp_path):
    two = tiny_config(
        corpus, tmp_path / "two", model=strong_aux_moe, steps=6, batch_size=2, grad_accum=2, lr=3e-3,
        save_every=3, eval_every=3, eval_batches=3, log_every=1,
    )  # fmt: skip
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(two.to_dict()))
    launch_two("fsdp", "pretrain", config_file)
    one = pretrain(dataclasses.replace(two, out=str(tmp_path / "one"), grad_accum=4))
    assert_same_weights(Path(two.out) / "final", one.final_dir)
