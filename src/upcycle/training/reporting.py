"""What a run reports: ``metrics.jsonl``, TensorBoard / W&B scalars, and the terminal display.

``metrics.jsonl`` holds one JSON object per logged training step (``"kind": "train"``) and per evaluation
(``"kind": "eval"``). Training records carry, per MoE layer, the fraction of tokens routed to each expert
and a balance figure over the steps since the previous record, from which Fan et al.'s
expert-activation-over-training plots are drawn. On resume, records after the checkpoint's step are
dropped, so the file describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines file (main process only), flushed after every record."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after ``step`` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file, optionally only one kind ('train' or 'eval')."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Flatten a metrics record into TensorBoard/W&B scalar names (``train/loss``,
    ``routing/layer_1/expert_3``, ``routing/layer_1/balance``)."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step", "routing") or isinstance(value, (dict, list, str)) or value is None:
            continue
        out[f"{kind}/{key}"] = float(value)
    # Fine-tuning's per-language validation figures: eval/fr/accuracy, eval/fr/loss.
    for lang, figures in (record.get("languages") or {}).items():
        for key in ("accuracy", "loss"):
            if key in figures:
                out[f"{kind}/{lang}/{key}"] = float(figures[key])
    prefix = "routing" if kind == "train" else f"{kind}_routing"
    for layer, stats in (record.get("routing") or {}).items():
        for e, frac in enumerate(stats["fraction"]):
            out[f"{prefix}/layer_{layer}/expert_{e}"] = float(frac)
        out[f"{prefix}/layer_{layer}/balance"] = float(stats["balance"])
        out[f"{prefix}/layer_{layer}/max_violation"] = float(stats["max_violation"])
    return out


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_train_line(record: dict, total_steps: int, eta_s: float) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "lm_loss" in record:
        parts.append(f"lm {record['lm_loss']:.4f}")
    if "task_loss" in record:
        parts.append(f"task {record['task_loss']:.4f}")
    if "aux_loss" in record:
        parts.append(f"aux {record['aux_loss']:.4g}")
    parts += [
        f"acc {record['accuracy']:.3f}",
        f"lr {record['lr']:.2e}",
        f"grad {record['grad_norm']:.3g}",
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"ETA {_fmt_duration(eta_s)}",
    ]
    if record.get("skipped_nonfinite"):
        parts.append(f"skipped {record['skipped_nonfinite']}")
    return " | ".join(parts)


def format_eval_line(record: dict) -> str:
    return (
        f"eval step {record['step']}: loss {record['loss']:.4f} | ppl {record['perplexity']:.2f} | "
        f"acc {record['accuracy']:.4f} | {record['tokens']:,} tokens"
    )


class Display:
    """A rich progress bar (step, loss, accuracy, tokens/s, ETA) on a terminal, plain log lines otherwise.

    Only the main process displays anything.
    """

    def __init__(self, total_steps: int, start_step: int, mode: str = "auto", enabled: bool = True):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console(stderr=False)
        use_bar = mode == "bar" or (mode == "auto" and self.console.is_terminal)
        if use_bar:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("acc {task.fields[acc]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task(
                "train", total=total_steps, completed=start_step, loss="-", acc="-", tps="-"
            )
            self.bar.start()

    def set_total(self, total_steps: int) -> None:
        """The run's length, once known (fine-tuning: from the data size and --epochs)."""
        self.total = total_steps
        if self.bar is not None:
            self.bar.update(self.task, total=total_steps)

    def set_start(self, step: int) -> None:
        """The step a (resumed) run starts from: the bar starts there, the ETA counts from there."""
        self.start_step = step
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def step(self, step: int, loss: float, tokens_per_s: float | None, accuracy: float | None = None) -> None:
        """Move the bar: the step's loss, the running accuracy of the log interval, tokens/s, ETA."""
        if self.bar is not None:
            fields = {"loss": f"{loss:.4f}"}
            if tokens_per_s is not None:
                fields["tps"] = f"{tokens_per_s:,.0f}"
            if accuracy is not None:
                fields["acc"] = f"{accuracy:.3f}"
            self.bar.update(self.task, completed=step, **fields)

    def train_record(self, record: dict) -> None:
        if self.enabled and self.bar is None:
            self.print(format_train_line(record, self.total, self.eta(record["step"])))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.console.print(f"warning: {text}", markup=False, highlight=False)
            else:
                print(f"warning: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
