"""Tasks of an experiment: one call of one command, its folder RUN/<stage>/<name>, the tasks it reads
from, and the hash that says whether a finished task is still up to date.

The hash covers what the command computes, not where it writes: the command's resolved config without
its output folder and one-off switches (overwrite, resume, progress), the run folder written as ``{run}``,
and every upstream task's output folder replaced by that task's own hash. So a changed key changes the
hash of its task and, through the chain, of every task downstream; renaming nothing upstream changes
nothing downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Config keys that do not change what a command computes.
_NOT_HASHED = ("out", "overwrite", "resume", "progress", "quiet", "tensorboard", "wandb", "wandb_project")


@dataclass
class Task:
    """One command call of the run."""

    stage: str
    name: str
    kind: str
    """What runs: data-xnli, data-corpus, data-domains, pretrain, convert, extend, finetune, evaluate,
    routing, training, fertility, report."""
    config: Any = None
    deps: list[Task] = field(default_factory=list)
    points: list[str] = field(default_factory=list)
    """Labels of the sweep points that use this task ('' without a sweep)."""
    model: str | None = None
    """The model this task trains or builds ('moe', 'dense', 'naive@ratio=0.5', a specialist's domain)."""
    setting: str | None = None
    """Fine-tuning setting (finetune, and the evaluations and analyses per setting)."""
    role: str | None = None
    """seed | specialist | moe | dense | extended (training and conversion tasks)."""
    models: dict[str, str] = field(default_factory=dict)
    """Evaluations and analyses: display name → model folder or run folder, in order."""
    hash: str = ""
    estimate: dict = field(default_factory=dict)
    """steps, tokens, flops (and the model's parameters) for the plan."""
    out: Path | None = None
    where: str = ""
    """The YAML path of the section the task comes from (errors while it runs name it)."""

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def resumable(self) -> bool:
        """Training tasks continue from their newest checkpoint; the others rerun whole."""
        return self.kind in ("pretrain", "finetune")

    def model_dir(self) -> Path:
        """The model a later task reads: a training run's final/ (fine-tuning: best/, when it validates),
        a conversion's folder."""
        if self.kind == "pretrain":
            return self.out / "final"
        if self.kind == "finetune":
            return self.out / ("best" if getattr(self.config, "validates", False) else "final")
        return self.out

    def config_dict(self) -> dict:
        cfg = self.config
        if cfg is None:
            return {}
        return _plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def task_hash(stage: str, kind: str, config: dict, deps: list[Task], run_dir: Path) -> str:
    """The hash of a task (see the module docstring)."""
    replace = sorted(
        ((str(d.out), f"@{d.hash}") for d in deps if d.out is not None), key=lambda p: -len(p[0])
    )
    replace.append((str(run_dir), "{run}"))

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for old, new in replace:
                value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items() if k not in _NOT_HASHED}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    material = {
        "stage": stage,
        "kind": kind,
        "config": scrub(config),
        "deps": sorted(d.hash for d in deps),
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["Task", "task_hash"]
