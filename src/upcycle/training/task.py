"""What a training command brings to the shared engine (``upcycle.training.loop``): a small task object.

The engine owns everything both commands share: the Accelerator, the run folder, the optimizer, LR
schedule, gradient accumulation and clipping, non-finite checks, SIGTERM/SIGINT, checkpoints and exact
resume, metrics.jsonl / TensorBoard / W&B, the progress display, ``best/`` and ``final/``. A task
supplies the rest: the model and tokenizer, the training data and its resumable position, the loss and
the step's metrics, and the evaluation. ``upcycle pretrain`` is :class:`~upcycle.training.pretraining.
PretrainTask` (packed text, LM loss, held-out perplexity); ``upcycle finetune`` is
:class:`~upcycle.training.finetuning.FinetuneTask` (classification examples, cross-entropy at the last
real token, per-language validation accuracy). litgpt and torchtitan keep one trainer the same way and
vary the recipe, not the loop (design notes).
"""

from __future__ import annotations

from pathlib import Path

import torch


class Task:
    """The interface the engine calls; the docstrings say when and on which processes."""

    command: str = ""
    """'pretrain' | 'finetune': recorded in run.json, checked on --resume."""
    run_files: tuple[str, ...] = ()
    """Entries of the run folder this task adds to the engine's (removed by --overwrite)."""
    fixed_on_resume: tuple[str, ...] = ()
    """Config fields that cannot change on --resume."""
    select_key: str | None = None
    """Eval-record field whose highest value picks RUN_DIR/best (None: no best/)."""
    keys: tuple[str, ...] = ("loss",)
    """Loss fields summed per step and logged (set by :meth:`load`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------------ setup (every process)
    def check_sources(self) -> None:
        """Validate data sources before any model is loaded (fast failures naming the flag)."""

    def load(self, resume_from: Path | None):
        """(model, tokenizer): from ``resume_from`` (a checkpoint folder) when resuming, else from the
        config. Called after the engine seeded every RNG with ``cfg.seed``."""
        raise NotImplementedError

    def prepare_data(self, accelerator, tokenizer, model) -> None:
        """Build the training stream and evaluation data for this process."""
        raise NotImplementedError

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (known after :meth:`prepare_data`)."""
        return int(self.cfg.steps)

    def schedule(self, total: int) -> dict:
        """Keyword arguments of :func:`upcycle.training.schedule.make_scheduler` besides the optimizer."""
        cfg = self.cfg
        return dict(
            lr=cfg.lr, min_lr=cfg.resolved_min_lr, warmup=cfg.warmup, steps=total, schedule=cfg.schedule
        )

    def start(self, accelerator, step: int, total: int) -> None:
        """Begin producing training batches at ``step`` (after :meth:`restore`; every process)."""

    def describe(self, accelerator, total: int) -> list[str]:
        """Lines printed before training starts (model, data, effective batch)."""
        return []

    def tracker_config(self) -> dict:
        """The resolved options recorded once per run in TensorBoard's hparams / W&B's config."""
        return self.cfg.resolved().to_dict()

    # ------------------------------------------------------------------ data position
    def restore(self, state_dir: Path) -> None:
        """Continue the training stream from a checkpoint's ``training_state/`` (every process)."""

    def save_state(self, state_dir: Path) -> dict:
        """Write the stream position into ``state_dir`` (main process); return extra trainer-state
        fields (recorded in trainer_state.json)."""
        return {}

    # ------------------------------------------------------------------ one optimizer step
    def forward_backward(self, accelerator, model) -> torch.Tensor:
        """Forward and backward of this process's ``grad_accum`` micro-batches of one step, each inside
        ``accelerator.accumulate(model)``. Returns sums on the device: the output fields :attr:`keys`,
        then correct predictions, counted predictions and tokens."""
        raise NotImplementedError

    def record_fields(self) -> dict:
        """Extra fields of a training record (e.g. the epoch)."""
        return {}

    # ------------------------------------------------------------------ evaluation
    def evaluates(self) -> bool:
        return False

    def eval_due(self, step: int, total: int) -> bool:
        return False

    def evaluate(self, accelerator, model, step: int) -> dict:
        """An eval record ``{"kind": "eval", "step": step, ...}`` (every process calls this)."""
        raise NotImplementedError

    def format_eval(self, record: dict) -> str:
        return f"eval step {record['step']}: loss {record['loss']:.4f}"

    def close(self) -> None:
        """Stop background work (every process; also after an error)."""

    @property
    def documents_read(self) -> int:
        """Training documents this process read in this session (0 where that means nothing)."""
        return 0


__all__ = ["Task"]
