"""Expert FFNs: the two dense MLP kinds we upcycle (GPT-2 style and Llama SwiGLU style).

Each expert is its own module with its own parameters. Stacking all experts into one (E, ...) tensor
and slicing ``w[e]`` inside a loop makes backward write a full-size zero gradient per expert (2-6x
slower, design notes); ``unbind`` once fixes that but still pays a stack of the gradients. Separate
parameters avoid both, and on CPU a loop over them beat ``torch.nn.functional.grouped_mm`` (see
benchmarks/moe_layer.py).
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


class MLPExpert(nn.Module):
    """up_proj → activation → down_proj (GPT-2's c_fc → gelu_new → c_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))

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
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @property
    def input_projections(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]


def make_expert(expert_type: str, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
    cls = MLPExpert if expert_type == "mlp" else GLUExpert
    return cls(hidden_size, intermediate_size, activation, bias)
