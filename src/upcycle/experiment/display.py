"""What ``upcycle run`` prints: the plan before anything starts (stages, models, steps, tokens, estimated
FLOPs, and what will run, continue or be skipped) and, at the end, the report's path and headline table."""

from __future__ import annotations

from upcycle.experiment.plan import Plan
from upcycle.experiment.tasks import Task

_STATUS = {"run": "run", "resume": "continue", "complete": "done, skip", "skip": "not selected"}


def count(n: float | int | None) -> str:
    """12,345 → '12.3k'; None → '?'."""
    if n is None:
        return "?"
    for unit, div in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def short(path, run_dir=None) -> str:
    """A path inside the run folder as RUN/…; anything else as given."""
    text = str(path)
    if run_dir is not None and text.startswith(str(run_dir) + "/"):
        return "RUN/" + text[len(str(run_dir)) + 1 :]
    return text


def what(task: Task, run_dir=None) -> str:
    """One phrase saying what the task does."""
    cfg, est = task.config, task.estimate
    size = f" ({count(est['params'])} params, {count(est['active'])} active)" if est.get("params") else ""
    if task.kind == "pretrain":
        return f"train {short(cfg.model, run_dir)}{size}"
    if task.kind == "finetune":
        return f"fine-tune {short(cfg.model, run_dir)} on {cfg.train_languages}"
    if task.kind == "convert":
        sources = ", ".join(short(m, run_dir) for m in cfg.model)
        return f"{cfg.method} upcycling of {sources}: {cfg.experts} experts, top-{cfg.top_k}{size}"
    if task.kind == "extend":
        return f"add {', '.join(e.split('=')[0] for e in cfg.expert)} to {short(cfg.model, run_dir)}"
    if task.kind in ("evaluate", "routing", "training"):
        label = {"evaluate": getattr(cfg, "task", ""), "routing": f"routing by {getattr(cfg, 'group_by', '')}",
                 "training": "training curves"}[task.kind]  # fmt: skip
        return f"{label} of {', '.join(task.models)}"
    if task.kind == "fertility":
        return f"fertility of {', '.join(cfg.tokenizer)} on {short(cfg.data, run_dir)}"
    if task.kind.startswith("data-"):
        return f"generate {task.kind[5:]} data"
    return task.kind


def task_line(task: Task, state: str, run_dir=None) -> str:
    return f"{task.key}: {what(task, run_dir)}" + (
        " (continuing from its newest checkpoint)" if state == "resume" else ""
    )


def plan_rows(plan: Plan, found: dict[str, str]) -> list[list[str]]:
    rows = []
    for stage in plan.stages:
        tasks = plan.stage_tasks(stage)
        for task in tasks:
            est = task.estimate
            rows.append(
                [
                    stage,
                    task.name,
                    what(task, plan.run_dir),
                    count(est.get("steps")) if est.get("steps") else "",
                    count(est.get("tokens")) if "tokens" in est else "",
                    count(est.get("flops")) if "flops" in est else "",
                    _STATUS[found[task.key]],
                ]  # fmt: skip
            )
        tokens = sum(t.estimate.get("tokens") or 0 for t in tasks)
        flops = sum(t.estimate.get("flops") or 0 for t in tasks)
        if len(tasks) > 1 and (tokens or flops):
            rows.append(
                [
                    "",
                    f"({stage} total)",
                    "",
                    "",
                    count(tokens) if tokens else "",
                    count(flops) if flops else "",
                    "",
                ]
            )
    return rows


def format_table(header: list[str], rows: list[list[str]], wrap: int = 70) -> str:
    cut = [[c if len(c) <= wrap else c[: wrap - 1] + "…" for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in [header, *cut]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cut]
    return "\n".join(lines)


def print_plan(plan: Plan, found: dict[str, str], dry_run: bool = False) -> None:
    exp = plan.experiment
    points = [p.label() for p in exp.points if p.values]
    print(f"experiment {exp.name} ({exp.path}) → {plan.run_dir}")
    if points:
        print(f"sweep: {len(points)} points: {'; '.join(points)}")
    header = ["stage", "task", "what", "steps", "tokens", "FLOPs", "status"]
    print(format_table(header, plan_rows(plan, found)))
    total = sum(t.estimate.get("flops") or 0 for t in plan.tasks.values())
    todo = sum(1 for s in found.values() if s in ("run", "resume"))
    print(
        f"{len(plan.tasks)} tasks, {todo} to run; estimated {count(total)} FLOPs in all "
        "(training = 3 × forward; '?': a model the plan cannot size)"
    )
    if dry_run:
        print("dry run: nothing was written")


def print_summary(plan: Plan) -> None:
    """The report's paths and its headline table."""
    report = plan.run_dir / "report.html"
    if not report.exists():
        return
    from upcycle.report.build import headline

    table = headline(plan.run_dir)
    if table:
        print("\n" + table)
    print(f"\nreport: {report}\n        {plan.run_dir / 'report.md'}")


__all__ = ["count", "format_table", "print_plan", "print_summary", "task_line", "what"]
