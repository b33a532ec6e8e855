"""``upcycle run``: build the plan, print it, write RUN/plan.json, then run every task that is not complete,
stage by stage, recording each one (upcycle.experiment.state) so that a rerun skips what is done and
continues what was interrupted."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.config import ConfigError, UserError
from upcycle.experiment.plan import Plan, build_plan
from upcycle.experiment.sections import STAGES
from upcycle.experiment.spec import load_experiment
from upcycle.experiment.state import start_record, status, write_record
from upcycle.experiment.tasks import Task


@dataclass
class RunOptions:
    """Options of ``upcycle run``."""

    experiment: str | None = None
    """The experiment YAML (configs/experiments/*.yaml)."""
    out: str | None = None
    """The run folder (default: the YAML's `out`, else runs/NAME)."""
    only: str | None = None
    """Run only this stage's tasks, again even if complete (earlier stages must be complete)."""
    from_stage: str | None = None
    """Run this stage and every later one again, even if complete (earlier stages must be complete)."""
    dry_run: bool = False
    """Check the YAML, print the plan and stop: nothing is written."""


def prepare(opts: RunOptions) -> Plan:
    """The checked experiment and its plan (no model is loaded; nothing is written)."""
    from upcycle.io import expand_path

    if not opts.experiment:
        raise ConfigError("EXPERIMENT", None, "give the experiment YAML: upcycle run EXPERIMENT.yaml")
    for flag, stage in (("only", opts.only), ("from", opts.from_stage)):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"--{flag}", stage, f"stages are {', '.join(STAGES)}")
    if opts.only and opts.from_stage:
        raise ConfigError("--only", opts.only, "give --only or --from, not both")
    experiment = load_experiment(opts.experiment, out=opts.out)
    run_dir = expand_path(experiment.out).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        flag = "--out" if opts.out else "out"
        raise ConfigError(flag, experiment.out, "exists and is not a folder")
    plan = build_plan(experiment, run_dir)
    stage = opts.only or opts.from_stage
    if stage is not None and not plan.stage_tasks(stage):
        raise ConfigError(
            f"--{'only' if opts.only else 'from'}", stage, f"this experiment has no {stage} tasks"
        )
    return plan


def statuses(plan: Plan, opts: RunOptions) -> dict[str, str]:
    """Task key → complete | resume | run | skip (not selected by --only / --from)."""
    found = {key: status(plan.run_dir, task) for key, task in plan.tasks.items()}
    if opts.only or opts.from_stage:
        first = STAGES.index(opts.only or opts.from_stage)
        for key, task in plan.tasks.items():
            index = STAGES.index(task.stage)
            chosen = index == first if opts.only else index >= first
            if chosen:  # again, even if complete; an interrupted training still continues
                found[key] = "resume" if found[key] == "resume" else "run"
            elif found[key] != "complete" and index < first:
                stage = opts.only or opts.from_stage
                raise ConfigError(
                    "--only" if opts.only else "--from",
                    stage,
                    f"{key} (before {stage}) is not complete; run without --only/--from first",
                )
            else:
                found[key] = "complete" if found[key] == "complete" else "skip"
    return found


def plan_document(plan: Plan, found: dict[str, str]) -> dict:
    """plan.json: the experiment, its points and every task with its status and estimate."""
    exp = plan.experiment
    stages = []
    for stage in plan.stages:
        tasks = plan.stage_tasks(stage)
        stages.append(
            {
                "stage": stage,
                "tokens": sum(t.estimate.get("tokens") or 0 for t in tasks),
                "flops": sum(t.estimate.get("flops") or 0 for t in tasks),
                "tasks": [_task_entry(t, found[t.key]) for t in tasks],
            }
        )
    return {
        "format": "upcycle-plan/1",
        "experiment": exp.name,
        "description": exp.description,
        "source": os.path.abspath(exp.path),
        "run": str(plan.run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "points": [p.label() for p in exp.points],
        "sweep": [p.values for p in exp.points] if any(p.values for p in exp.points) else [],
        "report": plan.tasks["report/report"].config_dict() if "report/report" in plan.tasks else {},
        "stages": stages,
    }


def _task_entry(task: Task, state: str) -> dict:
    return {
        "name": task.name,
        "key": task.key,
        "kind": task.kind,
        "status": state,
        "hash": task.hash,
        "out": str(task.out),
        "model": task.model,
        "role": task.role,
        "setting": task.setting,
        "points": task.points,
        "models": task.models,
        "deps": [d.key for d in task.deps],
        "estimate": task.estimate,
        "config": task.config_dict(),
    }


def write_json_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One ``upcycle run`` per run folder at a time (the lock goes with the process, even on SIGKILL)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{run_dir} is in use by another `upcycle run`") from None
        yield


def run_task(plan: Plan, task: Task, state: str) -> dict:
    """Run one task and record it; a training stopped by a signal keeps its 'running' record."""
    from upcycle.experiment.execute import Stopped, execute

    record = start_record(plan.run_dir, task)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        summary = execute(task, resume=state == "resume")
    except ConfigError as err:
        if err.source is None:  # the command's own check: name the YAML key it came from
            where = task.where or task.stage
            field = err.field.lstrip("-").replace("-", "_") if str(err.field).startswith("--") else err.field
            raise ConfigError(f"{where}.{field}", err.value, f"{err.allowed} ({task.key})",
                              source=plan.experiment.path) from None  # fmt: skip
        raise
    except Stopped:
        record.update(seconds=record["seconds"] + time.perf_counter() - wall,
                      cpu_seconds=record["cpu_seconds"] + time.process_time() - cpu)  # fmt: skip
        write_record(plan.run_dir, task, record)
        raise
    record.update(
        status="complete",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        seconds=record["seconds"] + time.perf_counter() - wall,
        cpu_seconds=record["cpu_seconds"] + time.process_time() - cpu,
        tokens=summary.get("tokens"),
        summary=summary,
    )
    write_record(plan.run_dir, task, record)
    return record


def execute_plan(plan: Plan, found: dict[str, str]) -> int:
    """Run every task whose status is run or resume, in order."""
    from upcycle.experiment.display import task_line
    from upcycle.experiment.execute import Stopped

    todo = [t for t in plan.tasks.values() if found[t.key] in ("run", "resume")]
    for i, task in enumerate(todo, 1):
        print(f"\n== [{i}/{len(todo)}] {task_line(task, found[task.key], plan.run_dir)}", flush=True)
        try:
            record = run_task(plan, task, found[task.key])
        except Stopped as stop:
            print(
                f"stopped by signal {stop.signum} during {task.key}; run the same command again to continue"
            )
            return 128 + stop.signum
        except (ConfigError, UserError, OSError):
            print(f"failed: {task.key} (fix the cause and run the same command again)", flush=True)
            raise
        print(f"done: {task.key} in {record['seconds']:.1f} s", flush=True)
    return 0


def run_experiment(opts: RunOptions, plan: Plan | None = None) -> int:
    """``upcycle run``: print the plan, then run it (unless ``dry_run``)."""
    from upcycle.experiment.display import print_plan, print_summary
    from upcycle.experiment.estimate import estimate_plan

    plan = plan or prepare(opts)
    estimate_plan(plan)
    if opts.dry_run:
        print_plan(plan, statuses(plan, opts), dry_run=True)
        return 0
    with run_lock(plan.run_dir):
        found = statuses(plan, opts)
        print_plan(plan, found)
        write_json_atomic(plan.run_dir / "plan.json", plan_document(plan, found))
        code = execute_plan(plan, found)
    if code == 0:
        print_summary(plan)
    sys.stdout.flush()
    return code


__all__ = ["RunOptions", "plan_document", "prepare", "run_experiment", "statuses"]
