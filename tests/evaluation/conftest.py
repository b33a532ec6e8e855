"""Fixtures of the evaluation tests: a small generated XNLI-layout folder and tiny classifiers saved the
way ``upcycle finetune`` saves them (a sequence-classification folder keeping XNLI's label names), one
dense and one drop-upcycled MoE, each trained for a few steps so that their predictions vary."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from upcycle.data.synthetic import write_synthetic_xnli
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.data.xnli import XNLI_LABELS, PairFormat, encode_examples, load_split, pad_batch
from upcycle.models.loading import load_classifier


@pytest.fixture(scope="session")
def xnli_dir(tmp_path_factory):
    return write_synthetic_xnli(
        tmp_path_factory.mktemp("xnli"), sizes={"train": 48, "validation": 12, "test": 12}, seed=5
    )


def few_steps(model, xnli_dir, steps: int = 40, seed: int = 0):
    """A few AdamW steps on English training pairs: enough to make predictions depend on the input."""
    torch.manual_seed(seed)
    tok = gpt2_tokenizer_offline()
    ds = load_split(str(xnli_dir), "en", "train")
    rows = encode_examples(tok, [ds["premise"], ds["hypothesis"]], PairFormat.for_tokenizer(tok))
    labels = torch.tensor(ds["label"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(rows))[:16]
        ids, mask = pad_batch([rows[i] for i in idx], tok.eos_token_id)
        # Generated hypotheses end with a full stop, never the pad id: HF's own pooling is right here.
        loss = model(input_ids=ids, attention_mask=mask, labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory):
    """{"dense_lm": folder, "moe_lm": folder}: a tiny GPT-2 and its drop-upcycled MoE, as causal LMs."""
    root = tmp_path_factory.mktemp("lm")
    dense_lm = save_tiny_gpt2(root / "dense", n_positions=256)
    return {"dense_lm": dense_lm, "moe_lm": save_tiny_moe(root / "moe", dense_lm)}


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory, xnli_dir, tiny_lms):
    """{"dense": folder, "moe": folder, plus the causal LMs}: fine-tuned-like classifiers of both."""
    root = tmp_path_factory.mktemp("models")
    out = dict(tiny_lms)
    for key, src in (("dense", tiny_lms["dense_lm"]), ("moe", tiny_lms["moe_lm"])):
        model = few_steps(load_classifier(src, label_names=XNLI_LABELS), xnli_dir, seed=len(key))
        path = root / key / "best"
        model.save_pretrained(path)
        out[key] = str(path)
    return out
