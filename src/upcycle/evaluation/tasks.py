"""The evaluations ``upcycle evaluate`` runs, one model in memory at a time: fine-tuned classifiers on
every language (xnli, classification) and held-out language modelling (lm). lm-evaluation-harness tasks
are in :mod:`upcycle.evaluation.harness`. Each returns {model name: results.json entry} plus, for the
paired tests, every example's correct flag per model and language.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from upcycle.config import UserError
from upcycle.evaluation.config import EvaluateConfig

#: Hub configuration of a text dataset when --data-config is not given (as ``upcycle pretrain``).
TEXT_DATA_CONFIG = {"allenai/c4": "en"}


def resolve_device(spec: str):
    """--device: auto (the first GPU if there is one, else the CPU) or a torch device that exists."""
    import torch

    from upcycle.config import ConfigError

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "allowed values are auto, cpu, cuda, cuda:N, mps"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError("device", spec, allowed) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", spec, "no CUDA GPU is available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", spec, "MPS is not available; use auto or cpu")
    return device


class Progress:
    """A rich progress bar over one model's examples on a terminal; one line per language always."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)
            enabled = self.console.is_terminal
        self.use_bar = enabled

    def start(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a bar; returns ``advance(n)``."""
        if not self.use_bar:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        task = self.bar.add_task(description, total=total)
        self.bar.start()
        return lambda n: self.bar.update(task, advance=n)

    def describe(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], description=description)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """Warnings show also without progress output."""
        if self.bar is not None:
            self.bar.console.print(f"warning: {text}", markup=False, highlight=False)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def release_memory() -> None:
    """Free a deleted model's memory before the next one is loaded (one model in memory at a time)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def saved_architecture(path: str) -> str | None:
    """The class a checkpoint was saved from (config.json's ``architectures``), None if unknown."""
    from transformers import AutoConfig

    from upcycle.models.loading import model_source

    try:
        archs = getattr(AutoConfig.from_pretrained(model_source(path, flag="models")), "architectures", None)
    except Exception:  # unreadable: load_classifier reports it in its own words
        return None
    return archs[0] if archs else None


def load_for_classification(path: str, dataset_labels, progress: Progress):
    """A fine-tuned classifier keeps its labels. A checkpoint saved as a causal LM gets a fresh head
    with the dataset's labels, and a warning: its accuracy means nothing, which a user should hear
    before reading a table."""
    from upcycle.models.loading import load_classifier

    arch = saved_architecture(path)
    if arch is None or arch.endswith("ForSequenceClassification"):
        return load_classifier(path, flag="models")
    model = load_classifier(path, label_names=list(dataset_labels), flag="models")
    progress.warn(
        f"{path} was saved as {arch}, not a fine-tuned classifier: its classification head is "
        "untrained (fine-tune it first with `upcycle finetune`)"
    )
    return model


# --------------------------------------------------------------------------- xnli / classification


def classification_models(cfg: EvaluateConfig, names: list[str]) -> tuple[dict, dict]:
    """Each model on each language: ({name: entry}, {name: {language: correct flags}})."""
    from upcycle.data.tokenizers import load_tokenizer
    from upcycle.data.xnli import XNLI_LANGUAGES, parse_languages, report_order
    from upcycle.evaluation.classify import evaluate_classifier, load_languages
    from upcycle.evaluation.results import accuracy_entry

    allowed = XNLI_LANGUAGES if cfg.task == "xnli" else None
    languages = parse_languages(cfg.languages, field="languages", allowed=allowed)
    if cfg.task == "xnli":  # the report's column order whatever --languages lists (issue 12)
        languages = report_order(languages)
    data, dataset_labels = load_languages(cfg, languages)
    device = resolve_device(cfg.device)
    progress = Progress(cfg.progress)
    results, correct = {}, {}
    for name, path in zip(names, cfg.models):
        model = load_for_classification(path, dataset_labels, progress).to(device)
        tokenizer = load_tokenizer(cfg.tokenizer or path, model_config=model.config)
        advance = progress.start(name, sum(len(d.labels) for d in data.values()))

        def on_batch(lang: str, n: int, name=name, advance=advance) -> None:
            progress.describe(f"{name} {lang}")
            advance(n)

        start = time.perf_counter()
        try:
            per_lang = evaluate_classifier(
                model,
                tokenizer,
                data,
                dataset_labels,
                max_length=cfg.max_length,
                batch_size=cfg.batch_size,
                device=device,
                progress=on_batch,
            )
        finally:
            progress.stop()
        mean = sum(r.accuracy for r in per_lang.values()) / len(per_lang)
        n_all, seconds = sum(r.n for r in per_lang.values()), sum(r.seconds for r in per_lang.values())
        progress.line(
            f"{name}: average {100 * mean:.2f} % over {len(per_lang)} languages "
            f"({n_all:,} examples in {seconds:.1f} s)"
        )
        correct[name] = {lang: r.correct for lang, r in per_lang.items()}
        real = sum(r.real_tokens for r in per_lang.values())
        computed = sum(r.computed_tokens for r in per_lang.values())
        results[name] = accuracy_entry(
            path,
            cfg.task,
            correct[name],
            data=cfg.resolved_data,
            split=cfg.resolved_split,
            seconds=round(time.perf_counter() - start, 3),
            tokens={"real": real, "computed": computed},
        )
        del model
        release_memory()
    return results, correct


# --------------------------------------------------------------------------- lm


def _text_batches(cfg: EvaluateConfig, tokenizer, seq_len: int, advance) -> Iterator:
    import torch

    from upcycle.data.packing import PackedBlocks
    from upcycle.data.sources import DocumentStream, resolve_source

    config = cfg.data_config if cfg.data_config is not None else TEXT_DATA_CONFIG.get(cfg.data)
    spec = resolve_source(cfg.data, config, cfg.resolved_split, cfg.text_field_list[0], field="data")
    blocks = PackedBlocks(DocumentStream(spec, loop=False, field="data"), tokenizer, seq_len)
    left = cfg.limit if cfg.limit is not None else math.inf
    while left > 0:
        batch = blocks.next_round(int(min(cfg.batch_size, left)))
        if batch is None:
            return
        left -= batch.shape[0]
        advance(batch.shape[0])
        yield torch.from_numpy(np.asarray(batch)).long()


def load_causal_lm(path: str):
    """A causal LM in float32 (any model AutoModelForCausalLM loads after ``import upcycle``); the
    package's one loader, with ``--models`` named in its errors."""
    from upcycle.models.loading import load_causal_lm as load

    return load(path, flag="models", presets=False)


def lm_models(cfg: EvaluateConfig, names: list[str]) -> tuple[dict, dict]:
    """Held-out loss, perplexity and next-token accuracy of each model on --data (upcycle.evaluation.lm)."""
    from upcycle.data.tokenizers import load_tokenizer
    from upcycle.evaluation.lm import evaluate_lm

    device = resolve_device(cfg.device)
    progress = Progress(cfg.progress)
    results = {}
    for name, path in zip(names, cfg.models):
        model = load_causal_lm(path).to(device)
        tokenizer = load_tokenizer(cfg.tokenizer or path, model_config=model.config)
        context = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 1024
        )
        seq_len = cfg.seq_len or min(1024, int(context))
        advance = progress.start(f"{name} blocks", cfg.limit)
        try:
            res = evaluate_lm(model, _text_batches(cfg, tokenizer, seq_len, advance), device=device)
        finally:
            progress.stop()
        if res.tokens == 0:
            raise UserError(f"--data {cfg.data} holds fewer than one block of {seq_len} tokens (--seq-len)")
        progress.line(
            f"{name}: loss {res.loss:.4f}, perplexity {res.perplexity:.3f}, accuracy {res.accuracy:.4f}"
        )
        results[name] = {
            "path": str(path),
            "task": "lm",
            "loss": res.loss,
            "perplexity": res.perplexity,
            "accuracy": res.accuracy,
            "tokens": res.tokens,
            "seq_len": seq_len,
            "data": cfg.data,
        }
        del model
        release_memory()
    return results, {}


__all__ = [
    "Progress",
    "classification_models",
    "lm_models",
    "load_causal_lm",
    "release_memory",
    "resolve_device",
]
