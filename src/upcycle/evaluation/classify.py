"""Classification accuracy of a fine-tuned decoder-only classifier, fast and with the right pooling.

Speed (issue 12): examples are sorted by length and batched with their neighbours, so a batch is padded
only to its own longest row instead of to 128 tokens as transformers' ``run_xnli.py`` does (English,
French and Spanish pairs average about 53 GPT-2 tokens, so padding to 128 computes 2.4× the real
tokens; length grouping computes 1.002× on XNLI's 5,010 examples per language; benchmarks/
finetune_eval.py). Forward passes run under ``torch.inference_mode``; predictions are put back in the
dataset's order.

Pooling. Hugging Face's decoder classifiers pool the score at "the rightmost token that is not the pad
id". With pad = EOS (GPT-2 has no pad token) that is wrong for every row whose last real token is an
EOS: an empty hypothesis leaves the separator EOS last, and any text may contain ``<|endoftext|>``
(transformers issues #35352, #35909). We capture the classification head's per-position scores with a
forward hook and take the score at the last real token from the attention mask
(:func:`upcycle.data.xnli.last_token_index`), which is right for right or left padding whatever the
tokens are. For a model without a ``score`` head we use the model's own pooled logits, and only after
checking that no row ends with the pad id (where the two agree under right padding).

Shape legend: B batch, S sequence, C classes, N examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from upcycle.config import ConfigError, UserError
from upcycle.data.xnli import pad_batch
from upcycle.models.pooling import sequence_logits


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Example indices in batches of ``batch_size`` neighbours in length, longest first (an
    out-of-memory error shows in the first batch, and the progress bar's ETA errs on the safe side)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Predictions:
    """Logits of every example in the dataset's order, and what it cost."""

    logits: np.ndarray
    """(N, C) float32 class scores at each example's last real token."""
    real_tokens: int
    """Tokens in the examples."""
    computed_tokens: int
    """Tokens the forward passes computed (real + padding)."""
    seconds: float

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(-1)


def predict(
    model,
    rows: Sequence[list[int]],
    pad_id: int,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Predictions:
    """Class scores of every row (token ids), batched by length; ``on_batch(n)`` after each batch."""
    if any(len(r) == 0 for r in rows):
        raise UserError("an example has no tokens (empty texts): nothing to classify")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    lengths = [len(r) for r in rows]
    logits_NC: np.ndarray | None = None
    computed = 0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for idx in length_batches(lengths, batch_size):
                ids_BS, mask_BS = pad_batch([rows[i] for i in idx], pad_id, side="right")
                # The same pooling as fine-tuning (upcycle.models.pooling): the last real token by mask.
                logits_BC, _ = sequence_logits(model, ids_BS.to(device), mask_BS.to(device))
                out_BC = logits_BC.float().cpu().numpy()
                if logits_NC is None:
                    logits_NC = np.empty((len(rows), out_BC.shape[1]), dtype=np.float32)
                logits_NC[idx] = out_BC
                computed += ids_BS.numel()
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    if logits_NC is None:
        logits_NC = np.zeros((0, int(getattr(model.config, "num_labels", 0))), dtype=np.float32)
    return Predictions(logits_NC, sum(lengths), computed, time.perf_counter() - start)


def class_to_label(model_config, dataset_labels: Sequence[str]) -> np.ndarray:
    """Map the model's class index to the dataset's label id: by name when the fine-tuned model kept the
    names (finetune stores them in id2label), by position when it has Hugging Face's generic LABEL_i."""
    id2label = {int(k): str(v) for k, v in (getattr(model_config, "id2label", None) or {}).items()}
    n_model = int(getattr(model_config, "num_labels", len(id2label)))
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n_model)]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if n_model != len(dataset_labels):
        raise ConfigError(
            "label_field",
            ", ".join(dataset_labels),
            f"the dataset has {len(dataset_labels)} classes but the model predicts {n_model} ({', '.join(names)})",
        )
    if generic or names == list(dataset_labels):
        return np.arange(n_model)
    if sorted(names) != sorted(dataset_labels):
        raise ConfigError(
            "label_field",
            ", ".join(dataset_labels),
            f"the model's labels are {', '.join(names)}; they differ from the dataset's",
        )
    return np.array([list(dataset_labels).index(n) for n in names])


