"""EvaluateConfig: every option of ``upcycle evaluate``, validated before any model is loaded.

One entry point for the three kinds of evaluation (issue 12): fine-tuned classifiers on XNLI (or any
sentence-pair / single-text classification set), held-out language modelling, and zero-shot tasks of
lm-evaluation-harness. Field docstrings are the CLI help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from upcycle.config import ConfigError, check_literals, from_dict, to_dict
from upcycle.data.xnli import XNLI_HUB

#: ``--task`` values besides ``lm-eval:<task name>``.
TASKS = ("xnli", "classification", "lm")
LM_EVAL_PREFIX = "lm-eval:"
#: Default split per task: XNLI reports test accuracy (the founding report's Tables 2 and 3); held-out
#: text is a validation split (C4's, as ``upcycle pretrain`` evaluates on).
DEFAULT_SPLIT = {"xnli": "test", "classification": "test", "lm": "validation"}


@dataclass
class EvaluateConfig:
    """Options of ``upcycle evaluate``: XNLI tables, held-out perplexity, lm-eval zero-shot tasks."""

    models: list[str] | None = None
    """Model folders or hub ids (a fine-tuned classifier for xnli/classification, a causal LM for lm and
    lm-eval:*); evaluated one after another, one in memory at a time."""
    task: str = "xnli"
    """xnli (the 15 XNLI languages), classification (any labelled text set; --languages are its
    configurations), lm (perplexity and next-token accuracy on --data), or lm-eval:TASK (any
    lm-evaluation-harness task or group, e.g. lm-eval:xnli)."""
    data: str | None = None
    """Dataset: hub id or local folder laid out like the hub repository (default facebook/xnli for xnli);
    for lm a text source (hub id, or local JSON lines / Parquet / text); for lm-eval:xnli a local
    XNLI-layout folder replaces the hub data (facebook/xnli, or no --data: lm-eval reads the hub; other
    lm-eval tasks read their own)."""
    data_config: str | None = None
    """Hub configuration of --data for --task lm (default 'en' for allenai/c4)."""
    languages: str = "all"
    """'all' or comma-separated language codes (xnli: en ar bg de el es fr hi ru sw th tr ur vi zh);
    for classification the dataset's configuration names ('none' for a dataset without any)."""
    split: str | None = None
    """Split to evaluate: default test for xnli/classification, validation for lm. Refused with lm-eval
    tasks, which score the split their definition names (lm-eval:xnli: validation)."""
    names: list[str] | None = None
    """Names of the models in the tables, one per model, space- or comma-separated (default: their folder
    names, made unique)."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: each model's own (GPT-2's, built offline, for GPT-2 models
    without tokenizer files)."""
    text_fields: str | None = None
    """Comma-separated text columns: two for sentence pairs (joined by the separator), one for single
    texts (default premise,hypothesis; for --task lm: text)."""
    label_field: str = "label"
    """Column holding the integer (or string) label."""
    max_length: int = 128
    """Tokens per example after longest-first truncation (128, as the models were fine-tuned)."""
    batch_size: int = 64
    """Examples per forward pass (classification; rows of similar length are batched together), blocks
    per batch (lm) or lm-eval's batch size."""
    seq_len: int | None = None
    """Tokens per block for --task lm (default: min(1024, the model's context))."""
    limit: int | None = None
    """Evaluate at most this many examples per language (classification), blocks (lm) or documents per
    task (lm-eval); default all."""
    num_fewshot: int = 0
    """In-context examples for lm-eval tasks (0: zero-shot)."""
    lm_eval_include: str | None = None
    """Folder of extra lm-evaluation-harness task YAMLs (lm-eval's include_path); they override built-in
    tasks of the same name."""
    baseline: str | None = None
    """Model (by name) that the others are compared with in the paired tests (default: the first)."""
    bootstrap: int = 1000
    """Paired-bootstrap resamples for the confidence interval of each accuracy difference (0: none)."""
    seed: int = 0
    """Seed of the paired bootstrap."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps, or auto (the first GPU if there is one)."""
    out: str | None = None
    """Results folder: results.json, results.csv, results.md (written atomically)."""
    overwrite: bool = False
    """Replace an existing results folder."""
    progress: bool = True
    """Show a progress bar on a terminal (plain per-language lines otherwise)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        if not (self.task in TASKS or self.is_lm_eval):
            raise ConfigError(
                "task",
                self.task,
                f"allowed values are {', '.join(TASKS)} or lm-eval:TASK (e.g. lm-eval:xnli)",
            )
        if self.is_lm_eval and not self.lm_eval_task:
            raise ConfigError("task", self.task, "name an lm-eval task after the colon, e.g. lm-eval:xnli")
        if self.is_lm_eval and self.split is not None:
            raise ConfigError(
                "split",
                self.split,
                "lm-eval tasks score the split their definition names (lm-eval:xnli: validation); "
                "leave --split out",
            )
        for name in ("max_length", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("seq_len", "limit"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("num_fewshot", "bootstrap", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be an integer ≥ 0")
        if self.max_length < 3:
            raise ConfigError("max_length", self.max_length, "must be ≥ 3 (two segments and a separator)")
        fields = self.text_field_list
        if not 1 <= len(fields) <= (1 if self.task == "lm" else 2) or len(set(fields)) != len(fields):
            allowed = "give the text column" if self.task == "lm" else "give one or two distinct column names"
            raise ConfigError("text_fields", self.text_fields, allowed)
        if not isinstance(self.label_field, str) or not self.label_field:
            raise ConfigError("label_field", self.label_field, "must be a column name")
        if self.lm_eval_include is not None and not Path(self.lm_eval_include).expanduser().is_dir():
            raise ConfigError("lm_eval_include", self.lm_eval_include, "no such folder")

    def check_runnable(self) -> None:
        """The values a run needs that have no default, and those that depend on each other."""
        if not self.models:
            raise ConfigError("models", self.models, "give at least one model folder or hub id")
        if not self.out:
            raise ConfigError("out", self.out, "give the results folder with --out DIR")
        if self.task == "lm" and not self.data:
            raise ConfigError("data", self.data, "--task lm needs held-out text: a hub id or a local file")
        if self.task == "classification" and not self.data:
            raise ConfigError("data", self.data, "--task classification needs a dataset (hub id or folder)")
        if self.names is not None and len(self.names) != len(self.models):
            raise ConfigError(
                "names",
                self.names,
                f"give one name per model ({len(self.models)} models, {len(self.names)} names)",
            )
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ConfigError("names", self.names, "names must be different")

    # ------------------------------------------------------------------ resolved values
    @property
    def is_lm_eval(self) -> bool:
        return isinstance(self.task, str) and self.task.startswith(LM_EVAL_PREFIX)

    @property
    def lm_eval_task(self) -> str:
        return self.task[len(LM_EVAL_PREFIX) :].strip() if self.is_lm_eval else ""

    @property
    def text_field_list(self) -> list[str]:
        spec = self.text_fields
        if spec is None:
            spec = "text" if self.task == "lm" else "premise,hypothesis"
        return [f.strip() for f in str(spec).split(",") if f.strip()]

    @property
    def resolved_data(self) -> str | None:
        return self.data if self.data is not None or self.task != "xnli" else XNLI_HUB

    @property
    def resolved_split(self) -> str:
        return self.split if self.split is not None else DEFAULT_SPLIT.get(self.task, "test")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvaluateConfig:
        return from_dict(cls, data)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "must be a positive integer")


__all__ = ["DEFAULT_SPLIT", "LM_EVAL_PREFIX", "TASKS", "EvaluateConfig"]
