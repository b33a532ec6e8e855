"""The run folder of a training command: checked before anything loads, written only once the model and
the data have loaded, removed again if a fresh run fails before its first step (issue 11).

    RUN_DIR/config.yaml      the resolved options (local paths absolute: --resume works from anywhere)
    RUN_DIR/run.json         {"id", "created", "command"}: W&B resumes the same run with the id, and
                             checkpoints record it, so pruning only deletes what this run wrote
    RUN_DIR/metrics.jsonl, tensorboard/, checkpoints/step-N/, final/ (and best/ for fine-tuning)

``plan`` (main process) validates the folder and picks the checkpoint to resume from without writing;
``commit`` writes config.yaml and run.json once the task has loaded its model and data; ``discard``
removes everything a fresh run wrote when it fails before completing a step, so the corrected command
is not refused as "holds a previous run".
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.config import ConfigError, UserError, dump_yaml, load_yaml, normalise_keys
from upcycle.training import checkpoint as ckpt
from upcycle.training.config import check_resume_compatible

#: Entries every training run folder may hold.
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "config.yaml", "run.json", "tensorboard")
BEST = "best"
TRAINING_JSON = "training.json"


def on_main(accelerator, fn: Callable[[], object]):
    """Run ``fn`` on the main process and share its result (or its user-facing error) with all."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except ConfigError as exc:
            error = ("config", exc.field, exc.value, exc.allowed)
        except UserError as exc:
            error = ("user", str(exc))
    result, error = broadcast_object_list([result, error])
    if error is not None:
        raise ConfigError(*error[1:]) if error[0] == "config" else UserError(error[1])
    return result


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RunPlan:
    """What ``plan`` decided; plain data, so it can be broadcast to every process."""

    run_dir: str
    run_id: str
    resume: str | None = None
    """Checkpoint folder to resume from."""
    fresh: bool = True
    """No previous run in the folder: a failure before the first step removes what was written."""
    created_from: str | None = None
    """The outermost folder of --out that did not exist yet (removed again, if still empty, on failure)."""
    warnings: list[str] = field(default_factory=list)


class RunFolder:
    def __init__(self, cfg, command: str, run_files: tuple[str, ...] = (), fixed: tuple[str, ...] = ()):
        self.cfg, self.command, self.fixed = cfg, command, fixed
        self.entries = RUN_FILES + tuple(run_files)
        self.run_dir = Path(cfg.out).expanduser()

    def previous(self) -> list[Path]:
        return [self.run_dir / name for name in self.entries if (self.run_dir / name).exists()]

    def plan(self) -> RunPlan:
        """Check the folder and choose the checkpoint to resume from; writes nothing (main process)."""
        cfg, run_dir = self.cfg, self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError("out", cfg.out, "exists and is not a folder")
        previous = self.previous()
        if previous and not (cfg.resume or cfg.overwrite):
            raise ConfigError(
                "out", cfg.out, "holds a previous run; pass --resume to continue it or --overwrite"
            )
        info = read_run_info(run_dir)
        plan = RunPlan(str(run_dir), info.get("id") or uuid.uuid4().hex[:12])
        plan.fresh = not previous or cfg.overwrite
        if not run_dir.exists():
            top = run_dir.absolute()
            while not top.parent.exists():
                top = top.parent
            plan.created_from = str(top)
        if cfg.overwrite:
            plan.run_id = uuid.uuid4().hex[:12]
            return plan
        if cfg.resume and previous:
            self._check_same_command(info)
        found = ckpt.find_resumable(run_dir, warn=plan.warnings.append) if cfg.resume else None
        if found is not None and (run_dir / "config.yaml").is_file():
            saved = type(cfg).from_dict(normalise_keys(load_yaml(run_dir / "config.yaml")))
            check_resume_compatible(saved, cfg, self.fixed)
        plan.resume = None if found is None else str(found[1])
        return plan

    def _check_same_command(self, info: dict) -> None:
        other = info.get("command", "pretrain")
        if other != self.command:
            raise ConfigError(
                "out",
                self.cfg.out,
                f"holds an 'upcycle {other}' run; resume it with upcycle {other} --resume",
            )

    def commit(self, plan: RunPlan, config: dict) -> None:
        """Create the folder and write config.yaml and run.json (main process, after the model and data
        loaded). With --overwrite, the previous run is deleted only now."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite:
            for path in self.previous():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        ckpt.clean_temporaries(self.run_dir / ckpt.CHECKPOINTS)
        info = read_run_info(self.run_dir)
        if info.get("id") != plan.run_id:
            info = {"id": plan.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": self.command}
            write_text_atomic(self.run_dir / "run.json", json.dumps(info, indent=1))
        tmp = self.run_dir / f".config.yaml.tmp-{os.getpid()}"
        dump_yaml(config, tmp)
        os.replace(tmp, self.run_dir / "config.yaml")

    def discard(self, plan: RunPlan) -> None:
        """Remove what a fresh run wrote (main process): it failed before completing a step."""
        if not plan.fresh:
            return
        for path in self.previous():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if plan.created_from is None:
            return
        folder, top = self.run_dir.absolute(), Path(plan.created_from)
        while folder.is_dir() and not any(folder.iterdir()) and folder.is_relative_to(top):
            folder.rmdir()
            if folder == top:
                break
            folder = folder.parent


# --------------------------------------------------------------------------- best/


def write_best(run_dir: Path, checkpoint: Path, summary: dict) -> Path:
    """``RUN_DIR/best``: the Hugging Face folder of ``checkpoint`` (hard links where the file system
    allows: no copy of the weights) plus training.json, replaced atomically."""
    from upcycle.io import atomic_output_dir

    best = Path(run_dir) / BEST
    with atomic_output_dir(best, overwrite=True) as tmp:
        for src in checkpoint.iterdir():
            if src.is_file() and src.name != ckpt.MANIFEST:
                try:
                    os.link(src, tmp / src.name)
                except OSError:
                    shutil.copy2(src, tmp / src.name)
        (tmp / TRAINING_JSON).write_text(json.dumps(summary, indent=1))
    return best


def best_step(run_dir: Path) -> int | None:
    """The step recorded in ``RUN_DIR/best/training.json`` (None if there is no readable best/)."""
    try:
        return int(json.loads((Path(run_dir) / BEST / TRAINING_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


__all__ = ["BEST", "RUN_FILES", "RunFolder", "RunPlan", "best_step", "on_main", "write_best"]
