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


# --------------------------------------------------------------------------- Nexus (issue 15)
NEXUS_DOMAINS = ("prose", "code", "math")


@pytest.fixture(scope="session")
def nexus_world(tmp_path_factory):
    """A tiny GPT-2 seed (GPT-2's vocabulary, so the offline GPT-2 tokenizer fits), one "specialised" model
    per generated text domain (the seed with perturbed weights: specialisation is not what these tests
    measure), and each domain's text as JSON lines."""
    from types import SimpleNamespace

    from tests.training.helpers import save_tiny_gpt2
    from upcycle.data.synthetic import domain_documents, write_jsonl

    root = tmp_path_factory.mktemp("nexus")
    seed = save_tiny_gpt2(root / "seed")
    data, experts = {}, {}
    for i, domain in enumerate(NEXUS_DOMAINS):
        data[domain] = str(write_jsonl(root / f"{domain}.jsonl", domain_documents(domain, 120, seed=i)))
        model = GPT2LMHeadModel.from_pretrained(seed)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / f"lm-{domain}")
        experts[domain] = str(root / f"lm-{domain}")
    return SimpleNamespace(root=root, seed=seed, data=data, experts=experts)


@pytest.fixture(scope="session")
def nexus_moe(nexus_world, tmp_path_factory):
    """`convert --method nexus` of the seed with the prose and code experts, embeddings from their text."""
    from upcycle.upcycling import UpcycleConfig, convert

    w = nexus_world
    out = tmp_path_factory.mktemp("nexus-moe") / "moe"
    opts = UpcycleConfig(
        model=[w.seed],
        method="nexus",
        expert=[f"{d}={w.experts[d]}" for d in ("prose", "code")],
        domain_data=[f"{d}={w.data[d]}" for d in ("prose", "code")],
        embed_tokens=600,
        out=str(out),
    )
    convert(opts, progress=False)
    return str(out)
