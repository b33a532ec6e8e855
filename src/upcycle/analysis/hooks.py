"""Reading routing decisions through forward hooks on a model's MoE layers, without editing model code.

After every call an :class:`~upcycle.moe.MoE` layer holds ``last_routing`` (``ids_TK``: the chosen experts
of each of its T = B·S tokens, best first; global-routing followers hold their leader's decision, which
they reused). A forward hook on each MoE module adds those choices to a per-layer groups × experts count
matrix, for every top-k choice and separately for the top-1 choice, weighting each token by its
attention-mask value so padding counts for nothing. The mask is the one the layer itself uses: an
``attention_mask=`` argument of the call, else the model's :class:`~upcycle.moe.MoEContext` (set around
the model's forward), cut to the layer's last S positions as the layer does.

Counts are the router's choices, before any capacity limit drops assignments (a dropped token was still
routed there). They accumulate on the routing's device with no host synchronisation per call; the hooks
sit on the MoE modules only (not on the experts and not global), so they do not change which expert
implementation the layer runs (:mod:`upcycle.moe.bank`).

Shape legend: B batch, S sequence, T = B·S tokens, K top-k, G groups, E experts, L MoE layers.
"""

from __future__ import annotations

import torch


class RoutingCounter:
    """Count routing decisions per MoE layer and per group of the rows of each batch.

    Use as a context manager around forward passes; call :meth:`set_groups` with each batch's group index
    per row before its forward pass::

        with RoutingCounter(moe_layers, num_groups=3) as counter:
            for ids, mask, group_B in batches:
                counter.set_groups(group_B)
                model(input_ids=ids, attention_mask=mask)
        counter.topk[layer]  # (G, E) float64 counts of every top-k choice
    """

    def __init__(self, moe_layers: dict, num_groups: int):
        if not moe_layers:
            raise ValueError("no MoE layers to count")
        self.layers = dict(sorted(moe_layers.items()))
        self.num_groups = num_groups
        self.num_experts = {i: m.config.num_experts for i, m in self.layers.items()}
        self.topk: dict[int, torch.Tensor] = {}
        self.top1: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self._group_B: torch.Tensor | None = None
        self._handles: list = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RoutingCounter:
        for index, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_groups(self, group_B: torch.Tensor | list[int]) -> None:
        """Group index of every row of the next batch."""
        self._group_B = torch.as_tensor(group_B, dtype=torch.long)

    # ------------------------------------------------------------------ counting
    def _hook(self, index: int):
        def hook(module, args, kwargs, output) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._count(index, module, hidden.shape, kwargs.get("attention_mask"))

        return hook

    @staticmethod
    def _mask_T(module, shape: torch.Size, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if attention_mask is None and module.context is not None:
            attention_mask = module.context.attention_mask
        if attention_mask is None:
            return None
        S = shape[1] if len(shape) == 3 else shape[0]
        # As the layer does: with a cache the mask covers past + current tokens; ours are the last S.
        return attention_mask[:, -S:].reshape(-1).to(torch.float64)

    def _groups_on(self, device: torch.device) -> torch.Tensor:
        if self._group_B is None:
            raise RuntimeError("RoutingCounter.set_groups() must be called before each forward pass")
        if self._group_B.device != device:
            self._group_B = self._group_B.to(device)  # once per batch, not once per layer
        return self._group_B

    def _accumulators(self, index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        if index not in self.topk:
            G, E = self.num_groups, self.num_experts[index]
            self.topk[index] = torch.zeros(G, E, dtype=torch.float64, device=device)
            self.top1[index] = torch.zeros(G, E, dtype=torch.float64, device=device)
            self.tokens[index] = torch.zeros(G, dtype=torch.float64, device=device)
        return self.topk[index], self.top1[index], self.tokens[index]

    @torch.no_grad()
    def _count(self, index: int, module, shape: torch.Size, attention_mask: torch.Tensor | None) -> None:
        ids_TK = module.last_routing.ids_TK
        T, K = ids_TK.shape
        device = ids_TK.device
        B = shape[0] if len(shape) == 3 else 1
        group_T = self._groups_on(device).repeat_interleave(T // B)
        mask_T = self._mask_T(module, shape, attention_mask)
        weight_T = (
            mask_T.to(device) if mask_T is not None else torch.ones(T, dtype=torch.float64, device=device)
        )
        topk, top1, tokens = self._accumulators(index, device)
        # Flat (group, expert) cells of the (G, E) matrices. index_add_ rather than bincount: bincount reads
        # the largest index back to the host to size its output, a device synchronisation per call.
        cell_TK = group_T.unsqueeze(1) * self.num_experts[index] + ids_TK
        topk.view(-1).index_add_(0, cell_TK.reshape(-1), weight_T.repeat_interleave(K))
        top1.view(-1).index_add_(0, cell_TK[:, 0], weight_T)
        tokens.index_add_(0, group_T, weight_T)

    def result(self) -> dict[int, dict[str, list]]:
        """{layer: {'topk': G×E ints, 'top1': G×E ints, 'tokens': G ints}} (layers that ran)."""
        out = {}
        for index in self.topk:
            out[index] = {
                "topk": self.topk[index].round().long().cpu().tolist(),
                "top1": self.top1[index].round().long().cpu().tolist(),
                "tokens": self.tokens[index].round().long().cpu().tolist(),
            }
        return out


__all__ = ["RoutingCounter"]
