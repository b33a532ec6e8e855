"""Experts on parallel CPU workers (upcycle.moe.bank): the same outputs and gradients as the module loop,
taken only when it computes the same thing, and safe around threads, forks and autograd features."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.moe.test_routing import VARIANTS, check_against_reference, make
from upcycle.moe import (
    MoE,
    MoEConfig,
    bank,
    cpu_expert_workers,
    cpu_expert_workers_set,
    set_cpu_expert_workers,
)
from upcycle.moe import experts as experts_module


def _forced(where: str):
    """A fixed bank.schedule: ``pool`` puts every expert on the workers; ``split`` alternates, largest slice
    first, between the calling thread (all threads) and the workers, whatever the sizes."""

    def plan(sizes, workers):
        order = bank._lpt_order(sizes)
        return bank.Schedule([], order) if where == "pool" else bank.Schedule(order[::2], order[1::2])

    return plan


@pytest.fixture(params=["pool", "split"])
def spy(request, monkeypatch):
    """Count calls of the parallel path, run with every expert on the workers, or with the experts split
    between the calling thread and the workers (both of bank.schedule's groups in one layer)."""
    calls = []
    real = bank.run_parallel
    monkeypatch.setattr(bank, "schedule", _forced(request.param))
    monkeypatch.setattr(bank, "run_parallel", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


def pair(seed=0, T=300, **kw):
    """A layer and inputs big enough that every expert gets several rows."""
    torch.manual_seed(seed)
    kw.setdefault("num_experts", 6)
    moe = MoE(MoEConfig(hidden_size=32, intermediate_size=48, **kw))
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return moe, torch.randn(2, T // 2, 32)


def grads_of(moe, x, workers):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with cpu_expert_workers_set(workers):
        y = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_variants_on_parallel_workers_match_dense_reference(kw, spy):
    with cpu_expert_workers_set(2):
        check_against_reference(make(**kw))
    assert spy, "the parallel path was not taken"


EXPERTS = [
    dict(expert_type="mlp", activation="gelu_new"),
    dict(expert_type="mlp", activation="gelu", expert_bias=False),
    dict(expert_type="mlp", activation="relu"),
    dict(expert_type="mlp", activation="quick_gelu"),
    dict(expert_type="glu", activation="silu"),
    dict(expert_type="glu", activation="gelu_pytorch_tanh", expert_bias=True),
]


@pytest.mark.parametrize("kw", EXPERTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("top_k", [1, 2])
def test_parallel_workers_equal_the_module_loop(kw, top_k, spy):
    moe, x = pair(top_k=top_k, **kw)
    y1, dx1, g1 = grads_of(moe, x, workers=1)
    assert not spy
    y3, dx3, g3 = grads_of(moe, x, workers=3)  # more workers than cores is allowed
    assert spy == [3]
    torch.testing.assert_close(y3, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx3, dx1, atol=1e-5, rtol=1e-5)
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], atol=1e-5, rtol=1e-5, msg=name)


def test_bfloat16_parallel_workers_follow_the_module_loop(spy):
    moe, x = pair(top_k=2, expert_type="glu")
    moe, x = moe.to(torch.bfloat16), x.to(torch.bfloat16)
    y1, dx1, g1 = grads_of(moe, x, workers=1)
    y2, dx2, g2 = grads_of(moe, x, workers=2)
    assert spy and y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx2, dx1, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(
        g2["experts.0.down_proj.weight"], g1["experts.0.down_proj.weight"], atol=5e-2, rtol=2e-2
    )


def test_frozen_expert_parameters_get_no_gradient_and_the_rest_match(spy):
    moe, x = pair(top_k=1)
    _, _, want = grads_of(moe, x, workers=1)
    frozen = {"experts.0.up_proj.weight", "experts.2.down_proj.bias", "experts.3.up_proj.bias"}
    for name, p in moe.named_parameters():
        p.requires_grad_(name not in frozen)
    _, _, got = grads_of(moe, x, workers=2)
    assert spy
    for name in want:
        if name in frozen:
            assert got[name] is None
        else:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_unused_experts_still_get_zero_gradients(spy):
    moe, x = pair(top_k=1, num_experts=4)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = torch.tensor([50.0, -50.0])  # route by the sign of feature 0
    _, _, grads = grads_of(moe, x, workers=2)
    assert spy
    for name, g in grads.items():
        if name.startswith(("experts.2.", "experts.3.")):
            assert g is not None and torch.count_nonzero(g) == 0, name  # DDP needs them, as zeros


def test_no_grad_and_inference_mode_match(spy):
    moe, x = pair(top_k=2)
    with torch.no_grad(), cpu_expert_workers_set(1):
        want = moe(x)
    with torch.no_grad(), cpu_expert_workers_set(2):
        got = moe(x)
    with torch.inference_mode(), cpu_expert_workers_set(2):
        got_inf = moe(x)
    assert len(spy) == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_inf, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, spy):
    moe, x = pair(top_k=2, expert_type="glu")
    _, dx_want, want = grads_of(moe, x, workers=1)
    moe.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    with cpu_expert_workers_set(2):
        y = torch.utils.checkpoint.checkpoint(moe, xr, use_reentrant=reentrant)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert len(spy) == 2  # forward and its recomputation
    torch.testing.assert_close(xr.grad, dx_want, atol=1e-5, rtol=1e-5)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-5, msg=name)


