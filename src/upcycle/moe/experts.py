"""Expert FFNs: the two dense MLP kinds we upcycle (GPT-2 style and Llama SwiGLU style), and the list
that stores the routed ones.

Each expert is its own module (checkpoint keys ``experts.<e>.up_proj.weight``, adapters and ``inspect``
see per-expert ``nn.Linear`` projections), but the routed experts' weights live in one stacked tensor per
projection group (:class:`ExpertList`): every parameter is a view into it. The grouped GEMM path
(:mod:`upcycle.moe.grouped`) multiplies by the stacks without copying anything; the module loop and the
CPU bank (:mod:`upcycle.moe.bank`) use the per-expert parameters as before. Slicing a stacked *parameter*
``w[e]`` inside a loop would make backward write a full-size zero gradient per expert (2-6x slower,
design notes); here the parameters are the per-expert leaves and nothing is sliced under autograd.

Besides ``forward`` (autograd), each expert has ``forward_into``/``backward_into``: the same maths
with the backward written out, used by :mod:`upcycle.moe.bank` to run experts on parallel CPU workers
(the autograd engine would run their backward nodes one at a time).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import NamedTuple

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


def _linear_grads_into(name: str, x: torch.Tensor, dy: torch.Tensor, grads: dict) -> None:
    """Weight (dy^T x) and bias (Σ dy) gradients of projection ``name`` into the buffers ``grads`` holds."""
    if f"{name}.weight" in grads:
        torch.mm(dy.t(), x, out=grads[f"{name}.weight"])
    if f"{name}.bias" in grads:
        torch.sum(dy, 0, out=grads[f"{name}.bias"])


class MLPExpert(nn.Module):
    """up_proj → activation → down_proj (GPT-2's c_fc → gelu_new → c_proj)."""

    #: Projections stacked together by :class:`ExpertList`, one grouped GEMM each.
    projection_groups = (("up_proj",), ("down_proj",))

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

    def backward_into(self, x, saved, dy, dx: torch.Tensor | None, grads: dict, weights: dict) -> None:
        """The backward of :meth:`forward_into`: dx (if given) and the gradients of the parameters whose
        names ``grads`` holds buffers for. ``weights`` holds the parameters as autograd saved them at the
        forward (so an in-place change in between raises, as it does for the module path)."""
        h, a = saved
        _linear_grads_into("down_proj", a, dy, grads)
        if dx is not None or "up_proj.weight" in grads or "up_proj.bias" in grads:
            dh = ACTIVATION_BACKWARD[self.activation](dy @ weights["down_proj.weight"], h)
            _linear_grads_into("up_proj", x, dh, grads)
            if dx is not None:
                torch.mm(dh, weights["up_proj.weight"], out=dx)

    @property
    def input_projections(self) -> list[nn.Linear]:
        return [self.up_proj]


class GLUExpert(nn.Module):
    """down_proj(act(gate_proj(x)) · up_proj(x)) (Llama/Mistral/Qwen2 SwiGLU)."""

    #: gate and up share one stack (E, 2F, D) and one GEMM, like Hugging Face Mixtral's ``gate_up_proj``.
    projection_groups = (("gate_proj", "up_proj"), ("down_proj",))

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

    def backward_into(self, x, saved, dy, dx: torch.Tensor | None, grads: dict, weights: dict) -> None:
        """As :meth:`MLPExpert.backward_into`."""
        g, u, s, a = saved
        _linear_grads_into("down_proj", a, dy, grads)
        da = dy @ weights["down_proj.weight"]
        du = da * s
        dg = ACTIVATION_BACKWARD[self.activation](da * u, g)
        _linear_grads_into("gate_proj", x, dg, grads)
        _linear_grads_into("up_proj", x, du, grads)
        if dx is not None:
            torch.mm(dg, weights["gate_proj.weight"], out=dx)
            dx.addmm_(du, weights["up_proj.weight"])

    @property
    def input_projections(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]


def make_expert(expert_type: str, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
    cls = MLPExpert if expert_type == "mlp" else GLUExpert
    return cls(hidden_size, intermediate_size, activation, bias)


class Stack(NamedTuple):
    """One projection group of all routed experts in one tensor."""

    weight: torch.Tensor
    """(E, Σ out, in): expert e's projections are rows ``[r0, r1)`` of ``weight[e]``."""
    bias: torch.Tensor | None
    """(E, Σ out), or None without biases."""
    rows: tuple[tuple[str, int, int], ...]
    """(projection name, r0, r1) of each projection of the group."""


class ExpertList(nn.ModuleList):
    """The routed experts, each its own module, their weights views into one stack per projection group.

    Why this layout (issue 16; docs/moe.md): a grouped GEMM needs all experts' weights of a projection in
    one (E, out, in) tensor. Stacked parameters would change the checkpoint keys (older versions could not
    load new checkpoints, Hugging Face loading would need a conversion), hide the per-expert ``nn.Linear``
    modules that PEFT adapters target and ``inspect`` shows, and make the module loop slice ``w[e]`` under
    autograd. Views keep all of that and cost no copy per step: each parameter is a view of the stack
    (``param.data = stack[e, r0:r1]``), so optimizers, in-place initialisation and ``load_state_dict``
    write into the stack, and the grouped path hands each parameter its gradient as a view of one stacked
    gradient.

    What can separate a parameter from its stack, and what re-ties it (one copy, never per step):
    ``.to()``/``.cuda()``/``.half()`` convert each parameter on its own (re-tied in ``_apply``);
    Hugging Face's ``from_pretrained`` and ``load_state_dict(assign=True)`` replace parameters (re-tied by
    the ``eval()`` that ends ``from_pretrained``, by a load hook, or by the next eager forward);
    ``deepcopy``/pickling copy each parameter (re-tied on unpickling). :meth:`tie` does it explicitly.
    A wrapper that rebinds parameter storage every step is left alone after one re-tie: the layer then runs
    the module loop. ``state_dict()`` hands out copies of the expert tensors, because savers that keep one
    tensor per shared storage (accelerate's safetensors path) would otherwise drop all experts but one;
    our models' ``save_pretrained`` instead moves the experts to storage of their own for the save
    (:func:`experts_in_own_storage`), so a conversion does not hold a second copy of every expert.
    """

    def __init__(self, experts=None):
        super().__init__(experts)
        self.stacks: list[Stack] = []
        self._tie: _Tie | None = None
        self._retied_last_forward = False
        self._left_untied = False
        self.register_state_dict_post_hook(_copy_expert_tensors)
        self.register_load_state_dict_post_hook(_retie_after_load)
        self.tie()

    # ------------------------------------------------------------------ tying
    @torch.no_grad()
    def tie(self) -> bool:
        """Copy every expert's parameters into fresh stacks and make them views of those; False (and no
        stacks) when the experts cannot share one: different types, shapes, dtypes or devices, adapters
        or tensor subclasses in place of plain ``nn.Linear`` weights, or sharded parameters."""
        self.stacks, self._tie, self._left_untied = [], None, False
        if not self._tieable():
            return False
        stacks = []
        for names in self[0].projection_groups:
            rows, r = [], 0
            for name in names:
                n = self[0]._modules[name].out_features
                rows.append((name, r, r + n))
                r += n
            weight = self._stack(names, "weight", r)
            bias = self._stack(names, "bias", r) if self[0]._modules[names[0]].bias is not None else None
            stacks.append(Stack(weight, bias, tuple(rows)))
        self.stacks = stacks
        self._tie = _Tie.of(self)
        return True

    def _tieable(self) -> bool:
        if not len(self) or type(self[0]) not in (MLPExpert, GLUExpert):
            return False
        ref = [(p.shape, p.dtype, p.device) for p in self[0].parameters()]
        for expert in self:
            if type(expert) is not type(self[0]):
                return False
            if any(type(m) is not nn.Linear for n, m in expert.named_children() if n.endswith("_proj")):
                return False
            params = list(expert.parameters())
            if [(p.shape, p.dtype, p.device) for p in params] != ref:
                return False
            # Tensor subclasses (DTensor) and parameters a sharding wrapper owns keep their own storage.
            if any(type(p.data) is not torch.Tensor or hasattr(p, "ds_id") or getattr(p, "_fsdp_flattened", False)
                   for p in params):  # fmt: skip
                return False
        return True

    def _stack(self, names: tuple[str, ...], kind: str, rows: int) -> torch.Tensor:
        ref = getattr(self[0]._modules[names[0]], kind)
        stack = torch.empty((len(self), rows, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
        for e, expert in enumerate(self):
            r = 0
            for name in names:
                p = getattr(expert._modules[name], kind)
                view = stack[e, r : r + p.shape[0]]
                view.copy_(p)
                p.data = view
                r += p.shape[0]
        return stack

    @torch.no_grad()
    def untie(self) -> None:
        """Give every expert parameter its own storage (one copy) and drop the stacks; :meth:`tie` undoes it.
        The stacks of this list are freed once its last parameter has moved, so untying a model list by
        list needs one list's weights of extra memory, where ``state_dict()`` copies all experts at once."""
        if not self.stacks:
            return
        for p in self.parameters():
            if _in_larger_storage(p.data):
                p.data = p.data.clone()
        self.stacks, self._tie = [], None

    def is_tied(self) -> bool:
        """Whether the experts are the modules tied last and every parameter is a view into its stack."""
        return (
            self._tie is not None and self._tie.modules_unchanged() and self._tie.parameters(True) is not None
        )

    def retie_if_needed(self) -> None:
        if not self.is_tied():
            self.tie()

    def gradient_layout(self, index: int) -> tuple[tuple[int, int, int, int], ...]:
        """For each parameter of stack ``index`` (order of :meth:`grouped_parameters`): (0 weight / 1 bias,
        expert, r0, r1), i.e. where its gradient lies in the stacked gradient."""
        return self._tie.layouts[index]

    def grouped_parameters(self) -> list[list[nn.Parameter]] | None:
        """For a grouped forward: per stack, its parameters as the modules hold them now (a replaced one must
        get the gradient), or None for the module loop: hooks on an expert, a projection that is no plain
        ``nn.Linear``, or parameters that cannot be tied. A replaced parameter or projection is re-tied
        once (a copy); if the tie breaks again right away, something rebinds parameter storage every step
        (a sharding wrapper) and this layer leaves the parameters to it."""
        tie = self._tie
        if tie is None or self._left_untied:
            return None
        compiling = torch.compiler.is_compiling()
        unchanged = tie.unchanged_and_unhooked()
        if not unchanged and tie.hooked():
            return None
        if unchanged:
            # Storage addresses cannot be read while torch.compile traces: the tie made in eager mode
            # (construction, .to(), loading, eval()/train()) is assumed.
            params = tie.parameters(check_storage=not compiling)
            if params is not None:
                self._retied_last_forward = False
                return params
        if compiling:
            return None
        if self._retied_last_forward:
            warnings.warn(
                "routed experts: parameters were moved out of their stacked storage again right after being "
                "re-tied; this layer runs its experts one after another from now on (ExpertList.tie() re-enables "
                "the grouped path)",
                stacklevel=3,
            )
            self._left_untied = True
            return None
        self._retied_last_forward = True
        return self._tie.parameters(check_storage=False) if self.tie() and not self._tie.hooked() else None

    # ------------------------------------------------------------------ module protocol
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.retie_if_needed()  # conversions (.to(), .half()) make a new tensor per parameter
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        # from_pretrained replaces every parameter, then calls eval(): re-tie there, before any forward.
        self.retie_if_needed()
        return self

    def __getstate__(self):
        return {**self.__dict__, "stacks": [], "_tie": None, "_untied_copy": bool(self.stacks)}

    def __setstate__(self, state):
        untied = state.pop("_untied_copy", False)
        super().__setstate__(state)
        if untied:  # deepcopy and unpickling copy each parameter on its own
            self.tie()


class _Tie:
    """What :meth:`ExpertList.tie` built, laid out for the checks that run on every grouped forward, for
    every expert: flat tuples of the modules' own dicts."""

    def __init__(self, owners, slots, layouts):
        self.owners = owners
        """(parent's ``_modules``, key, module) for every expert and projection: replacements are noticed."""
        self.slots = slots
        """Per stack: ((weight, bias) tensors, ((module's ``_parameters``, 'weight'/'bias', 0/1, byte offset),
        ...)), the parameters in gradient order."""
        self.layouts = layouts
        """Per stack, per parameter: (0 weight / 1 bias, expert, r0, r1)."""

    @classmethod
    def of(cls, experts: ExpertList) -> _Tie:
        owners, slots, layouts = [], [], []
        for key, expert in experts._modules.items():
            owners.append((experts._modules, key, expert))
            owners.extend((expert._modules, name, m) for name, m in expert._modules.items())
        for stack in experts.stacks:
            entries, layout = [], []
            for k, (kind, tensor) in enumerate((("weight", stack.weight), ("bias", stack.bias))):
                if tensor is None:
                    continue
                for e, expert in enumerate(experts):
                    for name, r0, r1 in stack.rows:
                        offset = (e * tensor.stride(0) + r0 * tensor.stride(1)) * tensor.element_size()
                        entries.append((expert._modules[name]._parameters, kind, k, offset))
                        layout.append((k, e, r0, r1))
            slots.append(((stack.weight, stack.bias), tuple(entries)))
            layouts.append(tuple(layout))
        return cls(tuple(owners), tuple(slots), tuple(layouts))

    def modules_unchanged(self) -> bool:
        return all(modules.get(key) is m for modules, key, m in self.owners)

    def unchanged_and_unhooked(self) -> bool:
        """:meth:`modules_unchanged` and not :meth:`hooked`, in one pass (the common case)."""
        return all(
            modules.get(key) is m
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
            for modules, key, m in self.owners
        )

    def hooked(self) -> bool:
        return any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            for _, _, m in self.owners
        )

    def parameters(self, check_storage: bool) -> list[list[nn.Parameter]] | None:
        """Per stack, its parameters; None if ``check_storage`` finds one that is not a view into it."""
        out = []
        for tensors, entries in self.slots:
            params = [d.get(kind) for d, kind, _, _ in entries]
            if check_storage:
                bases = [0 if t is None else t.data_ptr() for t in tensors]
                if any(
                    p is None or p.data_ptr() - bases[k] != off for p, (_, _, k, off) in zip(params, entries)
                ):
                    return None
            out.append(params)
        return out


@contextmanager
def experts_in_own_storage(model: nn.Module):
    """Within the block, every :class:`ExpertList` of ``model`` keeps its parameters in their own storage;
    they are stacked again on exit. Savers see tensors that share no storage, so ``state_dict()`` has
    nothing to copy: saving a converted GPT-2 (8 experts in 6 layers) this way peaks one layer's experts
    above the model instead of all of them (benchmarks/convert.py)."""
    lists = [m for m in model.modules() if isinstance(m, ExpertList) and m.stacks]
    left_untied = [m._left_untied for m in lists]
    for m in lists:
        m.untie()
    try:
        yield model
    finally:
        for m, flag in zip(lists, left_untied):
            m.tie()
            m._left_untied = flag


def _retie_after_load(module: ExpertList, incompatible_keys) -> None:
    module.retie_if_needed()  # load_state_dict(assign=True) replaces parameters


def _copy_expert_tensors(module: ExpertList, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() of the experts: a copy of every tensor that is a view into a larger storage (a stack,
    also one left behind when an adapter replaced a projection), so no two entries share storage.
    Parameters (``keep_vars=True``) are left as they are."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and not isinstance(value, nn.Parameter) and _in_larger_storage(value):
            state_dict[key] = value.clone()


def _in_larger_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()
