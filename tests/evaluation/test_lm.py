"""LM evaluation: figures equal a direct computation; padding calls and routing are kept apart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from upcycle.evaluation import evaluate_lm, isolated_routing_stats, next_token_counts


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path = save_tiny_moe(root / "moe", save_tiny_gpt2(root / "dense"))
    return AutoModelForCausalLM.from_pretrained(path)


def batches(n=3, B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (B, S), generator=g) for _ in range(n)]


def test_loss_perplexity_accuracy_match_a_direct_computation(moe):
    data = batches()
    res = evaluate_lm(moe, data)
    moe.eval()
    with torch.no_grad():
        losses = [moe(input_ids=x, labels=x).lm_loss for x in data]  # HF's mean over the S-1 targets
        logits = [moe(input_ids=x).logits for x in data]
    assert res.loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    correct = sum(int((lg[:, :-1].argmax(-1) == x[:, 1:]).sum()) for lg, x in zip(logits, data))
    assert res.tokens == 3 * 2 * 11 and res.accuracy == pytest.approx(correct / res.tokens)
    assert res.batches == 3


def test_weight_zero_batches_and_masks_do_not_count(moe):
    data = batches()
    padded = evaluate_lm(moe, [(x, 1.0) for x in data] + [(data[0], 0.0)])
    plain = evaluate_lm(moe, data)
    assert padded.loss == pytest.approx(plain.loss) and padded.tokens == plain.tokens
    assert padded.routing == plain.routing  # the padding call is not in the routing counts either
    x = data[0]
    mask = torch.ones_like(x)
    mask[:, -4:] = 0
    res = evaluate_lm(moe, [{"input_ids": x, "attention_mask": mask}])
    assert res.tokens == 2 * (11 - 4)


def test_evaluation_leaves_training_routing_counts_alone(moe):
    moe.train()
    moe.reset_routing_stats()
    moe(input_ids=batches(1)[0])
    before = {i: s["tokens_per_expert"] for i, s in moe.routing_stats().items()}
    res = evaluate_lm(moe, batches(2, seed=1))
    assert moe.training  # mode restored
    assert {i: s["tokens_per_expert"] for i, s in moe.routing_stats().items()} == before
    assert all(s["tokens"] == 2 * 2 * 12 for s in res.routing.values())
    with isolated_routing_stats(moe) as inside:
        moe(input_ids=batches(1, seed=2)[0])
    assert all(int(s.tokens) == 24 for s in inside.values())


def test_next_token_counts_ignores_masked_labels():
    logits = F.one_hot(torch.tensor([[1, 2, 3, 0]]), 5).float()
    labels = torch.tensor([[9, 1, -100, 4]])
    correct, counted = next_token_counts(logits, labels)
    # Predictions 1, 2, 3 for targets 1, (masked), 4: one right out of two counted.
    assert int(counted) == 2 and int(correct) == 1
