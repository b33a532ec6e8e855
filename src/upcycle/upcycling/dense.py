"""Dense MLP weights in one layout, whatever the source family, and copying them into experts.

Our experts use ``nn.Linear`` (weight shape (out, in)). GPT-2 stores its MLP as ``Conv1D`` with weight
shape (in, out), so its ``c_fc``/``c_proj`` are transposed on the way in; Llama-family MLPs are already
``nn.Linear``. Every method reads a :class:`DenseMLP` and never the source module directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from upcycle.moe.experts import GLUExpert, MLPExpert


@dataclass
class DenseMLP:
    """One dense MLP: input projection(s) (F, D), output projection (D, F), optional biases."""

    kind: str  # "mlp" (up → act → down) or "glu" (act(gate)·up → down)
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    def input_names(self) -> list[str]:
        return ["gate", "up"] if self.kind == "glu" else ["up"]

    @classmethod
    def from_module(cls, mlp: nn.Module) -> DenseMLP:
        """Read a GPT-2 ``GPT2MLP`` or a Llama-style ``gate_proj/up_proj/down_proj`` MLP."""
        if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
            # Transpose once here: every expert then copies contiguous memory (8 strided copies of a
            # transposed view cost GPT-2-small's conversion over a second).
            return cls(
                kind="mlp",
                up=mlp.c_fc.weight.detach().t().contiguous(),
                up_bias=_detach(mlp.c_fc.bias),
                down=mlp.c_proj.weight.detach().t().contiguous(),
                down_bias=_detach(mlp.c_proj.bias),
            )
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return cls(
                kind="glu",
                gate=mlp.gate_proj.weight.detach(),
                gate_bias=_detach(mlp.gate_proj.bias),
                up=mlp.up_proj.weight.detach(),
                up_bias=_detach(mlp.up_proj.bias),
                down=mlp.down_proj.weight.detach(),
                down_bias=_detach(mlp.down_proj.bias),
            )
        raise TypeError(
            f"unsupported MLP module {type(mlp).__name__}: expected GPT-2's c_fc/c_proj or gate/up/down"
        )

    @staticmethod
    def average(mlps: list[DenseMLP]) -> DenseMLP:
        """Element-wise mean of MLPs of identical shapes (Branch-Train-MiX's merge of non-expert weights)."""

        def mean(name):
            ts = [getattr(m, name) for m in mlps]
            return None if ts[0] is None else torch.stack([t.float() for t in ts]).mean(0).to(ts[0].dtype)

        return DenseMLP(
            kind=mlps[0].kind,
            **{n: mean(n) for n in ("up", "down", "gate", "up_bias", "gate_bias", "down_bias")},
        )


def _detach(t):
    return None if t is None else t.detach()


def expert_inputs(expert: nn.Module) -> dict[str, nn.Linear]:
    """{'gate': …, 'up': …} input projections of an expert, keyed like :class:`DenseMLP`."""
    if isinstance(expert, GLUExpert):
        return {"gate": expert.gate_proj, "up": expert.up_proj}
    if isinstance(expert, MLPExpert):
        return {"up": expert.up_proj}
    raise TypeError(f"not an expert: {type(expert).__name__}")


@torch.no_grad()
def copy_into_expert(
    expert: nn.Module,
    dense: DenseMLP,
    units: torch.Tensor | slice | None = None,
    out_scale: float = 1.0,
    out_bias_scale: float | None = None,
) -> None:
    """Copy the dense MLP (or the intermediate ``units`` of it) into ``expert``.

    ``out_scale`` multiplies the output projection (weight and bias): the only place a scale is exact for
    any activation. ``out_bias_scale`` overrides the bias factor (a shard of G carries 1/G of the bias).
    """
    sel = slice(None) if units is None else units
    for name, layer in expert_inputs(expert).items():
        layer.weight.copy_(getattr(dense, name)[sel])
        bias = getattr(dense, f"{name}_bias")
        if layer.bias is not None:
            layer.bias.copy_(bias[sel] if bias is not None else torch.zeros_like(layer.bias))
    expert.down_proj.weight.copy_(dense.down[:, sel] * out_scale)
    if expert.down_proj.bias is not None:
        b = dense.down_bias if dense.down_bias is not None else torch.zeros_like(expert.down_proj.bias)
        expert.down_proj.bias.copy_(b * (out_scale if out_bias_scale is None else out_bias_scale))


def check_expert_shape(expert: nn.Module, dense: DenseMLP, intermediate: int) -> None:
    if expert.down_proj.weight.shape != (dense.hidden_size, intermediate):
        raise ValueError(
            f"expert shape {tuple(expert.down_proj.weight.shape)} does not match the dense MLP "
            f"(hidden {dense.hidden_size}, intermediate {intermediate})"
        )
