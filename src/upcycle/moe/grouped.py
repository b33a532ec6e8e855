"""The grouped expert path: every expert of a projection in one grouped GEMM, no host synchronisation.

Shape legend: N assignments (token copies) sorted by expert, E experts, I/O a projection's input/output
width.

The rows are sorted by expert (``MoE._dispatch``); ``offs_E`` holds the cumulative row counts on the
device, so nothing reads a count on the host: one ``torch.nn.functional.grouped_mm`` per projection group
(gate and up together for SwiGLU) in the forward, two in the backward (input and weight gradients), as
torchtitan and Megatron-Core run their experts. The weights are the stacks of :class:`ExpertList`, which
the per-expert parameters are views into, so no weight is copied per step; :class:`_GroupedLinear` takes
the per-expert parameters as inputs only so that autograd hands each its gradient, a view into one
stacked gradient. Under autocast the experts run in the autocast dtype (rows and stacks cast as
``nn.Linear`` casts its weight); router and losses stay in float32 (upcycle.moe.router).

Where it runs fast: on CUDA, PyTorch's grouped kernel needs bfloat16 and an sm90/sm100 GPU; elsewhere
(other dtypes, other GPUs, the CPU) ``grouped_mm`` falls back to one GEMM per expert (on CUDA after
copying the offsets to the host). On CPU the expert bank (upcycle.moe.bank) is faster, so ``auto`` keeps
it there (upcycle.moe.paths). Under ``torch.compile`` the grouped GEMM goes through the custom op
``upcycle::grouped_mm`` unless it is bfloat16 on CUDA, because PyTorch's shape function for
``_grouped_mm`` accepts bfloat16 only.

The path is taken only where it computes what the module loop computes (:func:`usable`): our own expert
classes with plain ``nn.Linear`` projections still tied to their stacks, no hooks (PEFT adapters,
parametrizations and analysis hooks see the ordinary ``expert(x)`` calls), matching dtypes, and on CUDA
widths the grouped kernel accepts (multiples of 16 bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _hooks

from upcycle.moe.experts import ExpertList, GLUExpert, activation_fn


@torch.library.custom_op("upcycle::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (N, I) × (E, I, O) → (N, O)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (O, N) × (N, I) → (E, O, I)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm(a, b, offs=offs)``; traceable by ``torch.compile`` in every dtype."""
    if torch.compiler.is_compiling() and not (a.is_cuda and a.dtype == torch.bfloat16):
        return _grouped_mm_op(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)


class _GroupedLinear(torch.autograd.Function):
    """y = x·W_eᵀ + b_e on the rows of each expert e, with the stacked W (E, O, I) and b (E, O).

    ``params`` are the per-expert parameters whose storage the stacks are: saved for backward, so an
    in-place change between forward and backward raises as it does for ``nn.Linear``, and given their
    gradients as views into the stacked gradient (``layout``: kind, expert, r0, r1 per parameter).
    """

    @staticmethod
    def forward(ctx, x_NI, offs_E, expert_N, weight_EOI, bias_EO, layout, *params):
        y_NO = grouped_mm(x_NI, weight_EOI.transpose(1, 2), offs_E)
        if bias_EO is not None:
            y_NO = y_NO + bias_EO.index_select(0, expert_N)
        ctx.layout, ctx.shape = layout, (weight_EOI.shape[0], weight_EOI.shape[1])
        ctx.save_for_backward(x_NI, offs_E, expert_N, weight_EOI, *params)
        return y_NO

    @staticmethod
    def backward(ctx, dy_NO):
        x_NI, offs_E, expert_N, weight_EOI, *params = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        dx = grouped_mm(dy_NO, weight_EOI, offs_E) if ctx.needs_input_grad[0] else None
        needs = ctx.needs_input_grad[6:]
        stacked: dict[int, torch.Tensor] = {}
        wanted = {kind for (kind, *_), need in zip(ctx.layout, needs) if need}
        if 0 in wanted:
            # Σ over each expert's rows of dyᵀx; an expert without rows gets zeros.
            stacked[0] = grouped_mm(dy_NO.t(), x_NI, offs_E).to(params[0].dtype)
        if 1 in wanted:
            # Accumulated in float32 whatever the compute dtype, like the sum nn.Linear's backward does.
            db = torch.zeros(ctx.shape, dtype=torch.float32, device=dy_NO.device)
            stacked[1] = db.index_add_(0, expert_N, dy_NO.float()).to(params[-1].dtype)
        grads = [
            stacked[kind][e, r0:r1] if need else None for (kind, e, r0, r1), need in zip(ctx.layout, needs)
        ]
        return (dx, None, None, None, None, None, *grads)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def usable(experts: nn.Module, x: torch.Tensor) -> list[list[nn.Parameter]] | None:
    """The experts' parameters per stack if the grouped path computes what ``expert(x)`` calls would for
    these experts and rows, else None (run the module loop)."""
    if not isinstance(experts, ExpertList) or not experts.stacks or _global_hooks():
        return None
    weight = experts.stacks[0].weight
    dtype = compute_dtype(x)
    if x.device != weight.device or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        return None  # mixed dtypes: let the module calls raise PyTorch's usual error
    if x.is_cuda:
        # The CUDA kernel reads rows and weights in 16-byte aligned strides.
        size = torch.finfo(dtype).bits // 8
        if any(s.weight.shape[1] * size % 16 or s.weight.shape[2] * size % 16 for s in experts.stacks):
            return None
    return experts.grouped_parameters()


def _global_hooks() -> bool:
    return bool(
        _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks or _hooks._global_backward_hooks
    )


def _project(experts, index: int, x_NI, offs_E, expert_N, params) -> torch.Tensor:
    stack = experts.stacks[index]
    dtype = x_NI.dtype
    bias = None if stack.bias is None else stack.bias.to(dtype)
    layout = experts.gradient_layout(index)
    return _GroupedLinear.apply(x_NI, offs_E, expert_N, stack.weight.to(dtype), bias, layout, *params)


def run(experts, xs_ND: torch.Tensor, offs_E: torch.Tensor, expert_N: torch.Tensor, params) -> torch.Tensor:
    """The experts on their rows of ``xs_ND`` (sorted by expert; ``offs_E`` the cumulative row counts as
    int32, ``expert_N`` each row's expert), in the compute dtype; ``params`` from :func:`usable`."""
    first = experts[0]
    act = activation_fn(first.activation)
    x = xs_ND.to(compute_dtype(xs_ND))
    h = _project(experts, 0, x, offs_E, expert_N, params[0])
    if isinstance(first, GLUExpert):
        gate, up = h.chunk(2, dim=-1)
        a = act(gate) * up
    else:
        a = act(h)
    return _project(experts, 1, a, offs_E, expert_N, params[1])
