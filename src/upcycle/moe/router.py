"""Routers and scoring: from hidden states to (expert ids, combine weights) per routing unit.

Shape legend (torchtitan style): B batch, S sequence, T = B·S tokens, U routing units (T for token
routing, B for sequence routing), D hidden, H router hidden, E experts, K top-k.

All router maths runs in float32 whatever the model dtype: softmax over bf16 logits loses the small
differences that decide top-k, and the auxiliary losses are sums of many small terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.moe.config import MoEConfig


@dataclass
class Routing:
    """A routing decision for T tokens (already expanded from sequences when routing per sequence)."""

    ids_TK: torch.Tensor
    """Chosen experts per token (long)."""
    weights_TK: torch.Tensor
    """Combine weight of each chosen expert (float32)."""
    logits_UE: torch.Tensor | None = None
    """Router logits per routing unit (float32), None for fixed routing."""
    probs_UE: torch.Tensor | None = None
    """Softmax over all experts per routing unit (float32), None for fixed routing."""
    ids_UK: torch.Tensor | None = None
    """Chosen experts per routing unit."""
    gates_UE: torch.Tensor | None = None
    """Sparse combine weights per routing unit (zeros outside the top k), for the importance loss."""
    unit: str = "token"


def init_router_weight(
    weight: torch.Tensor, spec: tuple[str, float], generator: torch.Generator | None = None
) -> None:
    """Fill a router weight per ``spec`` (from :func:`parse_router_init`). Uses ``torch.nn.init`` so that
    Hugging Face's ``no_init_weights`` can skip it when weights are about to be loaded."""
    kind, scale = spec
    if kind == "normal":
        nn.init.normal_(weight, 0.0, scale, generator=generator)
    elif kind == "uniform":
        nn.init.uniform_(weight, -scale, scale, generator=generator)
    else:
        nn.init.zeros_(weight)


def score(logits_UE: torch.Tensor, top_k: int, score_order: str, renormalize: bool):
    """Turn float32 logits into (probs_UE, weights_UK, ids_UK).

    softmax_topk: p = softmax(logits); keep the k largest p (optionally renormalised to sum 1).
    topk_softmax: keep the k largest logits; softmax over those k only.
    ``probs_UE`` is always the full softmax (what the load-balancing loss averages).
    """
    probs_UE = torch.softmax(logits_UE, dim=-1)
    if score_order == "softmax_topk":
        weights_UK, ids_UK = torch.topk(probs_UE, top_k, dim=-1)
        if renormalize:
            weights_UK = weights_UK / weights_UK.sum(dim=-1, keepdim=True)
    else:
        top_logits_UK, ids_UK = torch.topk(logits_UE, top_k, dim=-1)
        weights_UK = torch.softmax(top_logits_UK, dim=-1)
    return probs_UE, weights_UK, ids_UK


class Router(nn.Module):
    """Linear (E×D) or 2-layer MLP (D→H→E) router, with optional noisy-gating weights.

    ``weight`` is always the matrix that produces the logits, so a linear router's ``weight`` has the
    same layout as Hugging Face Mixtral's ``gate.weight``.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        D, E = config.hidden_size, config.num_experts
        self.hidden: nn.Linear | None = None
        in_features = D
        if config.router_type == "mlp":
            H = config.router_hidden_size or D
            self.hidden = nn.Linear(D, H, bias=config.router_bias)
            in_features = H
        self.weight = nn.Parameter(torch.empty(E, in_features))
        self.bias = nn.Parameter(torch.zeros(E)) if config.router_bias else None
        # Shazeer et al. (2017) initialise W_noise to zero: noise starts at softplus(0)·N(0,1).
        self.noise_weight = nn.Parameter(torch.zeros(E, D)) if config.noisy_gating else None
        self.reset_parameters()
        if config.router_mode in ("frozen", "random"):
            for p in self.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        spec = self.config.router_init_spec
        init_router_weight(self.weight, spec, generator)
        if self.hidden is not None:
            init_router_weight(self.hidden.weight, spec, generator)
            if self.hidden.bias is not None:
                nn.init.zeros_(self.hidden.bias)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """float32 logits (T, E). Jitter and noise are applied here, in training only."""
        if torch.is_autocast_enabled(x_TD.device.type):
            # Autocast would run the linears below in bf16/fp16: router maths stays float32 (see above).
            with torch.autocast(x_TD.device.type, enabled=False):
                return self.forward(x_TD)
        cfg = self.config
        if cfg.router_mode == "random":
            # Fan et al. (2024) "Random" routing: fresh router weights at every call.
            self.reset_parameters()
        x = x_TD.float()
        if self.training and cfg.router_jitter > 0:
            # Multiplicative jitter on the router input only: the experts still see the clean x
            # (Hugging Face Mixtral jitters hidden_states in place, changing what experts see).
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        h = x
        if self.hidden is not None:
            h = F.relu(F.linear(h, self.hidden.weight.float(), _float(self.hidden.bias)))
        logits = F.linear(h, self.weight.float(), _float(self.bias))
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x, self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
