"""Tiny dense source models, built in the tests and saved once per session."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256


def tiny_gpt2(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_layer=4, n_embd=32, n_head=2, n_inner=128, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
               eos_token_id=0)  # fmt: skip
    cfg.update(kw)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    _randomise_biases(model)
    return model


def tiny_llama(seed: int = 0, cls=LlamaForCausalLM, config_cls=LlamaConfig, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    cfg.update(kw)
    return cls(config_cls(**cfg))


def _randomise_biases(model) -> None:
    # HF initialises biases to zero; non-zero biases make bias handling observable in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    models = {
        "gpt2": tiny_gpt2(),
        "gpt2_b": tiny_gpt2(seed=1),
        "gpt2_wide": tiny_gpt2(seed=2, n_inner=96),
        "llama": tiny_llama(),
        "llama_b": tiny_llama(seed=3),
        "mistral": tiny_llama(cls=MistralForCausalLM, config_cls=MistralConfig, sliding_window=None),
        "qwen2": tiny_llama(cls=Qwen2ForCausalLM, config_cls=Qwen2Config),
    }
    for name, model in models.items():
        if name == "qwen2":
            _randomise_biases(model)  # Qwen2 has q/k/v biases
        path = root / name
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths
