"""Sequence classifiers of every MoE family build, save and load through the Auto classes (Llama-family
heads build their body with ``AutoModel.from_config``, so the MoE configs must be known there too)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import upcycle  # noqa: F401
from upcycle.models import FAMILIES


def _config(family):
    moe = {"intermediate_size": 64, "num_experts": 4, "top_k": 2, "expert_type": family.expert_type}
    if family.name == "gpt2":
        dense = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    else:
        dense = dict(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64,
        )  # fmt: skip
    return family.config_cls(vocab_size=100, moe=moe, moe_layers=[1], pad_token_id=0, num_labels=3, **dense)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_moe_classifier_round_trip(name, tmp_path):
    torch.manual_seed(0)
    family = FAMILIES[name]
    model = family.seq_cls_cls(_config(family)).eval()
    assert list(model.moe_layers()) == [1]
    ids = torch.randint(1, 100, (2, 7))
    out = model(input_ids=ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.aux_loss is not None
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is family.seq_cls_cls
    torch.testing.assert_close(loaded(input_ids=ids).logits, out.logits, rtol=1e-5, atol=1e-6)
