"""Prefix routing under a generation cache: every cached step routes as a forward over the whole
sequence does, with left and right padding, greedy and beam search, and a cropped cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.models.tiny import tiny_moe, token_ids

# Every routing option whose decisions depend on no later token (so a cached step can equal the full
# forward): `sequence` routing sees the future by design, capacity depends on the batch's token count,
# fixed routing needs per-sequence labels, random routers draw anew per call.
PREFIX = {
    "token": {},
    "global": {"global_routing": True},
    "frozen": {"router_mode": "frozen"},
    "mlp_router": {"router_type": "mlp", "router_bias": True},
    "embedding_router": {"router_type": "embedding", "domain_embedding_size": 8, "router_hidden_size": 16},
    "prefix": {"routing_unit": "sequence_prefix"},
    "prefix_global_top1": {
        "routing_unit": "sequence_prefix", "global_routing": True, "top_k": 1, "renormalize": False
    },
}  # fmt: skip


def padded_batch(padding: str, length: int = 10):
    ids = token_ids(2, length, seed=3)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def cached_logits(model, ids, mask, prefill: int):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time through the cache."""
    out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(
            input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True
        )
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("option", list(PREFIX))
def test_cached_steps_equal_the_full_forward(family, padding, option):
    model = tiny_moe(family, **PREFIX[option]).eval()
    ids, mask = padded_batch(padding)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    cached = cached_logits(model, ids, mask, prefill=4)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_cache_equals_the_full_forward(family):
    model = tiny_moe(family, routing_unit="sequence_prefix").eval()
    ids, mask = padded_batch("left", length=6)
    kw = dict(
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    # Each step's logits are the full forward's at that position on the generated sequence.
    seq = cached.sequences
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=full_mask).logits
    steps = torch.stack(cached.logits, 1)
    torch.testing.assert_close(steps, full[:, 5:-1], atol=2e-5, rtol=1e-5)
    assert torch.equal(steps.argmax(-1), seq[:, 6:])


def test_beam_search_reorders_the_router_sums_with_the_cache():
    model = tiny_moe("llama", routing_unit="sequence_prefix").eval()
    ids, mask = padded_batch("left", length=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


@torch.no_grad()
def test_a_cropped_cache_continues_from_the_kept_tokens():
    model = tiny_moe("gpt2", routing_unit="sequence_prefix").eval()
    ids, mask = padded_batch("left")
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
    out.cache.crop(-3)  # assisted decoding rejects candidate tokens this way
    rest = model(input_ids=ids[:, 5:], attention_mask=mask, cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_a_cache_without_recorded_sums_is_an_error():
    token_model = tiny_moe("gpt2")
    cache = token_model(input_ids=token_ids(2, 4), use_cache=True).cache
    assert isinstance(cache, DynamicCache)
    model = tiny_moe("gpt2", routing_unit="sequence_prefix")
    with pytest.raises(RuntimeError, match="did not record"):
        model(input_ids=token_ids(2, 1), cache=cache, use_cache=True)
