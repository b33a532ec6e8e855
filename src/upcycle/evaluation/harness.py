"""Zero-shot (or few-shot) tasks of lm-evaluation-harness on our models: ``--task lm-eval:TASK``.

Why in-process: lm-eval's command line builds models from their names, and a model type registered by
``import upcycle`` (moe_gpt2, moe_llama, ...) is invisible to it (lm-eval issue #3042). We load the model
ourselves (after ``import upcycle``), wrap the object in lm-eval's ``HFLM`` and call
``lm_eval.simple_evaluate``; any task or group lm-eval knows works, with its own prompts and metrics.

Tables. A group's subtasks become the columns: ``xnli_en`` … ``xnli_zh`` → en … zh in the founding
report's order. The score is the task's ``acc`` (else its first metric); when the per-example scores are
0/1 (accuracy), they also give Wilson intervals and the same paired tests as the fine-tuned tables.

Data. lm-eval's tasks read the Hugging Face Hub (``facebook/xnli`` for xnli; lm-eval's xnli scores the
*validation* split, 2,490 examples per language, with the prompt ``premise, right? Yes|Also|No,
hypothesis`` in each language). For offline machines, ``--data DIR`` with ``lm-eval:xnli`` points the
same task definitions (copied from the installed lm-eval, prompts unchanged) at a local folder laid out
like the hub repository; other tasks take their own definitions from ``--lm-eval-include DIR``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from upcycle.config import ConfigError, UserError
from upcycle.data.xnli import XNLI_HUB, report_order
from upcycle.evaluation.config import EvaluateConfig


def lm_eval_xnli_dir() -> Path:
    """The installed lm-eval's xnli task folder (its YAMLs define the prompts)."""
    try:
        import lm_eval.tasks
    except ImportError as exc:
        raise UserError("--task lm-eval:* needs lm-evaluation-harness: pip install 'upcycle[eval]'") from exc
    return Path(lm_eval.tasks.__file__).parent / "xnli"


