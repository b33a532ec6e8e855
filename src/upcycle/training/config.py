"""PretrainConfig: every option of ``upcycle pretrain``, validated early, saved with the run.

Options resolve as defaults < the run's saved ``config.yaml`` (with ``--resume``) < the YAML file given
with ``--config`` < flags. Field docstrings are the CLI help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from upcycle.config import ConfigError, check_literals, check_positive, from_dict, to_dict

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]

#: The hub default of the founding report: C4's English split, streamed.
DEFAULT_DATA = "allenai/c4"
DEFAULT_DATA_CONFIG = {"allenai/c4": "en"}

#: Fields that shape the data stream (or the model) a checkpoint was built with: fixed after the start.
FIXED_ON_RESUME = (
    "model",
    "tokenizer",
    "data",
    "data_config",
    "data_split",
    "text_field",
    "seq_len",
    "shuffle_buffer",
    "seed",
)
#: Options holding a file or folder (stored as absolute paths in config.yaml).
PATH_FIELDS = ("model", "tokenizer", "data", "eval_data", "out")


@dataclass
class PretrainConfig:
    """Options of ``upcycle pretrain``: continued pretraining of MoE and dense causal LMs."""

    model: str | None = None
    """An upcycled MoE folder, a dense hub id or folder (the dense baseline), or a model preset for
    training from scratch (debug, debug-moe, debug-llama, gpt2-small, gpt2-small-moe)."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: the model's own (GPT-2's, built offline, for GPT-2 models
    without tokenizer files). 'gpt2-offline' builds GPT-2's without the Hub."""
    data: str = DEFAULT_DATA
    """Training text: a hub dataset id (streamed), or a local file or folder of JSON lines, Parquet or
    plain text (one document per line)."""
    data_config: str | None = None
    """Hub dataset configuration (default 'en' for allenai/c4)."""
    data_split: str = "train"
    """Hub dataset split to train on."""
    text_field: str = "text"
    """Column holding the document text."""
    eval_data: str | None = None
    """Held-out text: hub id or local file/folder; default: the validation split of a hub --data (C4
    validation), none for local data; 'none' disables evaluation."""
    eval_split: str = "validation"
    """Hub split of --eval-data."""
    seq_len: int = 1024
    """Tokens per training sequence (documents are packed into blocks of this length, EOS between)."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch-size × grad-accum ×
    processes)."""
    steps: int = 1000
    """Optimizer steps to train for (the total, also when resuming)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW). 2e-4 is Drop-Upcycling's MoE peak (Nakamura et al. 2025, App. B)."""
    min_lr: float | None = None
    """Final learning rate of the cosine/linear decay (default lr / 10)."""
    warmup: int | None = None
    """Linear warm-up steps from 0 to lr (default: 1 % of --steps)."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warm-up: cosine | linear | constant."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices (not biases or norms)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping; the norm is still logged)."""
    precision: Precision = "fp32"
    """fp32 | bf16 | fp16 (mixed precision via Accelerate; weights and optimizer stay fp32)."""
    eval_every: int = 500
    """Evaluate every N steps (and at the start and the end); 0 disables periodic evaluation."""
    eval_batches: int = 50
    """Micro-batches of held-out data per evaluation (the same ones every time)."""
    save_every: int = 500
    """Write a checkpoint every N steps (and at the end, and on SIGTERM/SIGINT); 0: only those."""
    keep_last: int = 3
    """Keep only the newest N checkpoints (0 keeps all); older ones are pruned after a new one is
    complete."""
    log_every: int = 10
    """Log training metrics every N steps (metrics.jsonl, TensorBoard, W&B, terminal)."""
    seed: int = 42
    """Seed of the model init (presets), data shuffle, dropout and router jitter."""
    shuffle_buffer: int = 1000
    """Blocks in the seeded shuffle buffer (0 or 1: no shuffling)."""
    out: str | None = None
    """Run folder: checkpoints/, final/, metrics.jsonl, config.yaml, TensorBoard logs."""
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
    """On CPU with glibc (Linux): keep freed memory in the process so each step reuses its pages instead of
    page-faulting fresh ones (about 15 % faster steps on 2 cores; upcycle.training.memory)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display: a rich bar on a terminal and plain log lines otherwise (auto), or forced."""

    def __post_init__(self) -> None:
        self.validate()

    # Eager validation: a typo fails before the model is loaded, naming the flag (design notes, rule 3).
    def validate(self) -> None:
        check_literals(self)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "must be a positive integer")
        for name in ("warmup", "eval_every", "save_every", "keep_last", "shuffle_buffer"):
            value = getattr(self, name)
            if value is None and name == "warmup":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be an integer ≥ 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", self.seed, "must be an integer")
        check_positive(self, "lr", "eps")
        check_positive(self, "min_lr", "weight_decay", "clip", allow_zero=True)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError("min_lr", self.min_lr, f"must be ≤ lr ({self.lr})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(name, value, "must be in [0, 1)")
        if self.warmup is not None and self.warmup > self.steps:
            raise ConfigError("warmup", self.warmup, f"must be ≤ steps ({self.steps})")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", True, "cannot be combined with --resume")
        for name in ("data", "text_field", "data_split", "eval_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(name, value, "must be a non-empty string")

    def check_runnable(self) -> None:
        """The fields a run needs that have no default."""
        if not self.out:
            raise ConfigError("out", self.out, "give the run folder with --out RUN_DIR")
        check_run_exists(self)
        if not self.model:
            from upcycle.models.presets import PRESETS

            raise ConfigError(
                "model",
                self.model,
                "give an upcycled folder, a dense hub id or folder, or a preset "
                f"({', '.join(sorted(PRESETS))})",
            )

    # ------------------------------------------------------------------ resolved values
    @property
    def resolved_data_config(self) -> str | None:
        return self.data_config if self.data_config is not None else DEFAULT_DATA_CONFIG.get(self.data)

    @property
    def resolved_warmup(self) -> int:
        return round(0.01 * self.steps) if self.warmup is None else self.warmup

    @property
    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def resolved(self) -> PretrainConfig:
        """A copy with defaults that depend on other fields filled in and local paths made absolute (what
        config.yaml records, so --resume works from any directory)."""
        resolved = dataclasses.replace(
            self, data_config=self.resolved_data_config, min_lr=self.resolved_min_lr
        )
        return resolve_paths(resolved, PATH_FIELDS)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        return from_dict(cls, data)


def _absolute_if_path(value):
    """A local path made absolute (``upcycle.io.absolute_path``); hub ids, presets and None unchanged."""
    from upcycle.io import absolute_path, looks_like_path

    return absolute_path(value) if looks_like_path(value) else value


def resolve_paths(cfg, fields: tuple[str, ...]):
    """A copy of ``cfg`` with its path ``fields`` absolute (``out`` always) and the one-off switches off."""
    changes = {name: _absolute_if_path(getattr(cfg, name)) for name in fields if name != "out"}
    if cfg.out:
        changes["out"] = str(Path(cfg.out).expanduser().resolve())
    return dataclasses.replace(cfg, **changes, resume=False, overwrite=False)


def check_run_exists(cfg) -> None:
    """``--resume`` without ``--model`` needs a run to resume: say so instead of blaming --model."""
    run_dir = Path(cfg.out).expanduser()
    if cfg.resume and not cfg.model and not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise ConfigError("out", cfg.out, f"no run to resume: the folder {what}; start one with --model")


def check_resume_compatible(saved, current, fixed: tuple[str, ...] = FIXED_ON_RESUME) -> None:
    """On --resume, the fields that define the data stream (and model) must match the run's (local paths
    compared as absolute paths, so a run started elsewhere resumes from any directory)."""
    a_cfg, b_cfg = saved.resolved(), current.resolved()
    for name in fixed:
        a, b = getattr(a_cfg, name), getattr(b_cfg, name)
        if a != b:
            shown = getattr(current, name)
            raise ConfigError(name, shown, f"cannot change when resuming; the run in --out used {a!r}")
