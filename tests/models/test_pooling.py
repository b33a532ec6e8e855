"""The classified position of decoder-only classifiers: ours against Hugging Face's GPT-2 classifier on
identical weights, with padding on either side and with EOS (GPT-2's pad id) inside and at the end of
the text (transformers issues #35352, #35909)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2ForSequenceClassification

from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from upcycle.data.xnli import pad_batch
from upcycle.models.loading import load_classifier
from upcycle.models.pooling import sequence_logits

EOS = 50256
PAIRS = [[5, EOS, 7, 8, 9], [11, EOS, 13], [21, 22, EOS, 23, 24, 25, 26]]  # premise SEP hypothesis
ENDS_IN_EOS = [31, 32, EOS]  # an empty hypothesis: the last real token is the separator (= pad id)


def last_position_logits(model, rows) -> torch.Tensor:
    """The reference: each row alone (no padding), the head applied at its last position."""
    with torch.no_grad():
        return torch.stack(
            [
                model.score(model.base_model(input_ids=torch.tensor([r])).last_hidden_state)[0, -1]
                for r in rows
            ]
        )


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=64, num_labels=3,
                     pad_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    folder = tmp_path_factory.mktemp("hf") / "gpt2-cls"
    GPT2ForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def test_matches_gpt2_for_sequence_classification_on_identical_weights(hf_folder):
    hf = GPT2ForSequenceClassification.from_pretrained(hf_folder).eval()
    ours = load_classifier(str(hf_folder)).eval()  # the path upcycle finetune loads models by
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), ours.state_dict().values()))
    ids, mask = pad_batch(PAIRS, EOS, "right")
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, labels=labels)
        logits, _ = sequence_logits(ours, ids, mask)
    # Right padding, rows ending in a real token: both pool the same position.
    torch.testing.assert_close(logits, reference.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(F.cross_entropy(logits, labels), reference.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_real_token_with_padding_on_either_side_and_eos_in_the_text(hf_folder, side):
    model = load_classifier(str(hf_folder)).eval()
    rows = [*PAIRS, ENDS_IN_EOS]
    ids, mask = pad_batch(rows, EOS, side)
    expected = last_position_logits(model, rows)
    with torch.no_grad():
        ours, _ = sequence_logits(model, ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)
    # The pitfalls this guards against: pooling by pad id skips a final EOS (right padding), and left
    # padding without position ids shifts every position the model sees.
    wrong = (theirs - expected).abs().amax(-1)
    assert wrong[-1] > 1e-3
    if side == "left":
        padded = mask[:, 0] == 0
        assert padded[:-1].any() and (wrong[:-1][padded[:-1]] > 1e-3).all()


def test_moe_classifier_pools_the_same_way(tmp_path):
    dense = save_tiny_gpt2(tmp_path / "dense", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    moe_dir = save_tiny_moe(tmp_path / "moe", dense, experts=4, top_k=2)
    moe = load_classifier(moe_dir, ["entailment", "neutral", "contradiction"]).eval()
    rows = [*PAIRS, ENDS_IN_EOS]
    expected = last_position_logits(moe, rows)
    for side in ("right", "left"):
        ids, mask = pad_batch(rows, EOS, side)
        with torch.no_grad():
            logits, out = sequence_logits(moe, ids, mask)
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-6)
        assert out.aux_loss is not None  # the MoE forward ran as usual (padding masked in its losses)
    assert moe.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
