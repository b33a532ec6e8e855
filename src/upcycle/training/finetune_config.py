"""FinetuneConfig: every option of ``upcycle finetune``, validated early, saved with the run.

Defaults follow Hugging Face's ``examples/pytorch/text-classification/run_xnli.py`` run as its README
shows it (max length 128, learning rate 5e-5, 2 epochs, batch 32) with ``TrainingArguments``' own
defaults for what that command leaves unset: AdamW β = (0.9, 0.999), ε = 1e-8, no weight decay, no
warm-up, linear decay to 0, gradient clipping at 1.0. The founding report gives no fine-tuning
hyperparameters; these are the commonest published XNLI recipe, so results compare with other work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from upcycle.config import ConfigError, check_literals, check_positive, from_dict, to_dict
from upcycle.training.config import Precision, Schedule, check_run_exists, resolve_paths

Freeze = Literal["none", "router", "experts", "moe", "non-moe"]

#: Fields that shape the model or the example stream a checkpoint was built with: fixed after the start.
FIXED_ON_RESUME = (
    "model",
    "tokenizer",
    "data",
    "train_languages",
    "text_fields",
    "label_field",
    "label_names",
    "train_split",
    "max_length",
    "batch_size",
    "group_by_length",
    "seed",
    "freeze",
)
#: Options holding a file or folder (stored as absolute paths in config.yaml).
PATH_FIELDS = ("model", "tokenizer", "data", "out")


@dataclass
class FinetuneConfig:
    """Options of ``upcycle finetune``: sequence classification (XNLI by default) of MoE and dense models."""

    model: str | None = None
    """Model to fine-tune: an upcycled folder, a pretrain run's final/ (or a checkpoint), a dense hub id or
    folder (gpt2), or a native Mixtral / Qwen2-MoE export: anything AutoModelForSequenceClassification
    loads after `import upcycle`. A fresh classification head is added."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: the model's own (GPT-2's, built offline, for GPT-2 models
    without tokenizer files)."""
    data: str = "facebook/xnli"
    """Hub dataset id, or a local folder laid out like the hub repository (one sub-folder per language
    holding train-*.parquet, validation-*.parquet, test-*.parquet, or .jsonl files with those names)."""
    train_languages: str = "en"
    """Languages (dataset configurations) to train on, concatenated and shuffled: 'fr', 'en,fr,es' or
    'all' (XNLI's 15); 'none' for a dataset without configurations. Default: English, XNLI's zero-shot
    cross-lingual protocol."""
    text_fields: str = "premise,hypothesis"
    """Text column(s), comma-separated: two for sentence pairs (joined by the separator, see README),
    one for single-text tasks."""
    label_field: str = "label"
    """Column holding the label (integer id or name)."""
    label_names: str | None = None
    """Names of the label ids, comma-separated (stored in the model config as id2label); default: the
    dataset's class names, XNLI's (entailment, neutral, contradiction) for 3 integer classes."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "validation"
    """Split of each train language validated on during training (XNLI's protocol: select on the train
    language's dev set); 'none' disables validation (and best/)."""
    eval_examples: int | None = None
    """Validate on at most this many examples per language (the first ones); default: all."""
    max_length: int = 128
    """Longest input in tokens; longer pairs are truncated longest-first (run_xnli.py: 128)."""
    batch_size: int = 32
    """Examples per micro-batch per process (run_xnli.py: 32)."""
    eval_batch_size: int | None = None
    """Examples per validation batch (default: 2 × batch-size; no gradients to keep)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch-size × grad-accum ×
    processes)."""
    epochs: float = 2.0
    """Passes over the training data (run_xnli.py: 2); ignored when --steps is given."""
    steps: int | None = None
    """Optimizer steps to train for (the total, also when resuming); overrides --epochs."""
    lr: float = 5e-5
    """Peak learning rate (AdamW; run_xnli.py: 5e-5)."""
    min_lr: float = 0.0
    """Final learning rate of the decay (Hugging Face Trainer: linear decay to 0)."""
    warmup: int = 0
    """Linear warm-up steps from 0 to lr (Trainer default: none)."""
    schedule: Schedule = "linear"
    """Learning-rate decay after warm-up: linear (Trainer default) | cosine | constant."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (Trainer default 0)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2 (Trainer default)."""
    eps: float = 1e-8
    """AdamW ε."""
    clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping; the norm is still logged)."""
    precision: Precision = "fp32"
    """fp32 | bf16 | fp16 (mixed precision via Accelerate; weights and optimizer stay fp32)."""
    aux_loss_weight: float | None = None
    """MoE models: weight of the load-balancing loss added to the task loss, which keeps training the
    router (0 allowed); default: the model's own (convert's --aux-loss-weight)."""
    z_loss_weight: float | None = None
    """MoE models: weight of the router z-loss; default: the model's own."""
    freeze: Freeze = "none"
    """MoE models: parameters kept fixed: none | router | experts | moe (router and experts) | non-moe
    (everything outside the MoE layers except the new classification head). ST-MoE (Zoph et al. 2022)
    found this choice changes fine-tuning quality."""
    group_by_length: bool = True
    """Batch examples of similar length together (each batch is padded to its own longest row)."""
    eval_every: int | None = None
    """Validate every N steps (and at the start and the end); default: once per epoch; 0: only at the
    start and the end."""
    save_every: int = 500
    """Write a checkpoint every N steps (and at the end, at each new best, and on SIGTERM/SIGINT); 0:
    only those."""
    keep_last: int = 2
    """Keep only the newest N checkpoints (0 keeps all) besides the best one."""
    log_every: int = 10
    """Log training metrics every N steps (metrics.jsonl, TensorBoard, W&B, terminal)."""
    seed: int = 42
    """Seed of the classification head's init, the example order, dropout and router jitter."""
    out: str | None = None
    """Run folder: checkpoints/, best/, final/, metrics.jsonl, config.yaml, TensorBoard logs."""
    resume: bool = False
    """Continue from the newest complete checkpoint in --out (start fresh if there is none)."""
    overwrite: bool = False
    """Delete a previous run in --out and start over."""
    skip_nonfinite: bool = False
    """Skip optimizer steps whose loss or gradient norm is not finite (counted in the log) instead of
    stopping the run."""
    tensorboard: bool = True
    """Write TensorBoard logs to RUN_DIR/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (pip install 'upcycle[wandb]'); resumed runs continue the same W&B run."""
    wandb_project: str = "upcycle"
    """Weights & Biases project name."""
    cpu_keep_memory: bool = True
    """On CPU with glibc (Linux): keep freed memory in the process so each step reuses its pages
    (upcycle.training.memory)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display: a rich bar on a terminal and plain log lines otherwise (auto), or forced."""

    def __post_init__(self) -> None:
        for name in ("text_fields", "label_names", "train_languages"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # a YAML list is as good as a comma-separated string
                setattr(self, name, ",".join(str(v) for v in value))
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        for name in ("max_length", "batch_size", "grad_accum", "log_every"):
            _check_int(self, name, minimum=1)
        for name in ("steps", "eval_examples", "eval_batch_size"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        for name in ("warmup", "save_every", "keep_last"):
            _check_int(self, name, minimum=0)
        if self.eval_every is not None:
            _check_int(self, "eval_every", minimum=0)
        _check_int(self, "seed", minimum=None)
        check_positive(self, "lr", "eps", "epochs")
        check_positive(
            self, "min_lr", "weight_decay", "clip", "aux_loss_weight", "z_loss_weight", allow_zero=True
        )
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", self.min_lr, f"must be ≤ lr ({self.lr})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(name, value, "must be in [0, 1)")
        if self.steps is not None and self.warmup > self.steps:
            raise ConfigError("warmup", self.warmup, f"must be ≤ steps ({self.steps})")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", True, "cannot be combined with --resume")
        for name in ("data", "train_languages", "label_field", "train_split", "eval_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(name, value, "must be a non-empty string")
        fields = self.text_field_list
        if not fields or len(set(fields)) != len(fields):
            raise ConfigError(
                "text_fields", self.text_fields, "give one or more distinct column names, comma-separated"
            )
        if self.label_names is not None and len(self.label_name_list) < 2:
            raise ConfigError("label_names", self.label_names, "give two or more names, comma-separated")

    def check_runnable(self) -> None:
        """The fields a run needs that have no default."""
        if not self.out:
            raise ConfigError("out", self.out, "give the run folder with --out RUN_DIR")
        check_run_exists(self)
        if not self.model:
            raise ConfigError(
                "model",
                self.model,
                "give an upcycled folder, a pretrain run's final/, a dense hub id or folder (gpt2), or a "
                "Mixtral / Qwen2-MoE export",
            )

    # ------------------------------------------------------------------ resolved values
    @property
    def text_field_list(self) -> list[str]:
        return [f.strip() for f in str(self.text_fields).split(",") if f.strip()]

    @property
    def label_name_list(self) -> list[str] | None:
        if self.label_names is None:
            return None
        return [n.strip() for n in str(self.label_names).split(",") if n.strip()]

    @property
    def validates(self) -> bool:
        return self.eval_split.strip().lower() != "none"

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    @property
    def resolved_min_lr(self) -> float:
        return self.min_lr

    def resolved(self) -> FinetuneConfig:
        """What config.yaml records: local paths made absolute (so --resume works from any directory)."""
        return resolve_paths(self, PATH_FIELDS)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        return from_dict(cls, data)


def _check_int(cfg, name: str, minimum: int | None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = "must be an integer" if minimum is None else f"must be an integer ≥ {minimum}"
        raise ConfigError(name, value, allowed)


__all__ = ["FIXED_ON_RESUME", "FinetuneConfig", "Freeze"]


def resolve_languages(cfg: FinetuneConfig) -> list[str | None]:
    """The train languages (dataset configurations) in the order given; [None] for 'none'. Light (no
    torch): ``upcycle finetune``'s check runs it before anything heavy is imported."""
    from pathlib import Path

    from upcycle.data.xnli import XNLI_HUB, XNLI_LANGUAGES, is_local, parse_languages

    spec = cfg.train_languages.strip()
    if spec.lower() == "none":
        return [None]
    if not is_local(cfg.data):
        allowed = XNLI_LANGUAGES if cfg.data == XNLI_HUB else None
        return parse_languages(spec, field="train_languages", allowed=allowed)
    root = Path(cfg.data).expanduser()
    if not root.is_dir():
        raise ConfigError("data", cfg.data, "no such folder (give a hub id or a local hub-layout folder)")
    there = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    ordered = [lang for lang in XNLI_LANGUAGES if lang in there] + sorted(set(there) - set(XNLI_LANGUAGES))
    if spec == "all":
        if not ordered:
            raise ConfigError("train_languages", spec, f"{cfg.data} has no language folders")
        return ordered
    languages = parse_languages(spec, field="train_languages", allowed=None)
    for lang in languages:
        if lang not in there:
            hint = (
                "" if ordered else " (use --train-languages none for a folder without language sub-folders)"
            )
            # A typo of an XNLI code names the 15 codes too (issue 12), not only the folder's contents.
            unknown = (
                ""
                if lang in XNLI_LANGUAGES
                else f"unknown language; XNLI's are {', '.join(XNLI_LANGUAGES)}; "
            )
            raise ConfigError(
                "train_languages",
                lang,
                f"{unknown}{cfg.data} has no folder for it; it has {', '.join(ordered) or 'none'}{hint}",
            )
    return languages
