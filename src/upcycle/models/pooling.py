"""Sequence-classification logits of decoder-only models, pooled at the last real token of every row.

Hugging Face's decoder classifiers (``GPT2ForSequenceClassification`` and the generic classifier of
Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE, and our MoE types built on them) apply their ``score`` head
at every position and then pick, per row, the rightmost token that is not ``pad_token_id``. With GPT-2
there is no pad token, so pad = EOS; a row whose last real token is an EOS (a single text ending in
EOS, an empty second segment) is then classified at the token *before* it, and left padding shifts the
position ids the model saw in pretraining (transformers issues #35352, #35909).

:func:`sequence_logits` runs the model's own forward unchanged (so MoE layers still get the attention
mask and report their auxiliary losses) and reads the head's per-position output through a forward hook,
pooling it at :func:`upcycle.data.xnli.last_token_index` of the attention mask; position ids follow the
mask, so a row gives the same logits with padding on either side as alone. The engine
(``upcycle finetune``) and any evaluation call this one function, so training and evaluation classify
the same position, for MoE and dense models alike.

Shape legend: B batch, S sequence, C classes.
"""

from __future__ import annotations

import torch

from upcycle.data.xnli import last_token_index


def classification_head(model) -> torch.nn.Module | None:
    """The per-position ``score`` head of a decoder classifier (DDP/compile wrappers unwrapped), or None."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    head = getattr(inner, "score", None)
    return head if isinstance(head, torch.nn.Module) else None


def position_ids_from_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over each row's real tokens (padding on the left starts the count at its first real
    token; pad positions get 0)."""
    return (attention_mask_BS.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logits(model, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, **kwargs):
    """(logits_BC at the last real token of each row, the model's output).

    ``kwargs`` go to the model's forward (not ``labels``: the caller computes the loss from these
    logits). A model without a per-position ``score`` head (an encoder classifier pooling its first
    token) keeps its own pooling.
    """
    head = classification_head(model)
    if head is None:
        _check_own_pooling(model, input_ids_BS, attention_mask_BS)
        out = model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, **kwargs)
        return out.logits, out
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        out = model(
            input_ids=input_ids_BS,
            attention_mask=attention_mask_BS,
            position_ids=position_ids_from_mask(attention_mask_BS),
            **kwargs,
        )
    finally:
        handle.remove()
    per_position_BSC = captured[-1]
    last_B = last_token_index(attention_mask_BS).to(per_position_BSC.device)
    rows_B = torch.arange(per_position_BSC.shape[0], device=per_position_BSC.device)
    return per_position_BSC[rows_B, last_B], out


def _check_own_pooling(model, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> None:
    """A model without a per-position head pools by itself; HF's decoder heads find the last token that
    is not the pad id, which is wrong when a row ends with that id: refuse rather than misclassify."""
    from upcycle.config import UserError

    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None or getattr(model.config, "is_encoder_decoder", False):
        return
    last_B = last_token_index(attention_mask_BS).clamp(min=0)
    ends_B = input_ids_BS.gather(1, last_B.unsqueeze(1)).squeeze(1)
    if bool((ends_B == pad).any()):
        raise UserError(
            f"{type(model).__name__} has no per-position 'score' head and an example ends with the pad "
            f"token (id {pad}), so its own pooling would classify the wrong token"
        )


__all__ = ["classification_head", "position_ids_from_mask", "sequence_logits"]
