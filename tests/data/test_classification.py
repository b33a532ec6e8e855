"""Classification batches: seeded epochs, length grouping, process-count invariance, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from upcycle.config import UserError
from upcycle.data.classification import EncodedExamples, TrainBatches, epoch_micro_batches, eval_batches


def xnli_like(n: int, seed: int = 0) -> EncodedExamples:
    """Rows with XNLI-like GPT-2 lengths (premise + SEP + hypothesis: mostly 25–90 tokens, a tail to 128)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(48), 0.35, n).astype(int), 8, 128)
    rows = [list(range(1, 1 + k)) for k in lengths]
    return EncodedExamples.from_rows(rows, rng.integers(0, 3, n).tolist(), "en")


def padding_ratio(examples: EncodedExamples, batches) -> float:
    lengths = examples.lengths
    return sum(len(b) * lengths[b].max() for b in batches) / sum(lengths[b].sum() for b in batches)


def test_epochs_are_seeded_permutations():
    lengths = xnli_like(1000).lengths
    a = epoch_micro_batches(lengths, 32, seed=1, epoch=0, group=True)
    assert a.shape == (31, 32) and len(np.unique(a)) == a.size  # 1000 // 32 micro-batches, no repeats
    assert np.array_equal(a, epoch_micro_batches(lengths, 32, seed=1, epoch=0, group=True))
    assert not np.array_equal(a, epoch_micro_batches(lengths, 32, seed=1, epoch=1, group=True))
    assert not np.array_equal(a, epoch_micro_batches(lengths, 32, seed=2, epoch=0, group=True))


def test_length_grouping_keeps_padding_small():
    examples = xnli_like(4000)
    grouped = epoch_micro_batches(examples.lengths, 32, 0, 0, group=True)
    plain = epoch_micro_batches(examples.lengths, 32, 0, 0, group=False)
    # Tokens computed ÷ real tokens: issue 12's bound for length grouping is 1.15; without it a batch
    # pads to its longest row (and padding to 128, as run_xnli.py does, is ~2.6× here).
    assert padding_ratio(examples, grouped) < 1.05
    assert padding_ratio(examples, plain) > 1.4
    assert 128 * len(examples) / examples.lengths.sum() > 2.4


def test_two_processes_see_the_micro_batches_of_one_with_double_accumulation():
    examples = xnli_like(300)
    one = TrainBatches(examples, 8, per_step=4, seed=0, group=True)
    two = [TrainBatches(examples, 8, per_step=4, seed=0, group=True) for _ in range(2)]
    for _ in range(25):  # 9 steps per epoch: crosses two epoch boundaries
        single = one.next_step(0, 1)
        pair = [two[r].next_step(r, 2) for r in range(2)]
        assert [b.tolist() for b in single] == [pair[0][0].tolist(), pair[1][0].tolist(), pair[0][1].tolist(),
                                                pair[1][1].tolist()]  # fmt: skip
    assert one.epoch == 2 and one.steps_per_epoch == 9 and one.consumed == 100


def test_resume_continues_exactly(tmp_path):
    examples = xnli_like(200)
    ref = TrainBatches(examples, 8, per_step=2, seed=5, group=True)
    stream = [ref.next_step(0, 1) for _ in range(30)]
    first = TrainBatches(examples, 8, per_step=2, seed=5, group=True)
    for _ in range(17):
        first.next_step(0, 1)
    first.save(tmp_path)
    resumed = TrainBatches(examples, 8, per_step=2, seed=5, group=True)
    resumed.restore(tmp_path)
    rest = [resumed.next_step(0, 1) for _ in range(13)]
    assert all(np.array_equal(a, b) for x, y in zip(stream[17:], rest) for a, b in zip(x, y))
    other = TrainBatches(xnli_like(150), 8, per_step=2, seed=5, group=True)
    with pytest.raises(UserError, match="trained on 200 examples, the data now has 150"):
        other.restore(tmp_path)


def test_encoded_examples_concat_batch_and_eval_order():
    a = EncodedExamples.from_rows([[1, 2, 3], [4]], [0, 2], "en")
    b = EncodedExamples.from_rows([[5, 6]], [1], "fr")
    both = EncodedExamples.concat([a, b])
    assert both.languages == ["en", "fr"] and both.language.tolist() == [0, 0, 1]
    assert [both.row(i) for i in range(3)] == [[1, 2, 3], [4], [5, 6]]
    batch = both.batch([2, 0], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 9], [1, 2, 3]] and batch["attention_mask"].sum().item() == 5
    assert batch["labels"].tolist() == [1, 0] and batch["language"].tolist() == [1, 0]
    assert [x.tolist() for x in eval_batches(both, 2)] == [[0, 2], [1]]  # longest first
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        TrainBatches(both, 2, per_step=2, seed=0, group=True)