class LoRALinear(nn.Linear):
    """Stands for an adapter library's Linear subclass: its forward must run."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_hooks_and_wrapped_layers_keep_the_module_calls(spy):
    moe, x = pair(top_k=1)
    seen = []
    handle = moe.experts[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with cpu_expert_workers_set(2):
        moe(x)
    handle.remove()
    assert seen and not spy

    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with cpu_expert_workers_set(2):
            moe(x)
    finally:
        handle.remove()
    assert not spy

    with cpu_expert_workers_set(2):
        want = moe(x)
    assert spy
    spy.clear()
    old = moe.experts[0].up_proj
    moe.experts[0].up_proj = LoRALinear(old.in_features, old.out_features)
    moe.experts[0].up_proj.load_state_dict(old.state_dict())
    with cpu_expert_workers_set(2):
        got = moe(x)
    assert not spy and not torch.allclose(got, want)


def test_autocast_and_mixed_dtypes_keep_the_module_loop(spy):
    moe, x = pair(top_k=1)
    with cpu_expert_workers_set(2), torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert not spy and torch.isfinite(y.float()).all()
    with cpu_expert_workers_set(2), pytest.raises(RuntimeError):
        moe(x.double())  # PyTorch's own dtype error, as without the workers
    assert not spy


def test_uneven_slices_run_their_largest_experts_with_all_threads():
    assert bank._imbalance([500, 500, 500, 500], 2) == pytest.approx(1.0)
    assert bank._imbalance([1000, 10, 10, 10], 2) > bank.MAX_IMBALANCE
    assert bank.schedule([75, 75, 75, 75], 2) == bank.Schedule([], [0, 1, 2, 3])
    # One expert takes most rows: it leaves the pool; the rest share the workers evenly.
    # Experts without rows only write zero gradients: always with all threads.
    assert bank.schedule([33, 19, 0, 510, 48, 59, 0, 3], 2) == bank.Schedule([3, 2, 6], [5, 4, 0, 1, 7])
    assert bank.schedule([500, 0, 460, 0], 2) == bank.Schedule([1, 3], [0, 2])  # 524 vs 484 rows: even enough
    assert bank.schedule([900, 280, 300, 0], 2) == bank.Schedule([0, 3], [2, 1])
    assert bank.schedule([300, 0, 0, 0], 4) == bank.Schedule([0, 1, 2, 3], [])
    moe, x = pair(top_k=1, num_experts=4)
    with cpu_expert_workers_set(2):
        assert bank.parallel_plan(moe.experts, x.view(-1, 32), [300, 0, 0, 0]) == 2
    with cpu_expert_workers_set(1):
        assert bank.parallel_plan(moe.experts, x.view(-1, 32), [75, 75, 75, 75]) == 0


@pytest.mark.parametrize("expert_type", ["mlp", "glu"])
def test_uneven_routing_equals_the_module_loop(expert_type, monkeypatch):
    """Fine-tuning's uneven routing (one expert takes most tokens): wide and pooled experts together give
    the module loop's outputs and gradients."""
    plans = []
    real = bank.schedule
    monkeypatch.setattr(bank, "schedule", lambda *a: plans.append(real(*a)) or plans[-1])
    moe, x = pair(T=600, top_k=1, num_experts=6, expert_type=expert_type)
    x = x.clone()
    x[..., 0] = x[..., 0].abs() + 1.0
    with torch.no_grad():
        moe.router.weight[0, 0] += 0.15  # expert 0 takes about 70 % of the tokens
    y1, dx1, g1 = grads_of(moe, x, workers=1)
    assert not plans
    y2, dx2, g2 = grads_of(moe, x, workers=2)
    assert plans and plans[0].wide and plans[0].narrow, plans
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx2, dx1, atol=1e-5, rtol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-5, msg=name)


