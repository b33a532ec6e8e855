"""The plan of a run: every task of every stage, for every sweep point, with tasks shared by points made
once.

Stages that train or build models (seed, specialists, convert, pretrain, extend, finetune) are built per
sweep point, one stage at a time across all points: tasks of a stage with the same model and the same
hash are one task (the dense baseline, the seed, a fine-tuning of the dense baseline), and a model's
folder name carries only the swept keys that change it (``moe@ratio=0.5``; the dense baseline stays
``dense``). Evaluations and analyses then take every model of every point side by side, and the report
comes last.

References in section values: ``{run}`` (the run folder), ``{data}`` (RUN/data, the generated data),
``{seed}`` (the seed's final model) and ``{specialists.NAME}`` (a specialist's final model); a value that
refers to a task's output makes the task depend on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.config import ConfigError
from upcycle.experiment.sections import STAGES, build_config
from upcycle.experiment.spec import Experiment, Point, check_sections
from upcycle.experiment.tasks import Task, task_hash

_REFERENCE = re.compile(r"\{([A-Za-z_][\w]*(?:\.[\w.+-]+)?)\}")
DENSE = "dense"


@dataclass
class ModelRef:
    """A model a task reads: a folder (or hub id / preset) and the task that makes it, if any."""

    path: str
    task: Task | None = None


@dataclass
class PointContext:
    """What the stages built so far for one sweep point."""

    point: Point
    sections: dict[str, tuple[dict, dict]]
    seed: Task | None = None
    specialists: dict[str, Task] = field(default_factory=dict)
    converted: dict[str, Task] = field(default_factory=dict)
    pretrained: dict[str, ModelRef] = field(default_factory=dict)
    extended: dict[str, Task] = field(default_factory=dict)
    finetuned: dict[tuple[str, str], Task] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.point.label()


@dataclass
class Candidate:
    """A task of one point before naming: its model, how to build its config for a folder, and where to
    record it in the point's context."""

    ctx: PointContext
    stage: str
    kind: str
    base: str
    make: Callable[[Path], tuple[Any, list[Task]]]
    register: Callable[[Task], None]
    group: str = ""
    role: str | None = None
    where: str = ""
    hash: str = ""
    deps: list[Task] = field(default_factory=list)


@dataclass
class Plan:
    experiment: Experiment
    run_dir: Path
    tasks: dict[str, Task] = field(default_factory=dict)

    def stage_tasks(self, stage: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.stage == stage]

    def add(self, task: Task) -> Task:
        self.tasks[task.key] = task
        return task

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if self.stage_tasks(s)]


class PlanBuilder:
    def __init__(self, experiment: Experiment, run_dir: Path):
        self.experiment = experiment
        self.source = experiment.path
        self.run_dir = run_dir
        self.plan = Plan(experiment, run_dir)
        self.data_tasks: list[Task] = []

    # ------------------------------------------------------------------ references
    def resolve(self, value: Any, ctx: PointContext | None, where: str) -> tuple[Any, list[Task]]:
        """``value`` with its references replaced by paths, and the tasks they refer to."""
        deps: list[Task] = []
        if isinstance(value, str):
            return self._resolve_text(value, ctx, where, deps), deps
        if isinstance(value, list):
            items = [self.resolve(v, ctx, where) for v in value]
            return [v for v, _ in items], [d for _, ds in items for d in ds]
        if isinstance(value, dict):
            items = {k: self.resolve(v, ctx, f"{where}.{k}") for k, v in value.items()}
            return {k: v for k, (v, _) in items.items()}, [d for _, ds in items.values() for d in ds]
        return value, deps

    def _resolve_text(self, text: str, ctx: PointContext | None, where: str, deps: list[Task]) -> str:
        def sub(match: re.Match) -> str:
            path, task = self._reference(match.group(1), ctx, where, text)
            if task is not None:
                deps.append(task)
            elif match.group(1) == "data":
                deps.extend(self.data_tasks)
            return path

        return _REFERENCE.sub(sub, text)

    def _reference(
        self, name: str, ctx: PointContext | None, where: str, text: str
    ) -> tuple[str, Task | None]:
        known = "{run}, {data}, {seed}, {specialists.NAME}"
        if name == "run":
            return str(self.run_dir), None
        if name == "data":
            if self.experiment.data is None:
                self._fail(where, text, "{data} needs a data section (generated data)")
            return str(self.run_dir / "data"), None
        if name == "seed":
            if ctx is None or ctx.seed is None:
                self._fail(
                    where, text, "{seed} needs a seed section, and is made before this stage only then"
                )
            return str(ctx.seed.model_dir()), ctx.seed
        if name.startswith("specialists."):
            domain = name.split(".", 1)[1]
            if ctx is None or domain not in ctx.specialists:
                have = (
                    ", ".join(ctx.specialists) if ctx and ctx.specialists else "none made before this stage"
                )
                self._fail(where, text, f"no specialist '{domain}' (specialists: {have})")
            task = ctx.specialists[domain]
            return str(task.model_dir()), task
        self._fail(where, text, f"unknown reference {{{name}}}; references are {known}")
        raise AssertionError  # unreachable

    def _fail(self, where: str, value: Any, why: str) -> None:
        raise ConfigError(where, value, why, source=self.source)

    # ------------------------------------------------------------------ placing tasks
    def place(self, stage: str, candidates: list[Candidate]) -> None:
        """Hash, name and deduplicate one stage's candidates across the points; register the tasks."""
        probe = self.run_dir / stage / ".probe"
        for c in candidates:
            config, c.deps = c.make(probe)
            c.hash = task_hash(stage, c.kind, _config_dict(config), c.deps, self.run_dir)
        groups: dict[tuple[str, str], list[Candidate]] = {}
        for c in candidates:
            groups.setdefault((c.group, c.base), []).append(c)
        for (group, base), members in groups.items():
            labels = _labels(members)
            made: dict[str, Task] = {}
            for c in members:
                if c.hash not in made:
                    name = base + (f"@{labels[c.hash]}" if labels[c.hash] else "")
                    name = f"{group}/{name}" if group else name
                    out = self.run_dir / stage / name
                    config, deps = c.make(out)
                    task = Task(
                        stage, name, c.kind, config, _unique(deps), [], role=c.role, hash=c.hash, out=out
                    )
                    task.model = name.split("/")[-1]
                    task.where = c.where or stage
                    task.setting = group or None
                    made[c.hash] = self.plan.add(task)
                made[c.hash].points.append(c.ctx.label)
                c.register(made[c.hash])

    def add(self, stage: str, name: str, kind: str, config: Any, deps: list[Task], **meta) -> Task:
        """A task made once for the whole run (data, evaluations, analyses, the report)."""
        deps = _unique(deps)
        out = meta.pop("out", None) or self.run_dir / stage / name
        h = task_hash(stage, kind, _config_dict(config), deps, self.run_dir)
        return self.plan.add(Task(stage, name, kind, config, deps, ["*"], hash=h, out=out, **meta))

    def config(self, cls: type, values: dict, where: str, ctx: PointContext | None):
        """``cls`` from a section's values (references resolved), its errors naming the YAML path."""
        note = self.experiment.note(ctx.point) if ctx is not None else ""
        resolved, deps = self.resolve(values, ctx, where)
        return build_config(cls, resolved, where, self.source, note), deps


