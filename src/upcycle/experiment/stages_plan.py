"""How each stage turns its YAML section into tasks (see upcycle.experiment.plan): the command config of
every task, the models it reads and the tasks it depends on."""

from __future__ import annotations

import dataclasses
from typing import Any

from upcycle.experiment.plan import DENSE, Candidate, ModelRef, PlanBuilder, PointContext
from upcycle.experiment.sections import check_section, section_kinds
from upcycle.experiment.tasks import Task

# ----------------------------------------------------------------------------------------- data


def data_tasks(b: PlanBuilder) -> None:
    data = b.experiment.data
    if data is None:
        return
    for name in ("xnli", "corpus", "domains"):
        config = getattr(data, name)
        if config is not None:
            b.data_tasks.append(b.add("data", name, f"data-{name}", config, [], where=f"data.{name}"))


# -------------------------------------------------------------------------------- seed, specialists


def _pretrain_config(b: PlanBuilder, ctx: PointContext, values: dict, where: str, out):
    from upcycle.training.config import PretrainConfig

    if not values.get("model"):
        b._fail(
            f"{where}.model",
            values.get("model"),
            "give a model preset (debug, gpt2-small, …) or a dense model",
        )
    config, deps = b.config(PretrainConfig, {**values, "out": str(out)}, where, ctx)
    return config, deps


def seed_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    if "seed" not in ctx.sections:
        return []
    values = ctx.sections["seed"][0]

    def register(task: Task) -> None:
        ctx.seed = task

    make = lambda out: _pretrain_config(b, ctx, values, "seed", out)  # noqa: E731
    return [Candidate(ctx, "seed", "pretrain", "seed", make, register, role="seed")]


def specialist_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    if "specialists" not in ctx.sections:
        return []
    values, extra = ctx.sections["specialists"]
    domains = extra.get("domains") or {}
    if not domains:
        b._fail("specialists.domains", domains, "give NAME: {pretrain keys} per specialised model")
    kind = dataclasses.replace(section_kinds()["specialists"], extra=None)
    candidates = []
    for name, own in domains.items():
        where = f"specialists.domains.{name}"
        own_values, _ = check_section(own or {}, kind, where, b.source)
        merged = {**values, **own_values}
        if "model" not in merged and ctx.seed is not None:
            merged["model"] = "{seed}"

        def register(task: Task, name=name) -> None:
            ctx.specialists[name] = task

        def make(out, merged=merged, where=where):
            return _pretrain_config(b, ctx, merged, where, out)

        candidates.append(
            Candidate(ctx, "specialists", "pretrain", name, make, register, role="specialist", where=where)
        )
    return candidates


# ------------------------------------------------------------------------------------------ convert


def convert_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    from upcycle.experiment.sections import located
    from upcycle.upcycling.cli import options_from_mapping

    values, extra = ctx.sections["convert"]
    variants = extra.get("variants") or {"moe": {}}
    candidates = []
    for name, own in variants.items():
        if name == DENSE:
            b._fail("convert.variants.dense", own, "the name 'dense' is the dense baseline's; choose another")
        raw = {**values, **(own or {})}
        where = "convert" if not extra.get("variants") else f"convert.variants.{name}"
        if "model" not in raw and ctx.seed is not None:
            raw["model"] = "{seed}"

        def make(out, raw=raw, where=where):
            resolved, deps = b.resolve({**raw, "out": str(out)}, ctx, where)
            with located(where, b.source, b.experiment.note(ctx.point)):
                return options_from_mapping(resolved, source=None, where=""), deps

        def register(task: Task, name=name) -> None:
            ctx.converted[name] = task

        candidates.append(Candidate(ctx, "convert", "convert", name, make, register, role="moe", where=where))
    return candidates


# ----------------------------------------------------------------------------------------- pretrain


def dense_source(b: PlanBuilder, ctx: PointContext) -> ModelRef:
    """The dense model the MoE models come from: the seed, else convert's (first) source."""
    if ctx.seed is not None:
        return ModelRef(str(ctx.seed.model_dir()), ctx.seed)
    first = next(iter(ctx.converted.values()))
    name = first.config.model[0]
    task = next((d for d in first.deps if str(d.model_dir()) == name), None)
    return ModelRef(name, task)


