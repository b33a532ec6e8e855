"""XNLI-layout data: language parsing, local hub-layout folders, the pair format, padding and pooling
positions, and the synthetic generator's structure."""

from __future__ import annotations

import pytest
import torch

from upcycle.config import ConfigError
from upcycle.data.synthetic import LABEL_NOISE, LEXICONS, write_synthetic_xnli
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.data.xnli import (
    XNLI_LABELS,
    XNLI_LANGUAGES,
    PairFormat,
    check_fields,
    encode_examples,
    label_names,
    last_token_index,
    load_split,
    pad_batch,
    parse_languages,
)


@pytest.fixture(scope="module")
def xnli_dir(tmp_path_factory):
    sizes = {"train": 40, "validation": 20, "test": 30}
    return write_synthetic_xnli(tmp_path_factory.mktemp("xnli"), sizes=sizes, seed=3)


def test_parse_languages():
    assert parse_languages("all") == list(XNLI_LANGUAGES)
    assert parse_languages("fr") == ["fr"]
    assert parse_languages("en, fr,es") == ["en", "fr", "es"]
    assert parse_languages(["de", "zh"]) == ["de", "zh"]
    with pytest.raises(ConfigError, match="unknown language; XNLI's are en, ar"):
        parse_languages("en,xx", field="train_languages")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_languages("en,en")
    assert parse_languages("en,ja", allowed=None) == ["en", "ja"]
    assert parse_languages("none", allowed=None) == []


def test_local_folder_loads_like_the_hub(xnli_dir):
    from datasets import load_dataset

    ds = load_split(str(xnli_dir), "fr", "test")
    assert ds.column_names == ["premise", "hypothesis", "label"] and len(ds) == 30
    # The README's configs block makes the folder loadable the way the hub repository is.
    hub_like = load_dataset(str(xnli_dir), "fr", split="test")
    assert hub_like["premise"] == ds["premise"] and hub_like["label"] == ds["label"]
    assert label_names(ds, "label") == list(XNLI_LABELS)


def test_local_folder_errors_name_what_exists(xnli_dir):
    with pytest.raises(ConfigError, match="no folder for language 'xx'; it has ar, bg"):
        load_split(str(xnli_dir), "xx", "test")
    with pytest.raises(ConfigError, match="no 'dev' files.*splits there: test, train, validation"):
        load_split(str(xnli_dir), "fr", "dev")
    ds = load_split(str(xnli_dir), "fr", "test")
    with pytest.raises(ConfigError, match="columns are premise, hypothesis, label"):
        check_fields(ds, ("sentence1", "sentence2"), "label", where="fr")


def test_jsonl_layout(tmp_path):
    root = write_synthetic_xnli(tmp_path, languages=("en",), sizes={"test": 5}, file_format="jsonl")
    ds = load_split(str(root), "en", "test")
    assert len(ds) == 5 and set(ds.column_names) == {"premise", "hypothesis", "label"}


def test_generated_data_is_parallel_and_follows_its_rules(xnli_dir):
    en = load_split(str(xnli_dir), "en", "test")
    fr = load_split(str(xnli_dir), "fr", "test")
    assert en["label"] == fr["label"]  # clean languages share labels: the same events, translated
    for row in en:
        premise, hyp, label = row["premise"], row["hypothesis"], XNLI_LABELS[row["label"]]
        if label == "contradiction":
            assert " never " in hyp
        else:
            assert " never " not in hyp
        obj_in_premise = any(o in premise and o in hyp for o in LEXICONS["en"].objects)
        assert obj_in_premise == (label != "neutral")
    zh = load_split(str(xnli_dir), "zh", "test")
    assert " " not in zh["premise"][0]  # written without spaces, as Chinese is
    assert LABEL_NOISE["en"] == 0.0 and max(LABEL_NOISE.values()) < 0.5


def test_pair_format_joins_truncates_and_keeps_the_separator():
    tok = gpt2_tokenizer_offline()
    fmt = PairFormat.for_tokenizer(tok, max_length=8)
    assert fmt.sep_id == tok.eos_token_id == fmt.pad_id
    rows = encode_examples(tok, [["The cat sees the house in the city."], ["The cat sees the house."]], fmt)
    assert len(rows[0]) == 8 and rows[0].count(tok.eos_token_id) == 1
    a = tok("The cat sees the house in the city.", add_special_tokens=False)["input_ids"]
    b = tok("The cat sees the house.", add_special_tokens=False)["input_ids"]
    sep_at = rows[0].index(tok.eos_token_id)
    assert rows[0][:sep_at] == a[:sep_at] and rows[0][sep_at + 1 :] == b[: 8 - sep_at - 1]
    long = PairFormat.for_tokenizer(tok, max_length=128)
    (row,) = encode_examples(tok, [["Hello"], ["world"]], long)
    assert row == [*tok("Hello")["input_ids"], tok.eos_token_id, *tok("world")["input_ids"]]
    with pytest.raises(ConfigError, match="max_length"):
        PairFormat.for_tokenizer(tok, max_length=2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_last_real_token(side):
    eos = 50256
    rows = [[5, eos, 7, 8], [9, eos], [eos]]  # an EOS inside the text and a row that is only EOS
    ids, mask = pad_batch(rows, pad_id=eos, side=side)
    last = last_token_index(mask)
    for i, r in enumerate(rows):
        assert ids[i, last[i]].item() == r[-1]
        assert int(mask[i].sum()) == len(r)
    expected = torch.tensor([3, 1, 0]) if side == "right" else torch.tensor([3, 3, 3])
    assert torch.equal(last, expected)
