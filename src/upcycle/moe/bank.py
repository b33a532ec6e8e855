"""Running the routed experts on CPU: one expert per core rather than every core on each expert.

Why (issue 2's speed targets; measured in ``benchmarks/moe_layer.py``): PyTorch splits every GEMM over
all its intra-op threads. Once an expert gets few tokens (4096 tokens over 32 experts is 128 rows a
GEMM), a GEMM split over two cores loses 10-25 % to the split, while the same GEMM on one core runs
at the dense model's per-core speed (M=128 vs M=4096: 0.99x for 768→2048, 1.08x for 2048→768). So on
CPU the experts go to a pool of single-threaded workers, largest slices first, in the forward and in
the backward. The backward is written out by hand (``MLPExpert.backward_into``/
``GLUExpert.backward_into``) inside one autograd Function over all experts, because the autograd
engine runs a device's backward nodes one after another on one thread. Every large tensor (outputs,
saved intermediates, gradients) is allocated on the calling thread: a tensor malloc'ed on a worker
lives in that thread's glibc arena, whose heaps are unmapped when they empty and page-fault again
every step (measured: 100k+ faults a step at 32 GPT-2 experts).

The layer takes this path only where it computes exactly what the module loop does
(:func:`parallel_plan` lists the conditions): CPU tensors, more than one worker, our own expert
classes with plain ``nn.Linear`` projections and no hooks (so PEFT adapters, parametrizations and
analysis hooks see the ordinary ``expert(x)`` calls), no autocast and no ``torch.compile`` tracing.
Otherwise it runs the experts one after another, each with all threads. Uneven slices are split
(:func:`schedule`): the largest slices, and experts without rows, run first, one after another on the
calling thread with all its threads (still through ``forward_into``/``backward_into``), until the rest
keeps the workers evenly busy. GPUs run the grouped path (upcycle.moe.grouped, upcycle.moe.paths).

Workers: as many as ``torch.get_num_threads()`` by default; :func:`set_cpu_expert_workers` or the
environment variable ``UPCYCLE_CPU_EXPERT_WORKERS`` changes that (0 or 1 turns the path off). Starting
them has two process-wide effects, both on purpose: threads started later keep the default intra-op
thread count (restored after the workers set theirs to 1), and idle GNU OpenMP threads sleep after
about 100 spins instead of spinning for milliseconds on the cores the workers need
(:func:`_shorten_openmp_spinning`; left alone when ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from upcycle.moe.experts import ACTIVATION_BACKWARD, GLUExpert, MLPExpert

#: A worker's makespan may exceed a perfect split by this factor before the largest slice leaves the
#: pool and runs with all threads on the calling thread (splitting a small GEMM over the cores loses
#: about as much).
MAX_IMBALANCE = 1.15
#: Fixed cost of one expert call in token rows (streaming its weights in the forward and the backward),
#: for the balance estimate. Measured on GPT-2's experts (2-core CPU, one thread): 16 rows cost as much
#: as about 40.
EXPERT_OVERHEAD_ROWS = 24

_workers_setting: int | None = None
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _env_workers() -> int | None:
    raw = os.environ.get("UPCYCLE_CPU_EXPERT_WORKERS")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"UPCYCLE_CPU_EXPERT_WORKERS={raw!r}: expected a non-negative integer (0 or 1 turns parallel "
            "CPU experts off)"
        ) from None
    if value < 0:
        raise ValueError(f"UPCYCLE_CPU_EXPERT_WORKERS={raw!r}: expected a non-negative integer")
    return value


def set_cpu_expert_workers(workers: int | None) -> None:
    """Number of single-threaded workers running experts on CPU: None follows ``torch.get_num_threads()``
    (the default), 0 or 1 runs experts one after another with all intra-op threads each."""
    global _workers_setting
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers={workers!r}: expected None or a non-negative integer")
    _workers_setting = workers


def cpu_expert_workers() -> int:
    """The number of CPU expert workers in effect now (1 means the path is off)."""
    if _workers_setting is not None:
        return max(_workers_setting, 1)
    env = _env_workers()
    return max(env if env is not None else torch.get_num_threads(), 1)


class cpu_expert_workers_set:
    """Context manager: ``with cpu_expert_workers_set(1): ...`` runs a block with another setting."""

    def __init__(self, workers: int | None):
        self.workers = workers

    def __enter__(self):
        global _workers_setting
        self.saved = _workers_setting
        set_cpu_expert_workers(self.workers)
        return self

    def __exit__(self, *exc):
        global _workers_setting
        _workers_setting = self.saved


def _init_worker(counter: itertools.count, ready: threading.Barrier) -> None:
    try:
        # get_num_threads first: ATen sets a thread's count from the process-wide default on its first op
        # unless it already has, which would undo the set_num_threads(1) below once _start_pool restores
        # that default.
        if torch.get_num_threads() > 1 and next(counter) == 0 and not _user_set_openmp_waiting():
            _shorten_openmp_spinning()
        # Intra-op thread counts are per thread (OpenMP ICV, mkl_set_num_threads_local): the caller keeps its
        # own.
        torch.set_num_threads(1)
    finally:
        ready.wait()


def _user_set_openmp_waiting() -> bool:
    return any(os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))


def _shorten_openmp_spinning() -> None:
    """Make idle OpenMP threads sleep almost at once instead of spinning for milliseconds.

    After each parallel region GNU OpenMP (the runtime of PyTorch's pip wheels) keeps its idle threads
    spinning for 300,000 iterations (a few ms) before they sleep. While the experts run, the caller's
    OpenMP threads are idle, so each spins on a core a worker needs: 18 ms of CPU a forward+backward at
    GPT-2 top-1/8 on 2 cores, and the layer 2.5-3.3 % slower for it (``benchmarks/moe_layer.py``). libgomp
    spins only 100 iterations once it manages more threads than there are CPUs (its rule against
    oversubscription), so one two-thread parallel region on a worker, whose team lives as long as the
    worker, turns that on for the process. Measured on the same machine, a dense GPT-2 forward+backward
    was not slower for it (0.98x). Not done when OMP_WAIT_POLICY or GOMP_SPINCOUNT is set: whoever set
    them chose how OpenMP waits. Other OpenMP runtimes ignore it (one idle thread more).
    """
    torch.set_num_threads(2)
    torch.empty(1 << 18).fill_(0.0)  # above ATen's grain size, so it runs as an OpenMP parallel region


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = _start_pool(workers)
        return pool


def _start_pool(workers: int) -> ThreadPoolExecutor:
    """A pool whose ``workers`` threads are all started and single-threaded when it is returned."""
    # torch.set_num_threads also sets the process-wide default that threads started later pick up on their
    # first op (ATen's lazy init); the workers' set_num_threads(1) would otherwise make every later thread
    # (a user's data thread, a second trainer) single-threaded. Restore the default once they are set.
    default = _default_threads()
    # A timeout turns a worker that never starts (a thread limit) into an error instead of a hang.
    ready = threading.Barrier(workers + 1, timeout=120)
    pool = ThreadPoolExecutor(
        workers,
        thread_name_prefix="upcycle-expert",
        initializer=_init_worker,
        initargs=(itertools.count(), ready),
    )
    # The executor starts a thread per submission while none is idle; each initialiser waits on the barrier,
    # so these submissions start all of them.
    for _ in range(workers):
        pool.submit(lambda: None)
    ready.wait()
    _set_default_threads(default)
    return pool


def _default_threads() -> int:
    """The intra-op thread count a newly started thread gets (ATen's process-wide default)."""
    out: list[int] = []
    probe = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return out[0]


def _set_default_threads(n: int) -> None:
    # On a throwaway thread: set_num_threads also sets the calling thread's own count.
    setter = threading.Thread(target=torch.set_num_threads, args=(n,))
    setter.start()
    setter.join()


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's threads; its executors would wait forever.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def _is_plain(expert: nn.Module, dtype: torch.dtype) -> bool:
    if type(expert) not in (MLPExpert, GLUExpert) or expert.activation not in ACTIVATION_BACKWARD:
        return False
    if any(p.dtype != dtype for p in expert.parameters()):
        return False  # mixed dtypes: let the module calls raise PyTorch's usual error
    for module in expert.modules():
        if module is not expert and type(module) is not nn.Linear:
            return False
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return False
    return True


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks)


def _lpt_order(sizes: Sequence[int]) -> list[int]:
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


def _imbalance(sizes: Sequence[int], workers: int) -> float:
    """Makespan of greedy largest-first scheduling (what the pool does) over a perfect split."""
    loads = [0] * workers
    for i in _lpt_order(sizes):
        j = loads.index(min(loads))
        loads[j] += sizes[i] + EXPERT_OVERHEAD_ROWS
    total = sum(loads)
    return max(loads) * workers / total if total else float("inf")


def parallel_plan(experts: Sequence[nn.Module], xs: torch.Tensor, sizes: Sequence[int]) -> int:
    """Number of workers to run ``experts`` on their slices with, or 0 for the plain loop."""
    workers = cpu_expert_workers()
    if workers < 2 or xs.device.type != "cpu" or len(experts) < 2:
        return 0
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.is_autocast_enabled("cpu"):
        return 0
    if _global_hooks() or not all(_is_plain(e, xs.dtype) for e in experts):
        return 0
    shapes = {(type(e), e.down_proj.in_features, e.down_proj.out_features) for e in experts}
    if len(shapes) > 1 or not xs.is_contiguous():
        return 0
    return workers


class Schedule(NamedTuple):
    """Which experts run where: ``wide`` one after another on the calling thread with all its intra-op
    threads, then ``narrow`` on the single-threaded workers, largest slice first."""

    wide: list[int]
    narrow: list[int]


def schedule(sizes: Sequence[int], workers: int) -> Schedule:
    """The largest slices leave the pool until the rest keeps the workers evenly busy.

    Fine-tuning routes unevenly (one expert may take most of a small batch's tokens): on the pool that
    expert would keep one core busy while the other idles, and the loop with all threads on each expert
    splits every small GEMM over both cores. Here the big slices run with all threads (a GEMM of many rows
    splits well) and the small ones side by side on the workers (measured in ``benchmarks/moe_layer.py
    --uneven``). Experts without rows only write zero gradients, memory-bound work that all threads
    share best: they run with all threads too.
    """
    order = [i for i in _lpt_order(sizes) if sizes[i]]
    empty = [i for i in range(len(sizes)) if not sizes[i]]
    for w in range(len(order) - 1):
        if (len(order) - w) * MAX_IMBALANCE < workers:
            break  # fewer slices than that can never keep every worker busy
        if _imbalance([sizes[i] for i in order[w:]], workers) <= MAX_IMBALANCE:
            return Schedule(order[:w] + empty, order[w:])
    return Schedule(order + empty, [])


def _run(pool: ThreadPoolExecutor, plan: Schedule, job: Callable[[int], None]) -> None:
    """``job(i)`` for every expert i as ``plan`` says; re-raises a worker's exception."""
    inference = torch.is_inference_mode_enabled()

    def call(i: int) -> None:
        # Grad mode and inference mode are thread-local: workers start with grad enabled.
        with torch.inference_mode(inference), torch.no_grad():
            job(i)

    for i in plan.wide:
        call(i)
    for _ in pool.map(call, plan.narrow):
        pass


def _forward(
    experts, xs: torch.Tensor, sizes: list[int], pool, plan: Schedule
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ys and the saved intermediates, all allocated here on the calling thread (see ``forward_into``)."""
    first = experts[0]
    N = xs.shape[0]
    ys = xs.new_empty(N, first.down_proj.out_features)
    saved = [xs.new_empty(N, first.down_proj.in_features) for _ in range(first.num_saved)]
    xs_c, ys_c = xs.split(sizes), ys.split(sizes)
    saved_c = [t.split(sizes) for t in saved]
    _run(pool, plan, lambda i: experts[i].forward_into(xs_c[i], ys_c[i], tuple(c[i] for c in saved_c)))
    return ys, saved


class _ExpertBank(torch.autograd.Function):
    """ys = cat(expert_i(xs_i)), each expert's forward and backward where ``plan`` (a :class:`Schedule`)
    puts it: wide ones on the calling thread with all threads, narrow ones on the worker pool.

    The parameters are saved for backward, and the backward reads them from there, not from the modules:
    autograd's version counters then make an in-place change between forward and backward raise (issue
    10), as it does for the module loop, instead of giving gradients of other weights silently.
    """

    @staticmethod
    def forward(ctx, xs, sizes, experts, pool, plan, *params):
        ys, saved = _forward(experts, xs, sizes, pool, plan)
        ctx.sizes, ctx.experts, ctx.pool, ctx.plan, ctx.num_saved = sizes, experts, pool, plan, len(saved)
        ctx.save_for_backward(xs, *saved, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, dys):
        xs, *rest = ctx.saved_tensors  # raises if a saved tensor was modified in place since the forward
        saved, params = rest[: ctx.num_saved], iter(rest[ctx.num_saved :])
        sizes, experts = ctx.sizes, ctx.experts
        needs = iter(ctx.needs_input_grad[5:])
        grads: list[torch.Tensor | None] = []
        buffers: list[dict[str, torch.Tensor]] = []
        weights: list[dict[str, torch.Tensor]] = []
        for expert in experts:
            own, values = {}, {}
            for name, _ in expert.named_parameters():
                values[name] = p = next(params)
                g = torch.empty_like(p) if next(needs) else None
                grads.append(g)
                if g is not None:
                    own[name] = g
            buffers.append(own)
            weights.append(values)
        dx = xs.new_empty(xs.shape) if ctx.needs_input_grad[0] else None
        xs_c, dys_c = xs.split(sizes), dys.contiguous().split(sizes)
        dx_c = dx.split(sizes) if dx is not None else [None] * len(sizes)
        saved_c = [t.split(sizes) for t in saved]
        _run(
            ctx.pool,
            ctx.plan,
            lambda i: experts[i].backward_into(
                xs_c[i], tuple(c[i] for c in saved_c), dys_c[i], dx_c[i], buffers[i], weights[i]
            ),
        )
        return (dx, None, None, None, None, *grads)


def run_parallel(
    experts: Sequence[nn.Module],
    xs: torch.Tensor,
    sizes: list[int],
    workers: int,
    plan: Schedule | None = None,
) -> torch.Tensor:
    """The experts on their contiguous slices of ``xs`` (sizes in expert order) on ``workers`` CPU workers,
    placed as ``plan`` says (default: :func:`schedule`'s)."""
    pool, plan = _pool(workers), plan or schedule(sizes, workers)
    experts = list(experts)
    if not torch.is_grad_enabled():
        return _forward(experts, xs, sizes, pool, plan)[0]
    params = [p for expert in experts for p in expert.parameters()]
    return _ExpertBank.apply(xs, sizes, experts, pool, plan, *params)