def pretrain_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    dense = dense_source(b, ctx)
    if "pretrain" not in ctx.sections:
        ctx.pretrained = {n: ModelRef(str(t.model_dir()), t) for n, t in ctx.converted.items()}
        ctx.pretrained[DENSE] = dense
        return []
    values, extra = ctx.sections["pretrain"]
    sources = {n: ModelRef(str(t.model_dir()), t) for n, t in ctx.converted.items()}
    if extra.get("baseline", True):
        sources[DENSE] = dense
    candidates = []
    for name, ref in sources.items():

        def make(out, ref=ref):
            config, deps = _pretrain_config(b, ctx, {**values, "model": ref.path}, "pretrain", out)
            return config, deps + ([ref.task] if ref.task else [])

        def register(task: Task, name=name) -> None:
            ctx.pretrained[name] = ModelRef(str(task.model_dir()), task)

        role = "dense" if name == DENSE else "moe"
        candidates.append(Candidate(ctx, "pretrain", "pretrain", name, make, register, role=role))
    return candidates


# ------------------------------------------------------------------------------------------- extend


#: extend keys that one kind of router reads (`upcycle extend` refuses them for the others): a shared extend
#: section gives each to the variants whose router reads it (nexus.yaml: router_init to BTX, not Nexus).
_ROUTER_KEYS = {
    "router_init": ("linear", "mlp"),
    "embedder": ("embedding",),
    "domain_embeddings": ("embedding",),
}


def extend_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    from upcycle.upcycling.options import ExtendConfig

    if "extend" not in ctx.sections:
        return []
    values, extra = ctx.sections["extend"]
    names = extra.get("of") or list(ctx.converted)
    unknown = [n for n in names if n not in ctx.converted]
    if unknown:
        b._fail("extend.of", unknown[0], f"not a convert variant; variants are {', '.join(ctx.converted)}")
    candidates = []
    for name in names:
        ref = ctx.pretrained[name]
        router = ctx.converted[name].config.router_type
        own = {k: v for k, v in values.items() if router in _ROUTER_KEYS.get(k, (router,))}

        def make(out, ref=ref, own=own):
            config, deps = b.config(ExtendConfig, {**own, "model": ref.path, "out": str(out)}, "extend", ctx)
            return config, deps + [ref.task]

        def register(task: Task, name=name) -> None:
            ctx.extended[name] = task

        candidates.append(Candidate(ctx, "extend", "extend", name, make, register, role="extended"))
    return candidates


# ----------------------------------------------------------------------------------------- finetune


def settings_of(b: PlanBuilder, values: dict, extra: dict) -> dict[str, str]:
    """Setting name → train languages: finetune.settings (a list or a mapping), else train_languages."""
    settings = extra.get("settings")
    if settings is None:
        langs = values.get("train_languages", "en")
        langs = ",".join(map(str, langs)) if isinstance(langs, list) else str(langs)
        return {_setting_name(langs): langs}
    items = settings.items() if isinstance(settings, dict) else ((None, s) for s in settings)
    out: dict[str, str] = {}
    for name, langs in items:
        langs = ",".join(map(str, langs)) if isinstance(langs, list) else str(langs)
        name = str(name) if name is not None else _setting_name(langs)
        if not langs.strip() or name in out:
            b._fail("finetune.settings", settings, "give distinct, non-empty train-language settings")
        out[name] = langs
    if not out:
        b._fail("finetune.settings", settings, "give at least one train-language setting")
    return out


def _setting_name(langs: str) -> str:
    return "-".join(p.strip() for p in langs.split(",") if p.strip()) or "none"


