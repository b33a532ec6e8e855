"""Expert FFNs: the two dense MLP kinds we upcycle (GPT-2 style and Llama SwiGLU style).

Each expert is its own module with its own parameters. Stacking all experts into one (E, ...) tensor
and slicing ``w[e]`` inside a loop makes backward write a full-size zero gradient per expert (2-6x
slower, design notes); ``unbind`` once fixes that but still pays a stack of the gradients. Separate
parameters avoid both, and on CPU a loop over them beat ``torch.nn.functional.grouped_mm`` (see
benchmarks/moe_layer.py).

Besides ``forward`` (autograd), each expert has ``forward_into``/``backward_into``: the same maths
with the backward written out, used by :mod:`upcycle.moe.bank` to run experts on parallel CPU workers
(the autograd engine would run their backward nodes one at a time).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def activation_fn(name: str):
    """The activation as a fused PyTorch kernel.

    ``gelu_new`` (GPT-2) is the tanh approximation of GELU; ``F.gelu(approximate="tanh")`` computes the
    same formula in one kernel instead of Hugging Face's five element-wise ops (equal to float precision).
    """
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(F.gelu, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name in ("silu", "swish"):
        return F.silu
    if name == "relu":
        return F.relu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def _quick_gelu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(1.702 * h)
    return grad * (s + 1.702 * h * s * (1 - s))


#: d act(h)/dh · grad for each activation name of :func:`activation_fn`, as PyTorch's own backward
#: kernels where they exist (the ones autograd would run).
ACTIVATION_BACKWARD = {
    **dict.fromkeys(
        ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
        lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    ),
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    **dict.fromkeys(("silu", "swish"), torch.ops.aten.silu_backward),
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
    "quick_gelu": _quick_gelu_backward,
}


#: act(h) written into a caller-allocated ``out`` (same kernels as :func:`activation_fn`).
ACTIVATION_INTO = {
    **dict.fromkeys(
        ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
        lambda h, out: torch._C._nn.gelu(h, approximate="tanh", out=out),
    ),
    "gelu": lambda h, out: torch._C._nn.gelu(h, out=out),
    **dict.fromkeys(("silu", "swish"), lambda h, out: torch._C._nn.silu(h, out=out)),
    "relu": lambda h, out: torch.clamp_min(h, 0, out=out),
    "quick_gelu": lambda h, out: torch.mul(h, torch.sigmoid(1.702 * h), out=out),
}


def _linear_into(layer: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` written into ``out``."""
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def _linear_grads_into(layer: nn.Linear, name: str, x: torch.Tensor, dy: torch.Tensor, grads: dict) -> None:
    """Weight (dy^T x) and bias (Σ dy) gradients of ``layer`` into the buffers ``grads`` holds for them."""
    if f"{name}.weight" in grads:
        torch.mm(dy.t(), x, out=grads[f"{name}.weight"])
    if f"{name}.bias" in grads:
        torch.sum(dy, 0, out=grads[f"{name}.bias"])


class MLPExpert(nn.Module):
    """up_proj → activation → down_proj (GPT-2's c_fc → gelu_new → c_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation = activation
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))

    #: Intermediate tensors (N × intermediate_size each) the hand-written backward needs: the same ones
    #: autograd keeps for ``forward`` (pre-activation and activation), so memory matches the module path.
    num_saved = 2

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        """``y = self(x)`` without autograd, keeping the intermediates in ``saved``. The caller allocates
        every large tensor (:mod:`upcycle.moe.bank` allocates them on its own thread, so worker threads
        never grow glibc arenas of their own, which unmaps and page-faults them every step)."""
        h, a = saved
        _linear_into(self.up_proj, x, h)
        ACTIVATION_INTO[self.activation](h, a)
        _linear_into(self.down_proj, a, y)

    def backward_into(self, x, saved, dy, dx: torch.Tensor | None, grads: dict) -> None:
        """The backward of :meth:`forward_into`: dx (if given) and the gradients of the parameters whose
        names ``grads`` holds buffers for."""
        h, a = saved
        _linear_grads_into(self.down_proj, "down_proj", a, dy, grads)
        if dx is not None or "up_proj.weight" in grads or "up_proj.bias" in grads:
            dh = ACTIVATION_BACKWARD[self.activation](dy @ self.down_proj.weight, h)
            _linear_grads_into(self.up_proj, "up_proj", x, dh, grads)
            if dx is not None:
                torch.mm(dh, self.up_proj.weight, out=dx)

    @property
    def input_projections(self) -> list[nn.Linear]:
        return [self.up_proj]


class GLUExpert(nn.Module):
    """down_proj(act(gate_proj(x)) · up_proj(x)) (Llama/Mistral/Qwen2 SwiGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation = activation
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    #: gate and up projections, act(gate) and act(gate)·up: what autograd keeps for ``forward``.
    num_saved = 4

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        """As :meth:`MLPExpert.forward_into`."""
        g, u, s, a = saved
        _linear_into(self.gate_proj, x, g)
        _linear_into(self.up_proj, x, u)
        ACTIVATION_INTO[self.activation](g, s)
        torch.mul(s, u, out=a)
        _linear_into(self.down_proj, a, y)

    def backward_into(self, x, saved, dy, dx: torch.Tensor | None, grads: dict) -> None:
        """As :meth:`MLPExpert.backward_into`."""
        g, u, s, a = saved
        _linear_grads_into(self.down_proj, "down_proj", a, dy, grads)
        da = dy @ self.down_proj.weight
        du = da * s
        dg = ACTIVATION_BACKWARD[self.activation](da * u, g)
        _linear_grads_into(self.gate_proj, "gate_proj", x, dg, grads)
        _linear_grads_into(self.up_proj, "up_proj", x, du, grads)
        if dx is not None:
            torch.mm(dg, self.gate_proj.weight, out=dx)
            dx.addmm_(du, self.up_proj.weight)

    @property
    def input_projections(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]


def make_expert(expert_type: str, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
    cls = MLPExpert if expert_type == "mlp" else GLUExpert
    return cls(hidden_size, intermediate_size, activation, bias)