def labels_as_ids(values: Sequence, dataset_labels: Sequence[str]) -> np.ndarray:
    """Dataset labels as integer ids (string labels by their position in ``dataset_labels``)."""
    if values and isinstance(values[0], str):
        index = {n: i for i, n in enumerate(dataset_labels)}
        return np.array([index[v] for v in values])
    return np.asarray(values, dtype=np.int64)


# --------------------------------------------------------------------------- one model on every language


@dataclass
class LanguageData:
    """One language's examples: its texts (one list per text field) and label ids."""

    texts: list[list[str]]
    labels: np.ndarray


@dataclass
class LanguageResult:
    """One model on one language."""

    correct: np.ndarray
    """(N,) bool: the prediction equals the label, in the dataset's order (the paired tests use it)."""
    real_tokens: int
    computed_tokens: int
    seconds: float

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else float("nan")


def load_languages(cfg, languages: Sequence[str]) -> tuple[dict[str, LanguageData], list[str]]:
    """Every language's split, read and checked before any model is loaded (a missing language or
    column fails in a second, not after the first model's evaluation). Returns (data, label names)."""
    from upcycle.data.xnli import check_fields, label_names, load_split

    data, split, fields = cfg.resolved_data, cfg.resolved_split, cfg.text_field_list
    out: dict[str, LanguageData] = {}
    names: list[str] | None = None
    for lang in languages or [None]:
        ds = load_split(data, lang, split, field="data")
        where = f"{data}" + (f" ({lang}, {split})" if lang else f" ({split})")
        check_fields(ds, fields, cfg.label_field, where=where)
        names = names or label_names(ds, cfg.label_field)
        labels = labels_as_ids(ds[cfg.label_field], names)
        keep = labels >= 0  # unlabelled rows (-1, as in MNLI's test split) cannot be scored
        if not keep.any():
            raise ConfigError("split", split, f"{where} has no labelled examples")
        texts = [[t for t, k in zip(ds[f], keep) if k] for f in fields]
        if cfg.limit is not None:
            texts, labels = [t[: cfg.limit] for t in texts], labels[keep][: cfg.limit]
        else:
            labels = labels[keep]
        out[lang or "all"] = LanguageData(texts, labels)
    return out, list(names or [])


def evaluate_classifier(
    model,
    tokenizer,
    data: dict[str, LanguageData],
    dataset_labels: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device,
    progress=None,
) -> dict[str, LanguageResult]:
    """Accuracy of ``model`` on each language; ``progress(lang, n_done)`` after each batch."""
    from upcycle.data.xnli import PairFormat, encode_examples

    fmt = PairFormat.for_tokenizer(tokenizer, max_length)
    model_pad = getattr(model.config, "pad_token_id", None)
    pad_id = int(model_pad if model_pad is not None else fmt.pad_id)
    to_label = class_to_label(model.config, dataset_labels)
    results = {}
    for lang, part in data.items():
        rows = encode_examples(tokenizer, part.texts, fmt)  # one text field: the text alone, truncated
        preds = predict(
            model,
            rows,
            pad_id,
            batch_size=batch_size,
            device=device,
            on_batch=None if progress is None else (lambda n, lang=lang: progress(lang, n)),
        )
        correct = to_label[preds.predicted] == part.labels
        results[lang] = LanguageResult(correct, preds.real_tokens, preds.computed_tokens, preds.seconds)
    return results


__all__ = [
    "LanguageData",
    "LanguageResult",
    "Predictions",
    "class_to_label",
    "evaluate_classifier",
    "labels_as_ids",
    "length_batches",
    "load_languages",
    "predict",
]
