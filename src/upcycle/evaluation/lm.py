"""Language-modelling evaluation: loss, perplexity and next-token accuracy on held-out token blocks.

Used by ``upcycle pretrain`` every ``--eval-every`` steps (C4 validation by default) and reusable on its
own. The loss is the language-modelling cross-entropy only (no MoE auxiliary losses), averaged over every
predicted token (token-weighted, so batches of different sizes combine correctly); perplexity is its
exponential; accuracy is the fraction of positions whose argmax prediction is the next token (the
founding report's "accuracy 38.23 %" on C4).

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from upcycle.moe.stats import RouterStats

IGNORE_INDEX = -100


@dataclass
class LMEvalResult:
    """Held-out language-modelling figures, plus per-MoE-layer routing on the evaluated tokens."""

    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    batches: int
    routing: dict[int, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["routing"] = {str(k): v for k, v in self.routing.items()}
        return out


@torch.no_grad()
def next_token_counts(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) next-token predictions: position t predicts label t+1 (HF's causal shift)."""
    pred_BS = logits_BSV[:, :-1].argmax(-1)
    target_BS = labels_BS[:, 1:]
    valid_BS = target_BS != ignore_index
    return ((pred_BS == target_BS) & valid_BS).sum(), valid_BS.sum()


def summed_lm_loss(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum over predicted tokens of the next-token cross-entropy, in float32."""
    V = logits_BSV.shape[-1]
    return F.cross_entropy(
        logits_BSV[:, :-1].reshape(-1, V).float(),
        labels_BS[:, 1:].reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def moe_layers_of(model) -> dict:
    """{layer index: MoE} of an MoE model (unwrapping DDP/FSDP wrappers); {} for a dense model."""
    inner = getattr(model, "module", model)
    fn = getattr(inner, "moe_layers", None)
    return fn() if callable(fn) else {}


@contextlib.contextmanager
def isolated_routing_stats(model) -> Iterator[dict[int, RouterStats]]:
    """Count routing separately inside the block and restore the counts from before it afterwards,
    so an evaluation in the middle of a training log interval does not mix into the training figures.
    Yields {layer index: RouterStats} holding the block's counts after it ends."""
    layers = moe_layers_of(model)
    saved = {i: (m.stats.tokens_per_expert, m.stats.dropped, m.stats.tokens) for i, m in layers.items()}
    inside: dict[int, RouterStats] = {}
    for m in layers.values():
        m.stats.reset()
    try:
        yield inside
    finally:
        for i, m in layers.items():
            captured = RouterStats(m.stats.num_experts)
            captured.tokens_per_expert, captured.dropped, captured.tokens = (
                m.stats.tokens_per_expert,
                m.stats.dropped,
                m.stats.tokens,
            )
            inside[i] = captured
            m.stats.tokens_per_expert, m.stats.dropped, m.stats.tokens = saved[i]


def routing_summary(stats: dict[int, RouterStats], reduce=None) -> dict[int, dict]:
    """Per-layer routing summaries; ``reduce(tensor) -> tensor`` sums counts across processes first."""
    if not stats:
        return {}
    order = sorted(stats)
    counts_LE = torch.stack([stats[i].tokens_per_expert for i in order])
    extra_L2 = torch.stack(
        [torch.stack([stats[i].dropped.reshape(()), stats[i].tokens.reshape(())]) for i in order]
    )
    if reduce is not None:
        counts_LE, extra_L2 = reduce(counts_LE), reduce(extra_L2)
    out = {}
    for row, i in enumerate(order):
        s = RouterStats(counts_LE.shape[1])
        s.update(counts_LE[row].cpu(), extra_L2[row, 0].cpu(), extra_L2[row, 1].cpu())
        out[i] = s.summary()
    return out


@torch.no_grad()
def evaluate_lm(
    model,
    batches: Iterable[torch.Tensor | dict],
    *,
    device: torch.device | str | None = None,
    reduce=None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> LMEvalResult:
    """Loss, perplexity and next-token accuracy of a causal LM over ``batches``.

    Each batch is a (B, S) tensor of token ids (labels = inputs) or a dict with ``input_ids`` and optional
    ``labels`` / ``attention_mask``. A batch given as ``(ids, weight)`` with weight 0 runs the forward
    pass but is not counted (lets every process of a distributed run make the same number of calls).
    ``reduce(tensor) -> tensor`` sums per-process figures (e.g. ``lambda t: accelerator.reduce(t, "sum")``).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, counted
    n_batches = 0
    try:
        with isolated_routing_stats(model) as routing:
            for item in batches:
                weight = 1.0
                if isinstance(item, tuple):
                    item, weight = item
                batch = item if isinstance(item, dict) else {"input_ids": item}
                ids_BS = batch["input_ids"].to(device)
                labels_BS = batch.get("labels", ids_BS).to(device)
                mask = batch.get("attention_mask")
                if mask is not None:
                    mask = mask.to(device)
                    labels_BS = labels_BS.masked_fill(mask == 0, IGNORE_INDEX)
                # A padding call (weight 0) must not count in the routing statistics either.
                uncounted = isolated_routing_stats(model) if not weight else contextlib.nullcontext()
                with uncounted, autocast if autocast is not None else contextlib.nullcontext():
                    logits_BSV = model(input_ids=ids_BS, attention_mask=mask).logits
                if weight:
                    correct, counted = next_token_counts(logits_BSV, labels_BS)
                    totals += torch.stack(
                        [summed_lm_loss(logits_BSV, labels_BS).double(), correct.double(), counted.double()]
                    )
                    n_batches += 1
        if reduce is not None:
            totals = reduce(totals)
            n_batches = int(reduce(torch.tensor([n_batches], device=device)).item())
        loss_sum, correct, counted = totals.tolist()
        summary = routing_summary(routing, reduce)
    finally:
        model.train(was_training)
    loss = loss_sum / counted if counted else float("nan")
    return LMEvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        accuracy=correct / counted if counted else float("nan"),
        tokens=int(counted),
        batches=n_batches,
        routing=summary,
    )


__all__ = [
    "IGNORE_INDEX",
    "LMEvalResult",
    "evaluate_lm",
    "isolated_routing_stats",
    "moe_layers_of",
    "next_token_counts",
    "routing_summary",
    "summed_lm_loss",
]
