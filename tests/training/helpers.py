"""Tiny models saved by the tests: a dense GPT-2 and its drop-upcycled MoE (GPT-2's real vocabulary,
so the offline GPT-2 tokenizer fits)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import upcycle  # noqa: F401  (registers the MoE model types)


def save_tiny_gpt2(path: Path, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=128)
    cfg.update(overrides)
    GPT2LMHeadModel(GPT2Config(**cfg)).save_pretrained(path)
    return str(path)


def save_tiny_moe(path: Path, dense_dir: str, **options) -> str:
    """Drop-upcycle ``dense_dir`` (the founding report's recipe at toy size: 4 experts, top-1, every
    other layer, r = 0.15, Switch-style scoring) and save it."""
    from upcycle.upcycling import UpcycleConfig, upcycle_model

    opts = dict(
        model=[dense_dir],
        method="drop",
        ratio=0.15,
        experts=4,
        top_k=1,
        layers="every_other",
        renormalize=False,
        out=None,
    )
    opts.update(options)
    result = upcycle_model(UpcycleConfig(**opts), progress=False)
    result.model.save_pretrained(path)
    return str(path)
