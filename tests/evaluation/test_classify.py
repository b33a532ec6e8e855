"""Classifier evaluation: length grouping changes nothing but the cost, pooling takes the last real token
whatever it is, and class ids map to the dataset's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upcycle.config import ConfigError
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.data.xnli import XNLI_LABELS, PairFormat, encode_examples, load_split, pad_batch
from upcycle.evaluation.classify import (
    LanguageData,
    class_to_label,
    evaluate_classifier,
    length_batches,
    predict,
)
from upcycle.models.loading import load_classifier


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer_offline()


def last_position_scores(model, row: list[int]) -> torch.Tensor:
    """The head's scores at the row's last token, the row alone and unpadded (no pooling rule involved)."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states[-1]
        return model.score(hidden[0, -1])


def mixed_rows(tok, xnli_dir) -> list[list[int]]:
    """Pairs of very different token lengths: English, Chinese and Thai (GPT-2 splits Thai finely)."""
    fmt = PairFormat.for_tokenizer(tok)
    rows = []
    for lang in ("en", "zh", "th"):
        ds = load_split(str(xnli_dir), lang, "test")
        rows += encode_examples(tok, [ds["premise"][:5], ds["hypothesis"][:5]], fmt)
    return rows


def test_length_batches_cover_every_example_once_longest_first():
    lengths = [5, 17, 3, 17, 9, 1, 12]
    batches = length_batches(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_length_grouping_gives_the_predictions_of_one_by_one_evaluation(classifiers, xnli_dir, tok, kind):
    model = load_classifier(classifiers[kind])
    rows = mixed_rows(tok, xnli_dir)
    grouped = predict(model, rows, tok.eos_token_id, batch_size=4)
    alone = torch.stack([last_position_scores(model, r) for r in rows]).numpy()
    np.testing.assert_allclose(grouped.logits, alone, atol=2e-5, rtol=1e-4)
    assert (grouped.predicted == alone.argmax(-1)).all()
    assert len(set(grouped.predicted.tolist())) > 1  # the trained model's predictions vary
    # Cost: real tokens counted exactly; computed tokens = Σ batch × its longest row.
    lengths = [len(r) for r in rows]
    assert grouped.real_tokens == sum(lengths)
    expected = sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, 4))
    assert grouped.computed_tokens == expected
    padded_to_longest = len(rows) * max(lengths)
    assert grouped.computed_tokens < padded_to_longest


def test_pooling_uses_the_last_real_token_even_when_it_is_eos(classifiers, tok):
    model = load_classifier(classifiers["dense"])
    eos = tok.eos_token_id
    data = LanguageData(
        texts=[
            ["The cat sees the house.", "The dog likes a tree.", "A child buys a book in winter."],
            ["The cat sees.<|endoftext|>", "", "A child never buys a book."],  # EOS typed in, empty, plain
        ],
        labels=np.array([0, 1, 2]),
    )
    fmt = PairFormat.for_tokenizer(tok)
    rows = encode_examples(tok, data.texts, fmt)
    assert rows[0][-1] == eos and rows[1][-1] == eos and eos in rows[2][:-1] and rows[2][-1] != eos
    ours = predict(model, rows, eos, batch_size=3)
    expected = torch.stack([last_position_scores(model, r) for r in rows]).numpy()
    np.testing.assert_allclose(ours.logits, expected, atol=2e-5, rtol=1e-4)
    # Hugging Face's pad-id pooling (pad = EOS) picks an earlier token for the rows ending with EOS:
    # the pitfall of transformers #35352 / #35909, which this evaluation must not inherit.
    ids, mask = pad_batch(rows, eos)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert not np.allclose(hf[:2], expected[:2], atol=1e-3)
    np.testing.assert_allclose(hf[2], expected[2], atol=2e-5, rtol=1e-4)
    # The same through the per-language evaluation, predictions compared with the labels.
    res = evaluate_classifier(
        model, tok, {"en": data}, XNLI_LABELS, max_length=128, batch_size=2, device="cpu"
    )
    assert res["en"].correct.tolist() == (expected.argmax(-1) == data.labels).tolist()


def test_class_ids_map_to_dataset_labels_by_name():
    class Cfg:
        num_labels = 3
        id2label = {0: "contradiction", 1: "entailment", 2: "neutral"}

    assert class_to_label(Cfg, XNLI_LABELS).tolist() == [2, 0, 1]
    Cfg.id2label = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert class_to_label(Cfg, XNLI_LABELS).tolist() == [0, 1, 2]
    Cfg.id2label = {0: "yes", 1: "no", 2: "maybe"}
    with pytest.raises(ConfigError, match="the model's labels are yes, no, maybe"):
        class_to_label(Cfg, XNLI_LABELS)
    Cfg.num_labels, Cfg.id2label = 2, {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(ConfigError, match="the dataset has 3 classes but the model predicts 2"):
        class_to_label(Cfg, XNLI_LABELS)
