"""``upcycle fertility``: tokens per word, words split, tokenisation premium, on hand-counted strings in
several scripts and through the command line."""

from __future__ import annotations

import csv
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from upcycle.analysis.fertility import count_texts, unicode_words, whitespace_words, word_splitter
from upcycle.cli import main
from upcycle.data.tokenizers import load_tokenizer
from upcycle.data.xnli import load_split


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is one token (the space too), so token counts are
    byte counts, countable by hand in any script."""
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="!")


# (text, UTF-8 bytes = tokens, whitespace words, unicode (UAX #29) words)
SCRIPTS = [
    ("the cat", 3 + 1 + 3, 2, 2),  # Latin: 1 byte per letter, the space is a token of its own
    ("γάτα σκύλος", 8 + 1 + 12, 2, 2),  # Greek: 2 bytes per letter
    ("القطة ترى", 10 + 1 + 6, 2, 2),  # Arabic: 2 bytes per letter
    ("我喜欢猫", 12, 1, 4),  # Han: 3 bytes each, no spaces; UAX #29 breaks between ideographs
    ("แมวกิน", 18, 1, 5),  # Thai: 3 bytes each; the vowel sign ิ (U+0E34) stays with ก: แ ม ว กิ น
    ("नमस्ते दुनिया", 18 + 1 + 18, 2, 2),  # Devanagari: 3 bytes per code point, 6 per word
]


@pytest.mark.parametrize("text,tokens,ws_words,uax_words", SCRIPTS)
def test_hand_counted_scripts(text, tokens, ws_words, uax_words):
    tok = byte_tokenizer()
    [ws] = count_texts(tok, [text], whitespace_words)
    assert (ws.tokens, ws.words) == (tokens, ws_words)
    assert ws.continued == ws_words  # every word is several bytes
    [uax] = count_texts(tok, [text], unicode_words)
    assert (uax.tokens, uax.words) == (tokens, uax_words)


def test_words_in_context_with_gpt2s_leading_space():
    """'unbelievable' alone is 4 GPT-2 tokens; inside a sentence ' unbelievable' is one: counted in context."""
    tok = load_tokenizer("gpt2")
    assert len(tok("unbelievable", add_special_tokens=False)["input_ids"]) == 4
    [c] = count_texts(tok, ["the unbelievable"], whitespace_words)
    assert (c.tokens, c.words, c.continued) == (2, 2, 0)
    # Punctuation: "world," is one whitespace word of two tokens (' world' + ','); UAX #29 drops the comma.
    [ws] = count_texts(tok, ["Hello world, ok"], whitespace_words)
    assert (ws.tokens, ws.words, ws.continued) == (4, 3, 1)
    [uax] = count_texts(tok, ["Hello world, ok"], unicode_words)
    assert (uax.tokens, uax.words, uax.continued) == (4, 3, 0)
    # A double space costs GPT-2 a token of its own, which belongs to no word.
    [gap] = count_texts(tok, ["ok  there"], whitespace_words)
    assert (gap.tokens, gap.words, gap.continued) == (3, 2, 0)


def test_unicode_words_follow_uax29():
    assert [("I can't stop 3.14 now, ok?")[a:b] for a, b in unicode_words("I can't stop 3.14 now, ok?")] == [
        "I",
        "can't",
        "stop",
        "3.14",
        "now",
        "ok",
    ]
    text = "こんにちは世界カタカナ"
    # Hiragana and Han break per character; a Katakana run is one word (UAX #29 rule WB13).
    assert [text[a:b] for a, b in unicode_words(text)] == [*"こんにちは世界", "カタカナ"]


def test_icu_words_use_dictionaries():
    pytest.importorskip("icu")
    split = word_splitter("icu", "th")
    text = "แมวเห็นบ้าน"
    assert [text[a:b] for a, b in split(text)] == ["แมว", "เห็น", "บ้าน"]


def test_cli_tables_premium_and_a_second_tokenizer(xnli_dir, dense_dir, tmp_path):
    """Several tokenizers side by side; a model folder without MoE layers (or tokenizer files) works too."""
    byte_dir = tmp_path / "bytes"
    byte_tokenizer().save_pretrained(byte_dir)
    out = tmp_path / "fert"
    rc = main(
        ["fertility", "--tokenizer", "gpt2", str(byte_dir), dense_dir, "--names", "gpt2", "bytes", "dense",
         "--data", xnli_dir, "--languages", "fr,th", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "fertility.json").read_text())
    assert doc["format"] == "upcycle-fertility/1"
    assert doc["data"]["languages"] == ["en", "fr", "th"]  # the reference language is added
    gpt2 = load_tokenizer("gpt2")
    per_lang = {}
    for lang in ("en", "fr", "th"):
        ds = load_split(xnli_dir, lang, "test")
        n = [
            len(gpt2(p)["input_ids"]) + len(gpt2(h)["input_ids"])
            for p, h in zip(ds["premise"], ds["hypothesis"])
        ]
        words = sum(len(p.split()) + len(h.split()) for p, h in zip(ds["premise"], ds["hypothesis"]))
        per_lang[lang] = n
        s = doc["tokenizers"]["gpt2"]["languages"][lang]
        assert (s["examples"], s["tokens"], s["words"]) == (len(ds), sum(n), words)
        assert s["fertility"] == pytest.approx(sum(n) / words)
        assert s["tokens_per_example"] == pytest.approx(sum(n) / len(ds))
    for lang in ("fr", "th"):
        ratios = [a / b for a, b in zip(per_lang[lang], per_lang["en"])]
        assert doc["tokenizers"]["gpt2"]["languages"][lang]["premium"] == pytest.approx(
            sum(ratios) / len(ratios)
        )
    assert doc["tokenizers"]["gpt2"]["languages"]["en"]["premium"] == 1.0
    # The dense model folder has GPT-2's vocabulary and no tokenizer files: GPT-2's tokenizer, same counts.
    assert doc["tokenizers"]["dense"]["languages"] == doc["tokenizers"]["gpt2"]["languages"]
    # Bytes: Thai letters are 3 bytes, so fertility ≥ 3 × letters per word; every multi-letter word split.
    assert (
        doc["tokenizers"]["bytes"]["languages"]["th"]["fertility"]
        > 3 * doc["tokenizers"]["gpt2"]["languages"]["en"]["fertility"]
    )

    rows = list(csv.DictReader((out / "fertility.csv").open()))
    assert len(rows) == 9 and rows[0]["tokenizer"] == "gpt2" and rows[0]["language"] == "en"
    md = (out / "fertility.md").read_text()
    assert "| tokenizer | measure | en | fr | th |" in md and "| gpt2 | tokens per word |" in md
    assert {"fertility.png", "fertility.svg"} <= {p.name for p in out.iterdir()}


def test_cli_bad_input(xnli_dir, tmp_path, capsys):
    out = tmp_path / "f"
    for args, needle in (
        (["--data", xnli_dir, "--languages", "en,de"], "has no folder for language 'de'"),
        (["--data", xnli_dir, "--languages", "en", "--text-fields", "premise", "body"], "not a column"),
        (["--data", xnli_dir, "--words", "letters"], "invalid choice"),
        (["--data", xnli_dir, "--tokenizer", str(tmp_path)], "no tokenizer files"),
    ):
        assert main(["fertility", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
