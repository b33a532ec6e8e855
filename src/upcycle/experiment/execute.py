"""Running one task: a call of the command's own Python entry point with the task's config (the same code
``upcycle convert``, ``pretrain``, ``finetune``, ``extend``, ``evaluate``, ``analyze``, ``fertility`` and
``report`` run; nothing is implemented twice). Returns a small summary for the task's record.

Outputs are complete or absent: training runs write checkpoints and an atomic final/ (and continue from
their newest checkpoint after a kill), every other command writes its folder through
``upcycle.io.atomic_output_dir``, and generated data is written the same way.
"""

from __future__ import annotations

import dataclasses
import random

from upcycle.config import UserError
from upcycle.experiment.tasks import Task


class Stopped(Exception):
    """A training stopped early by SIGTERM or SIGINT, after saving a checkpoint: the run stops too."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def execute(task: Task, resume: bool) -> dict:
    """Run ``task`` (continuing an interrupted training when ``resume``); its summary."""
    runner = _RUNNERS.get(task.kind)
    if runner is None:
        raise UserError(f"no runner for task kind {task.kind!r}")
    return runner(task, resume) or {}


# ------------------------------------------------------------------------------------------- data


def _xnli(task: Task, resume: bool) -> dict:
    from upcycle.data.synthetic import write_synthetic_xnli
    from upcycle.data.xnli import parse_languages
    from upcycle.io import atomic_output_dir

    cfg = task.config
    languages = parse_languages(cfg.languages, field="data.xnli.languages")  # 'all': XNLI's 15
    sizes = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    with atomic_output_dir(task.out, overwrite=True) as tmp:
        write_synthetic_xnli(tmp, languages, sizes=sizes, seed=cfg.seed)
    return {"languages": len(languages), "examples": {k: v * len(languages) for k, v in sizes.items()}}


def _corpus(task: Task, resume: bool) -> dict:
    from upcycle.data.synthetic import write_multilingual_corpus
    from upcycle.data.xnli import parse_languages
    from upcycle.io import atomic_output_dir

    cfg = task.config
    languages = parse_languages(cfg.languages, field="data.corpus.languages")  # 'all': XNLI's 15
    with atomic_output_dir(task.out, overwrite=True) as tmp:
        write_multilingual_corpus(tmp, languages, n_train=cfg.train, n_eval=cfg.eval, seed=cfg.seed)
    return {"documents": {"train": cfg.train, "eval": cfg.eval}}


def _domains(task: Task, resume: bool) -> dict:
    from upcycle.data.synthetic import domain_documents, write_jsonl
    from upcycle.io import atomic_output_dir

    cfg = task.config
    mix: dict[str, list] = {"mix": [], "mix-eval": []}
    with atomic_output_dir(task.out, overwrite=True) as tmp:
        for domain in cfg.domains:
            train = domain_documents(domain, cfg.train, seed=cfg.seed)
            held_out = domain_documents(domain, cfg.eval, seed=cfg.seed + 1)  # other documents
            write_jsonl(tmp / f"{domain}.jsonl", train)
            write_jsonl(tmp / f"{domain}-eval.jsonl", held_out)
            mix["mix"] += train
            mix["mix-eval"] += held_out
        for name, rows in mix.items():
            random.Random(cfg.seed).shuffle(rows)
            write_jsonl(tmp / f"{name}.jsonl", rows)
    return {"domains": list(cfg.domains), "documents": {"train": cfg.train, "eval": cfg.eval}}


# ---------------------------------------------------------------------------------------- training


def _train(task: Task, resume: bool) -> dict:
    from upcycle.training.loop import NonFiniteError

    cfg = dataclasses.replace(task.config, resume=resume, overwrite=not resume)
    if task.kind == "finetune":
        from upcycle.training import finetune as run_training
        from upcycle.training.finetune_cli import preflight
    else:
        from upcycle.training import pretrain as run_training
        from upcycle.training.cli import preflight
    preflight(cfg)
    try:
        result = run_training(cfg)
    except NonFiniteError as err:
        raise UserError(str(err)) from None
    if result.stopped_by is not None:
        raise Stopped(int(result.stopped_by))
    summary = {"step": result.step, "tokens": result.tokens, "resumed_from": str(result.resumed_from or "")}
    if result.last_eval:
        summary["last_eval"] = {k: v for k, v in result.last_eval.items() if k != "routing"}
    if result.best:
        summary["best"] = result.best
    return summary


# -------------------------------------------------------------------------------- convert, extend


def _convert(task: Task, resume: bool) -> dict:
    from upcycle.upcycling import convert

    cfg = dataclasses.replace(task.config, overwrite=True)
    result = convert(cfg, progress=False)
    print(result.report_line())
    return {
        "function_preservation": result.function_preservation,
        "moe_layers": list(result.model.config.moe_layers),
    }


def _extend(task: Task, resume: bool) -> dict:
    from upcycle.upcycling import extend

    cfg = dataclasses.replace(task.config, overwrite=True)
    result = extend(cfg)
    print(result.report_line())
    return {
        "out": str(result.out),
        "function_preservation": result.preservation,
        "new_expert_routing": {name: r["mean"] for name, r in result.new_expert_routing.items()},
        "moe_layers": list(result.model.config.moe_layers),
    }


# ------------------------------------------------------------------------- evaluate, analyze, report


def _evaluate(task: Task, resume: bool) -> dict:
    from upcycle.evaluation.cli import evaluate

    results = evaluate(dataclasses.replace(task.config, overwrite=True, progress=False))
    return {"average": {name: r.get("average", r.get("perplexity")) for name, r in results.items()}}


def _routing(task: Task, resume: bool) -> dict:
    from upcycle.analysis.cli import quiet_datasets
    from upcycle.analysis.routing import analyze_routing

    quiet_datasets()
    result = analyze_routing(dataclasses.replace(task.config, overwrite=True))
    return {"groups": list(result["groups"]), "models": list(result["models"])}


def _training_analysis(task: Task, resume: bool) -> dict:
    from upcycle.analysis.training import analyze_training

    doc = analyze_training(dataclasses.replace(task.config, overwrite=True))
    return {"runs": list(doc["runs"])}


def _fertility(task: Task, resume: bool) -> dict:
    from upcycle.analysis.cli import quiet_datasets
    from upcycle.analysis.fertility import fertility

    quiet_datasets()
    doc = fertility(dataclasses.replace(task.config, overwrite=True))
    return {"tokenizers": list(doc["tokenizers"])}


def _report(task: Task, resume: bool) -> dict:
    from upcycle.report.build import write_report

    paths = write_report(task.config)
    return {k: str(v) for k, v in paths.items()}


_RUNNERS = {
    "data-xnli": _xnli,
    "data-corpus": _corpus,
    "data-domains": _domains,
    "pretrain": _train,
    "finetune": _train,
    "convert": _convert,
    "extend": _extend,
    "evaluate": _evaluate,
    "routing": _routing,
    "training": _training_analysis,
    "fertility": _fertility,
    "report": _report,
}

__all__ = ["Stopped", "execute"]