def write_local_xnli_tasks(data: str, languages: Sequence[str], include_dir: str | Path) -> list[str]:
    """Write lm-eval's xnli task definitions, reading ``data`` (a local XNLI-layout folder) instead of the
    hub, into ``include_dir``; returns the task names (xnli_<lang>). Prompts, metrics and splits are
    lm-eval's own: each task YAML is the installed one with its dataset replaced by the local files."""
    import yaml

    from upcycle.data.xnli import local_files

    source = lm_eval_xnli_dir()
    include_dir = Path(include_dir)
    include_dir.mkdir(parents=True, exist_ok=True)
    common = yaml.safe_load((source / "xnli_common_yaml").read_text(encoding="utf-8"))
    (include_dir / "xnli_common_yaml").write_text(
        (source / "xnli_common_yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    names = []
    for lang in languages:
        task = yaml.safe_load((source / f"xnli_{lang}.yaml").read_text(encoding="utf-8"))
        files, builder = {}, None
        for key in ("training_split", "validation_split", "test_split"):
            split = task.get(key, common.get(key))
            if not split:
                continue
            try:
                builder, files[split] = local_files(data, lang, split, field="data")
            except ConfigError:
                if key == "training_split":  # only few-shot examples come from it
                    task[key] = None
                    continue
                raise
        task.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": files})
        (include_dir / f"xnli_{lang}.yaml").write_text(
            yaml.safe_dump(task, allow_unicode=True), encoding="utf-8"
        )
        names.append(task["task"])
    return names


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every request and task at INFO (and each deliberate override of a built-in task at
    WARNING); keep our own progress lines readable."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def task_plan(cfg: EvaluateConfig, tmp: Path):
    """(TaskManager, task names to run)."""
    from lm_eval.tasks import TaskManager

    from upcycle.data.xnli import is_local, parse_languages

    name = cfg.lm_eval_task
    include = [str(Path(cfg.lm_eval_include).expanduser())] if cfg.lm_eval_include else []
    # --data facebook/xnli (the xnli task's default data) is what lm-eval's xnli reads from the hub anyway.
    data = None if name == "xnli" and cfg.data == XNLI_HUB else cfg.data
    if data is not None:
        if name != "xnli" or not is_local(data):
            raise ConfigError(
                "data",
                cfg.data,
                "with lm-eval tasks only a local XNLI-layout folder for lm-eval:xnli is allowed (or "
                f"{XNLI_HUB}, which lm-eval reads itself); other tasks read their own data (give their task "
                "YAMLs with --lm-eval-include)",
            )
        languages = parse_languages(cfg.languages, field="languages")
        tasks = write_local_xnli_tasks(data, languages, tmp)
        # Only our copies are needed: skipping the built-in index saves indexing thousands of YAMLs.
        return TaskManager(include_path=[*include, str(tmp)], include_defaults=False), tasks
    if include:
        # The user's folder alone is fast to index (lm-eval's own tasks are thousands of YAMLs).
        manager = TaskManager(include_path=include, include_defaults=False)
        if name in manager.all_tasks:
            return manager, [name]
    manager = TaskManager(include_path=include or None)
    if name == "xnli" and cfg.languages != "all":
        return manager, [f"xnli_{lang}" for lang in parse_languages(cfg.languages, field="languages")]
    if name not in manager.all_tasks:
        import difflib

        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
        raise ConfigError("task", cfg.task, f"lm-eval has no task or group '{name}'{hint}")
    return manager, [name]


def column_of(task: str, group: str) -> str:
    """xnli_fr → fr (the subtask's name without its group prefix)."""
    return task[len(group) + 1 :] if task.startswith(group + "_") else task


def run_harness(model, tokenizer, cfg: EvaluateConfig, manager, tasks: list[str], device) -> dict:
    """``lm_eval.simple_evaluate`` on an already loaded model; returns lm-eval's output dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size, device=str(device)
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=cfg.bootstrap,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    if out is None:  # only on non-zero ranks of a distributed run
        raise UserError("lm-eval returned no results")
    return out


def metric_of(task_results: dict) -> str:
    """The task's score: ``acc`` if it has one, else its first reported metric."""
    metrics = [k.split(",")[0] for k in task_results if "," in k and not k.split(",")[0].endswith("_stderr")]
    if not metrics:
        raise UserError(f"lm-eval reported no metric ({', '.join(task_results)})")
    return "acc" if "acc" in metrics else metrics[0]


def scores_of(out: dict, group: str) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Per column: the per-example scores in document order, and lm-eval's aggregate (metric, value,
    stderr) of that subtask."""
    per_task = {t: r for t, r in out["results"].items() if t in out.get("samples", {})}
    columns = {column_of(t, group): t for t in per_task}
    scores, summary = {}, {}
    for col in report_order(list(columns)):
        task = columns[col]
        metric = metric_of(per_task[task])
        key = next(k for k in per_task[task] if k.split(",")[0] == metric)
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        scores[col] = np.array([float(s[metric]) for s in samples])
        stderr = per_task[task].get(key.replace(metric, f"{metric}_stderr", 1))
        summary[col] = {
            "metric": metric,
            "value": float(per_task[task][key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        }
    return scores, summary


def binary(scores: dict[str, np.ndarray]) -> bool:
    """Per-example scores that are all 0 or 1 (accuracy-like metrics)."""
    return all(np.isin(s, (0.0, 1.0)).all() for s in scores.values())


def harness_entry(path: str, cfg: EvaluateConfig, scores: dict[str, np.ndarray], summary: dict) -> dict:
    """A results.json entry; per-example 0/1 scores give the same intervals and paired tests as the
    fine-tuned tables, other metrics lm-eval's own standard errors."""
    from upcycle.evaluation.results import accuracy_entry

    metric = {s["metric"] for s in summary.values()}
    extra = {"metric": ", ".join(sorted(metric)), "num_fewshot": cfg.num_fewshot, "lm_eval": summary}
    if binary(scores):
        return accuracy_entry(path, cfg.task, {c: s == 1.0 for c, s in scores.items()}, **extra)
    value = {c: summary[c]["value"] for c in scores}
    half = {c: 1.96 * (summary[c]["stderr"] or float("nan")) for c in scores}
    return {
        "path": str(path),
        "task": cfg.task,
        "accuracy": value,
        "n": {c: int(len(s)) for c, s in scores.items()},
        "ci95": {c: [value[c] - half[c], value[c] + half[c]] for c in scores},
        "average": float(np.mean(list(value.values()))),
        **extra,
    }


def lm_eval_models(cfg: EvaluateConfig, names: list[str]) -> tuple[dict, dict]:
    """Each model through lm-eval: ({name: entry}, {name: {column: correct flags}} for 0/1 metrics)."""
    from upcycle.data.tokenizers import load_tokenizer
    from upcycle.evaluation.tasks import Progress, load_causal_lm, release_memory, resolve_device

    lm_eval_xnli_dir()  # the install hint, before anything is loaded
    device = resolve_device(cfg.device)
    progress = Progress(cfg.progress)
    results, correct = {}, {}
    with tempfile.TemporaryDirectory(prefix="upcycle-lm-eval-") as tmp, _quiet_lm_eval():
        manager, tasks = task_plan(cfg, Path(tmp))
        for name, path in zip(names, cfg.models):
            model = load_causal_lm(path).to(device)
            tokenizer = load_tokenizer(cfg.tokenizer or path, model_config=model.config)
            progress.line(f"{name}: lm-eval {', '.join(tasks)} ({cfg.num_fewshot}-shot)")
            out = run_harness(model, tokenizer, cfg, manager, tasks, device)
            del model
            release_memory()
            scores, summary = scores_of(out, cfg.lm_eval_task)
            results[name] = harness_entry(path, cfg, scores, summary)
            if binary(scores):
                correct[name] = {c: s == 1.0 for c, s in scores.items()}
            for col, s in summary.items():
                progress.line(f"{name} {col}: {s['metric']} {100 * s['value']:.2f} % of {len(scores[col])}")
    return results, correct


__all__ = [
    "harness_entry",
    "lm_eval_models",
    "lm_eval_xnli_dir",
    "run_harness",
    "scores_of",
    "task_plan",
    "write_local_xnli_tasks",
]
