"""What a run remembers about each task: RUN/state/<stage>/<name>.json, written atomically.

    {"key", "hash", "status": "running" | "complete", "attempts", "started", "finished",
     "seconds", "cpu_seconds", "tokens", "summary"}

A task is *complete* when its record says so with the task's current hash and its outputs are there; it is
then skipped. A record that says *running* with the current hash belongs to an interrupted attempt:
training tasks continue from their newest checkpoint, the others run again whole (their outputs are
written atomically, so nothing half-written is ever read). Any other record (an older hash) means the
task's config or an upstream task changed: it runs again from the start, and so does everything
downstream, whose hashes changed with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from upcycle.experiment.tasks import Task


def record_path(run_dir: Path, task: Task) -> Path:
    return run_dir / "state" / task.stage / f"{task.name}.json"


def read_record(run_dir: Path, task: Task) -> dict | None:
    path = record_path(run_dir, task)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(run_dir: Path, task: Task, record: dict) -> None:
    """Write the record through a temporary file and a rename: a kill leaves the old one or the new one."""
    path = record_path(run_dir, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def outputs_present(task: Task) -> bool:
    """The files a finished task leaves (a record without them means someone removed them)."""
    out = task.out
    wanted = {
        "pretrain": ["final/config.json"],
        "finetune": ["final/config.json"]
        + (["best/config.json"] if getattr(task.config, "validates", False) else []),
        "convert": ["config.json"],
        "extend": ["config.json"],
        "evaluate": ["results.json"],
        "routing": ["routing.json"],
        "training": ["training.json"],
        "fertility": ["fertility.json"],
        "data-xnli": ["README.md"],
        "data-corpus": ["train.jsonl", "eval.jsonl"],
        "data-domains": ["mix.jsonl"],
        "report": ["report.json", "../report.md", "../report.html"],
    }.get(task.kind, [])
    return all((out / w).exists() for w in wanted)


def status(run_dir: Path, task: Task) -> str:
    """'complete' (skip), 'resume' (an interrupted training with the same hash), 'run' (from the start)."""
    record = read_record(run_dir, task)
    if record is None or record.get("hash") != task.hash:
        return "run"
    if record.get("status") == "complete" and outputs_present(task):
        return "complete"
    if record.get("status") == "running" and task.resumable and (task.out / "config.yaml").is_file():
        return "resume"
    return "run"


def start_record(run_dir: Path, task: Task) -> dict:
    previous = read_record(run_dir, task) or {}
    same = previous.get("hash") == task.hash
    record = {
        "key": task.key,
        "hash": task.hash,
        "status": "running",
        "attempts": (previous.get("attempts", 0) if same else 0) + 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Time spent in earlier, interrupted attempts of the same task counts towards it.
        "seconds": previous.get("seconds", 0.0) if same and previous.get("status") == "running" else 0.0,
        "cpu_seconds": previous.get("cpu_seconds", 0.0)
        if same and previous.get("status") == "running"
        else 0.0,
    }
    write_record(run_dir, task, record)
    return record


__all__ = ["outputs_present", "read_record", "record_path", "start_record", "status", "write_record"]