def finetune_candidates(b: PlanBuilder, ctx: PointContext) -> list[Candidate]:
    from upcycle.training.finetune_config import FinetuneConfig

    if "finetune" not in ctx.sections:
        return []
    values, extra = ctx.sections["finetune"]
    candidates = []
    for setting, langs in settings_of(b, values, extra).items():
        for name, ref in _ordered(ctx.pretrained).items():

            def make(out, ref=ref, langs=langs):
                merged = {**values, "model": ref.path, "train_languages": langs, "out": str(out)}
                config, deps = b.config(FinetuneConfig, merged, "finetune", ctx)
                return config, deps + ([ref.task] if ref.task else [])

            def register(task: Task, setting=setting, name=name) -> None:
                ctx.finetuned[(setting, name)] = task

            role = "dense" if name == DENSE else "moe"
            candidates.append(
                Candidate(ctx, "finetune", "finetune", name, make, register, group=setting, role=role)
            )
    return candidates


def _ordered(models: dict[str, Any]) -> dict[str, Any]:
    """The dense baseline first (the paired tests' baseline), then the MoE models in the YAML's order."""
    return {
        **({DENSE: models[DENSE]} if DENSE in models else {}),
        **{k: v for k, v in models.items() if k != DENSE},
    }


# -------------------------------------------------------------------------- evaluate, analyze, report


def _across(contexts: list[PointContext], pick) -> dict[str, Task | ModelRef]:
    """Display name → task (or external model) over every point, each once, dense first."""
    found: dict[str, Any] = {}
    for ctx in contexts:
        for name, item in pick(ctx).items():
            task = item.task if isinstance(item, ModelRef) else item
            shown = task.model if task is not None else name
            found.setdefault(shown, item)
    return _ordered(found)


def _path(item) -> str:
    if isinstance(item, ModelRef):
        return item.path
    return str(item.model_dir())


def _task(item) -> Task | None:
    return item.task if isinstance(item, ModelRef) else item


def model_sets(b: PlanBuilder, contexts: list[PointContext], of: str, where: str, moe_only: bool = False):
    """[(setting or None, {name: model})] for evaluations and analyses of ``of`` models."""
    sections = contexts[0].sections
    if of == "finetuned":
        if "finetune" not in sections:
            b._fail(f"{where}.of", of, "there is no finetune section; use of: pretrained")
        settings = settings_of(b, *sections["finetune"])
        sets = [
            (s, _across(contexts, lambda c, s=s: {m: t for (st, m), t in c.finetuned.items() if st == s}))
            for s in settings
        ]
    elif of == "extended":
        if "extend" not in sections:
            b._fail(f"{where}.of", of, "there is no extend section")
        extended = _across(contexts, lambda c: c.extended)  # named after what was added: nexus+math
        sets = [(None, {f"{n}+{'+'.join(_new_experts(t))}": t for n, t in extended.items()})]
    else:
        sets = [(None, _across(contexts, lambda c: c.pretrained))]
    if moe_only:
        sets = [(s, {n: m for n, m in models.items() if n != DENSE}) for s, models in sets]
    return sets


def evaluate_tasks(b: PlanBuilder, contexts: list[PointContext]) -> None:
    entries = contexts[0].sections.get("evaluate", ({}, {}))[0]
    if not entries:
        return
    from upcycle.evaluation.config import EvaluateConfig

    for name, (values, extra) in entries.items():
        task = values.get("task", "xnli")
        of = extra.get("of") or ("finetuned" if task in ("xnli", "classification") else "pretrained")
        for setting, models in model_sets(b, contexts, of, f"evaluate.{name}"):
            names = list(models)
            merged = {
                **values,
                "models": [_path(m) for m in models.values()],
                "names": names,
                "baseline": values.get("baseline") or (DENSE if DENSE in names else None),
            }
            key = f"{name}/{setting}" if setting else name
            merged["out"] = str(b.run_dir / "evaluate" / key)
            config, deps = b.config(EvaluateConfig, merged, f"evaluate.{name}", None)
            deps += [t for t in map(_task, models.values()) if t is not None]
            b.add("evaluate", key, "evaluate", config, deps, setting=setting,
                  models=dict(zip(names, merged["models"])), where=f"evaluate.{name}")  # fmt: skip