def test_caller_keeps_its_thread_count_and_workers_report_errors(spy, monkeypatch):
    before = torch.get_num_threads()
    moe, x = pair(top_k=2)
    with cpu_expert_workers_set(2):
        moe(x).sum().backward()
    assert spy and torch.get_num_threads() == before

    def broken(h, out):
        raise FloatingPointError("raised on a worker")

    monkeypatch.setitem(experts_module.ACTIVATION_INTO, "gelu_new", broken)
    with cpu_expert_workers_set(2), pytest.raises(FloatingPointError, match="on a worker"):
        moe(x)


def test_worker_setting_validation(monkeypatch):
    with pytest.raises(ValueError, match="workers"):
        set_cpu_expert_workers(-1)
    with cpu_expert_workers_set(None):
        monkeypatch.setenv("UPCYCLE_CPU_EXPERT_WORKERS", "two")
        with pytest.raises(ValueError, match="UPCYCLE_CPU_EXPERT_WORKERS"):
            cpu_expert_workers()
        monkeypatch.setenv("UPCYCLE_CPU_EXPERT_WORKERS", "0")
        assert cpu_expert_workers() == 1
        monkeypatch.setenv("UPCYCLE_CPU_EXPERT_WORKERS", "3")
        assert cpu_expert_workers() == 3
        monkeypatch.delenv("UPCYCLE_CPU_EXPERT_WORKERS")
        assert cpu_expert_workers() == max(torch.get_num_threads(), 1)


def _child_forward(queue):
    # As DataLoader workers do: GNU OpenMP cannot run a multi-threaded region in a forked child.
    torch.set_num_threads(1)
    moe, x = pair(top_k=2)
    with cpu_expert_workers_set(2):
        queue.put(moe(x).sum().item())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_can_run_parallel_experts():
    moe, x = pair(top_k=2)
    with cpu_expert_workers_set(2):
        want = moe(x).sum().item()  # the parent's pool threads exist now; the child has none of them
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_forward, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's worker pool")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(want, rel=1e-5)