def _config_dict(config: Any) -> dict:
    """The config as hashed: convert's options that its method does not read (``ratio`` with 'naive') and
    its MoE fields given at their default values are left out, so that sweep points differing only there
    (`method: [naive, drop]` × `ratio: [0.15, 0.5]`; `global_routing: false` written or left out) share
    one conversion and everything that depends only on it (issue 14: shared stages run once)."""
    from upcycle.upcycling.options import UpcycleConfig, used_options

    out = Task("", "", "", config).config_dict()
    if isinstance(config, UpcycleConfig):
        out = {"model": out["model"], **Task("", "", "", used_options(config)).config_dict()}
    if isinstance(out.get("moe"), dict):
        import dataclasses as dc

        from upcycle.moe.config import MoEConfig

        defaults = {f.name: f.default for f in dc.fields(MoEConfig) if f.default is not dc.MISSING}
        out["moe"] = {k: v for k, v in out["moe"].items() if k not in defaults or defaults[k] != v}
    return out


def _unique(tasks: list[Task]) -> list[Task]:
    seen: dict[str, Task] = {}
    for t in tasks:
        seen.setdefault(t.key, t)
    return list(seen.values())


def _labels(members: list[Candidate]) -> dict[str, str]:
    """Hash → the part of the point label that tells the distinct tasks of one model apart: the swept
    keys whose change alone changes the task, less those its points do not agree on (every swept key of
    its first point if that is ambiguous)."""
    hashes = list(dict.fromkeys(c.hash for c in members))
    if len(hashes) == 1:
        return {hashes[0]: ""}
    paths = list(dict.fromkeys(p for c in members for p in c.ctx.point.values))
    relevant = []
    for path in paths:
        for a in members:
            others = {p: v for p, v in a.ctx.point.values.items() if p != path}
            if any(
                b.hash != a.hash
                and b.ctx.point.values.get(path) != a.ctx.point.values.get(path)
                and {p: v for p, v in b.ctx.point.values.items() if p != path} == others
                for b in members
            ):
                relevant.append(path)
                break
    labels: dict[str, str] = {}
    for c in members:  # a task shared by several points is named after what they have in common
        labels.setdefault(
            c.hash, c.ctx.point.label([p for p in relevant if p not in _varying(members, c.hash)])
        )
    if len(set(labels.values())) != len(hashes):
        labels = {}
        for c in members:
            labels.setdefault(c.hash, c.ctx.point.label())
    return labels


def _varying(members: list[Candidate], task_hash: str) -> set[str]:
    """The swept paths that differ between the points sharing the task ``task_hash``: they do not change
    it ('ratio' of a naive conversion), so its name leaves them out (``moe@method=naive``)."""
    values = [c.ctx.point.values for c in members if c.hash == task_hash]
    return {p for v in values for p in v if any(w.get(p) != v[p] for w in values)}


def build_plan(experiment: Experiment, run_dir: Path) -> Plan:
    """Every task of the run, in the order they run."""
    from upcycle.experiment import stages_plan as sp

    builder = PlanBuilder(experiment, run_dir)
    sp.data_tasks(builder)
    contexts = [PointContext(p, check_sections(experiment, p)) for p in experiment.points]
    for stage, make in (
        ("seed", sp.seed_candidates),
        ("specialists", sp.specialist_candidates),
        ("convert", sp.convert_candidates),
        ("pretrain", sp.pretrain_candidates),
        ("extend", sp.extend_candidates),
        ("finetune", sp.finetune_candidates),
    ):
        builder.place(stage, [c for ctx in contexts for c in make(builder, ctx)])
    sp.evaluate_tasks(builder, contexts)
    sp.analyze_tasks(builder, contexts)
    sp.report_task(builder, contexts)
    return builder.plan


__all__ = ["DENSE", "Candidate", "ModelRef", "Plan", "PlanBuilder", "PointContext", "build_plan"]