def analyze_tasks(b: PlanBuilder, contexts: list[PointContext]) -> None:
    sections = contexts[0].sections
    if "analyze" not in sections and "finetune" not in sections and "pretrain" not in sections:
        return
    analyze = sections.get("analyze", ({"routing": {}, "training": ({}, {}), "fertility": None}, {}))[0]
    for name, (values, extra) in analyze["routing"].items():
        _routing_tasks(b, contexts, name, values, extra)
    if analyze.get("training") is not None:
        _training_tasks(b, contexts, analyze["training"][0])
    if analyze.get("fertility") is not None:
        from upcycle.analysis.config import FertilityConfig

        values = analyze["fertility"][0]
        out = b.run_dir / "analyze" / "fertility"
        config, deps = b.config(FertilityConfig, {**values, "out": str(out)}, "analyze.fertility", None)
        b.add("analyze", "fertility", "fertility", config, deps, where="analyze.fertility")


def _routing_tasks(b: PlanBuilder, contexts, name: str, values: dict, extra: dict) -> None:
    from upcycle.analysis.config import RoutingAnalysisConfig

    of = extra.get("of") or ("finetuned" if "finetune" in contexts[0].sections else "pretrained")
    where = f"analyze.routing.{name}"
    for setting, models in model_sets(b, contexts, of, where, moe_only=True):
        if not models:
            b._fail(f"{where}.of", of, "there are no MoE models of this kind to analyse")
        key = f"routing-{name}" + (f"/{setting}" if setting else "")
        names = list(models)
        merged = {
            **values,
            "models": [_path(m) for m in models.values()],
            "names": names,
            "out": str(b.run_dir / "analyze" / key),
        }
        config, deps = b.config(RoutingAnalysisConfig, merged, where, None)
        deps += [t for t in map(_task, models.values()) if t is not None]
        b.add("analyze", key, "routing", config, deps, setting=setting,
              models=dict(zip(names, merged["models"])), where=where)  # fmt: skip


def _new_experts(task: Task | None) -> list[str]:
    from upcycle.upcycling.options import parse_named

    return list(parse_named(task.config.expert, "expert")) if task is not None else []


def _training_tasks(b: PlanBuilder, contexts, values: dict) -> None:
    from upcycle.analysis.config import TrainingAnalysisConfig

    groups: list[tuple[str, dict[str, Task]]] = []
    pretrained = {n: _task(m) for n, m in _across(contexts, lambda c: c.pretrained).items()}
    pretrained = {n: t for n, t in pretrained.items() if t is not None and t.kind == "pretrain"}
    if pretrained:
        groups.append(("pretrain", pretrained))
    if "finetune" in contexts[0].sections:
        for setting, models in model_sets(b, contexts, "finetuned", "analyze.training"):
            groups.append((setting, {n: _task(m) for n, m in models.items()}))
    for key, runs in groups:
        merged = {
            **values,
            "runs": [str(t.out) for t in runs.values()],
            "names": list(runs),
            "out": str(b.run_dir / "analyze" / "training" / key),
        }
        config, deps = b.config(TrainingAnalysisConfig, merged, "analyze.training", None)
        b.add("analyze", f"training/{key}", "training", config, deps + list(runs.values()),
              setting=None if key == "pretrain" else key, models={n: str(t.out) for n, t in runs.items()},
              where="analyze.training")  # fmt: skip


def report_task(b: PlanBuilder, contexts: list[PointContext]) -> None:
    from upcycle.report.config import ReportConfig

    values = contexts[0].sections.get("report", ({}, {}))[0]
    config, _ = b.config(ReportConfig, {**values, "run": str(b.run_dir)}, "report", None)
    deps = [t for t in b.plan.tasks.values()]
    b.add("report", "report", "report", config, deps, out=b.run_dir / "report", where="report")


__all__ = [
    "analyze_tasks",
    "convert_candidates",
    "data_tasks",
    "evaluate_tasks",
    "extend_candidates",
    "finetune_candidates",
    "pretrain_candidates",
    "report_task",
    "seed_candidates",
    "specialist_candidates",
]
