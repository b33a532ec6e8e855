"""Tokenizer loading: never an empty tokenizer, GPT-2's offline where it is the right one."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from upcycle.config import UserError
from upcycle.data.tokenizers import gpt2_tokenizer_offline, load_tokenizer, usable


def test_gpt2_names_and_weights_only_gpt2_folders_get_gpt2s_tokenizer(tmp_path):
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50257, n_positions=16)
    ).save_pretrained(tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    for name in ("gpt2-offline", "gpt2", str(tmp_path / "m")):
        tok = load_tokenizer(name, model_config=config)
        assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token_id == 50256


def test_empty_saved_tokenizer_is_rejected(tmp_path):
    # Transformers 5 builds (and saves) an empty GPT2Tokenizer from a weights-only folder.
    from transformers import AutoTokenizer

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=100, n_positions=16)
    ).save_pretrained(tmp_path / "m")
    empty = AutoTokenizer.from_pretrained(tmp_path / "m")
    empty.save_pretrained(tmp_path / "m")
    assert not usable(empty) and usable(gpt2_tokenizer_offline())
    with pytest.raises(UserError, match="empty"):
        load_tokenizer(str(tmp_path / "m"), model_config=AutoConfig.from_pretrained(tmp_path / "m"))
