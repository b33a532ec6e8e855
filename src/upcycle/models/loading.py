"""Loading models by name for every command: a local folder (``~`` expanded) or a hub id.

One place decides whether a name is a path and turns loader exceptions into one-line errors, so that
``finetune``, ``evaluate`` and ``analyze`` behave alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from upcycle.config import ConfigError, UserError


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (loader errors are often pages long)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def looks_like_path(name: str) -> bool:
    """A name that can only be a path: it exists, or starts with '.', '/' or '~', or has more than one
    '/' (hub ids are 'name' or 'owner/name')."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def model_source(name: str, *, flag: str = "model") -> str:
    """What to pass to ``from_pretrained``: the expanded folder, or the hub id unchanged."""
    if not isinstance(name, str) or not name:
        raise ConfigError(flag, name, "give a model folder or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(flag, name, "the folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if looks_like_path(name):
        raise ConfigError(flag, name, "no such model folder")
    return name


def load_classifier(
    name: str,
    label_names: Sequence[str] | None = None,
    *,
    flag: str = "model",
    pad_token_id: int | None = None,
):
    """A sequence classifier in float32 from any checkpoint ``AutoModelForSequenceClassification`` loads
    after ``import upcycle`` (an upcycled folder, a dense hub id or folder, a native Mixtral / Qwen2-MoE
    export, or an already fine-tuned classifier).

    ``label_names`` sets a fresh head's labels (id2label/label2id); None keeps the checkpoint's (an
    evaluation of a fine-tuned model). A model without a pad token gets ``pad_token_id`` or its EOS id:
    GPT-2 has none, and batched classification needs one.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import upcycle.models  # noqa: F401  (registers the MoE model types)

    source = model_source(name, flag=flag)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config of '{name}': {first_line(exc)}") from exc
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    # getattr: transformers 5 configs of some architectures (CodeGen) have no pad/eos attribute at all.
    if getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        config.pad_token_id = pad_token_id if pad_token_id is not None else eos
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=torch.float32)
    except ValueError as exc:  # an architecture without a sequence-classification class
        raise UserError(
            f"'{name}' ({config.model_type}) cannot be loaded for sequence classification: {first_line(exc)}"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot load the weights of '{name}': {first_line(exc)}") from exc
    return model


__all__ = ["first_line", "load_classifier", "looks_like_path", "model_source"]