def test_worker_arenas_do_not_page_fault_every_step():
    """Large tensors are allocated on the calling thread: a tensor malloc'ed on a worker lives in that
    thread's glibc arena, whose heaps are unmapped when they empty and fault again every step."""
    code = """
import resource, torch
from upcycle.training.memory import keep_freed_memory
from upcycle.moe import MoE, MoEConfig, bank, cpu_expert_workers_set
keep_freed_memory()
bank.MAX_IMBALANCE = float("inf")
calls = []
real = bank.run_parallel
bank.run_parallel = lambda *a: calls.append(1) or real(*a)
torch.manual_seed(0)
moe = MoE(MoEConfig(hidden_size=256, intermediate_size=1024, num_experts=16, top_k=1))
x = torch.randn(1, 2048, 256)
faults = []
with cpu_expert_workers_set(2):
    for step in range(8):
        moe.zero_grad(set_to_none=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        moe(x).sum().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
assert len(calls) == 8
# The fewest of the later steps: on a loaded VM, proactive reclaim (DAMON) takes pages back now and
# then, and a step pays for those; with arenas that unmap, every step faults its gradients afresh.
print(faults[0], min(faults[2:]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, later = map(int, out.stdout.split())
    # 16 experts' gradients alone are 32 MB (8k pages): the first step faults them in, later steps reuse
    # them (a quarter of that allows for the noise a busy machine adds; re-faulting them would exceed it).
    grad_pages = 16 * (2 * 256 * 1024 + 1024 + 256) * 4 // 4096
    assert first > grad_pages and later * 4 < grad_pages, (first, later, grad_pages)


def _run_python(code: str, env: dict | None = None) -> list[float]:
    """Run ``code`` in a fresh interpreter (the pool and OpenMP state are per process); its printed numbers."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**base, **(env or {})}
    )
    return [float(v) for v in out.stdout.split()]


def test_starting_workers_keeps_the_default_thread_count_of_later_threads():
    """torch.set_num_threads(1) on a worker also sets ATen's process-wide default, which a thread started
    later takes on its first op: without the restore, every such thread would be single-threaded."""
    code = """
import threading, torch
from upcycle.moe import bank
def new_thread_count():
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start(); t.join()
    return out[0]
torch.set_num_threads(2)
before = new_thread_count()
pool = bank._pool(2)
meet = threading.Barrier(2)
def count():
    meet.wait(timeout=30)  # both workers, not one twice
    return torch.get_num_threads()
workers = [f.result() for f in [pool.submit(count) for _ in range(2)]]
print(before, new_thread_count(), torch.get_num_threads(), *workers)
"""
    before, after, caller, *workers = _run_python(code)
    assert before == after == caller == 2
    assert workers == [1, 1]


SPIN_CODE = """
import time, torch
from upcycle.moe import MoE, MoEConfig, cpu_expert_workers_set
torch.set_num_threads(2)
def idle_cpu():
    # CPU time the process burns while its only busy thread sleeps after a parallel region: what idle
    # OpenMP threads spend spinning.
    t = torch.empty(1 << 20)
    total = 0.0
    for _ in range(20):
        t.fill_(1.0)
        start = time.process_time()
        time.sleep(0.02)
        total += time.process_time() - start
    return total
before = idle_cpu()
moe = MoE(MoEConfig(hidden_size=64, intermediate_size=256, num_experts=4, top_k=1))
with cpu_expert_workers_set(2):
    moe(torch.randn(1, 512, 64)).sum().backward()
print(before, idle_cpu())
"""


def test_idle_openmp_threads_stop_spinning_once_workers_exist():
    """GNU OpenMP's idle threads spin for ms after each parallel region, on cores the workers need; the
    pool makes libgomp spin only briefly (bank._shorten_openmp_spinning)."""
    before, after = _run_python(SPIN_CODE)
    if before < 0.01:
        pytest.skip(f"this OpenMP runtime does not spin after parallel regions ({before * 1e3:.1f} ms)")
    assert after * 4 < before, (before, after)


def test_openmp_waiting_chosen_by_the_user_is_left_alone():
    before, after = _run_python(SPIN_CODE, {"OMP_WAIT_POLICY": "ACTIVE"})
    if before < 0.05:
        pytest.skip(f"OMP_WAIT_POLICY=ACTIVE does not spin here ({before * 1e3:.1f} ms)")
    assert after > before / 2, (before, after)
