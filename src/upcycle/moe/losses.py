"""Auxiliary router losses, computed per layer on routing units (tokens or sequences).

Legend: U routing units (tokens, or sequences with sequence-level routing), E experts, K top-k.
``mask_U`` is 1.0 for units that count (non-padding) and 0.0 for padding; ``None`` means all count.
Everything here runs in float32: these are small E-sized reductions whose precision matters more
than their cost.
"""

from __future__ import annotations

import torch


def _masked_mean(x_U: torch.Tensor, mask_U: torch.Tensor | None) -> torch.Tensor:
    if mask_U is None:
        return x_U.mean(0)
    denom = mask_U.sum().clamp_min(1.0)
    return (x_U * mask_U.view(-1, *([1] * (x_U.dim() - 1)))).sum(0) / denom


def load_balancing_loss(
    probs_UE: torch.Tensor, ids_UK: torch.Tensor, mask_U: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss  E · Σ_e f_e · P_e  for one layer.

    f_e is the fraction of the U·K assignments that chose expert e (so Σ f = 1 for any K) and P_e the
    mean router probability of e. Perfectly balanced routing (f = P = 1/E) gives exactly 1.0, whatever
    E and K. Hugging Face's ``load_balancing_loss_func`` normalises f per token instead (Σ f = K) and
    pools all layers before the product, so its single-layer value is K times ours, and its pooled value
    lets imbalance in one layer cancel another; we compute per layer and let the model average.
    """
    E = probs_UE.shape[-1]
    K = ids_UK.shape[-1]
    one_hot_UE = torch.zeros_like(probs_UE).scatter_add_(
        1, ids_UK, torch.ones_like(ids_UK, dtype=probs_UE.dtype)
    )
    f_E = _masked_mean(one_hot_UE, mask_U) / K
    P_E = _masked_mean(probs_UE, mask_U)
    return E * torch.sum(f_E.detach() * P_E)


def importance_loss(gates_UE: torch.Tensor, mask_U: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer et al. (2017) importance loss: CV² of the per-expert sums of (sparse) gate values.

    Population variance over experts divided by the squared mean (tensor2tensor's ``cv_squared``);
    0 when every expert receives the same total gate weight.
    """
    if mask_U is not None:
        gates_UE = gates_UE * mask_U.unsqueeze(-1)
    importance_E = gates_UE.sum(0)
    if importance_E.numel() <= 1:
        return importance_E.new_zeros(())
    return importance_E.var(unbiased=False) / (importance_E.mean() ** 2 + 1e-10)


def z_loss(logits_UE: torch.Tensor, mask_U: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over units of logsumexp(logits)²."""
    return _masked_mean(torch.logsumexp(logits_UE, dim=-1) ** 2, mask_U)


def equivalent_aux_loss_weights(weight: float, num_layers: int, top_k: int) -> dict[str, float]:
    """The weights that give the same load-balancing gradient as ``weight`` under other conventions.

    Ours: ``weight · mean over the L MoE layers that route`` of a per-layer loss that is 1.0 when balanced.
    Switch Transformer and Megatron-LM add ``α · loss`` per layer (a sum over layers) with the same
    per-layer normalisation, so α = weight / L. Hugging Face's ``router_aux_loss_coef`` multiplies a value
    k times ours (its per-token f sums to k), so coef = weight / k (its pooling of all layers before the
    product is not the mean of per-layer products, but balanced routing gives k for both).
    """
    return {"per_layer_sum": weight / max(num_layers, 1), "hugging_face": weight / top_k}
