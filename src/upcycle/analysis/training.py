"""``upcycle analyze training``: what run folders' ``metrics.jsonl`` say, as figures and a summary.

- ``loss.png``: the training loss (solid) and the held-out loss (dashed, dots) of every run on one set of
  axes (an MoE against its equal dense baseline, naive against drop). The training curve is the task's
  own loss (``lm_loss`` of pretraining, ``task_loss`` of fine-tuning, ``loss`` of a dense run, which has no
  auxiliary loss), so MoE and dense runs compare like for like; held-out losses carry no auxiliary loss.
- ``experts-RUN.png``: per MoE layer, each expert's share of the layer's assignments over the training
  steps (Fan et al. 2024's expert activation plots, their Figures 1 and 6–8), from the ``routing``
  fractions of the training records (each covers the steps since the previous record). An expert has
  *collapsed* where its share stays below ``collapse_share`` × the even share 1/E for at least
  ``collapse_records`` consecutive records: the stretch is drawn thick and marked with ▼ at its start.
- ``accuracy.png`` (fine-tuning runs): the validation accuracy of each language over the steps, one
  panel per run, the mean over languages (what picks the best checkpoint) in black.

``training.json`` (format ``upcycle-training/1``) holds, per run: its path and command, last step, final
training and held-out losses, the best held-out loss, the MoE layers, the collapses found
(``{"layer", "expert", "from_step", "to_step", "records", "min_share"}``) and, for fine-tuning, the final
and best mean validation accuracy; ``training.md`` tabulates them.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.analysis.config import TrainingAnalysisConfig
from upcycle.config import ConfigError, UserError

FORMAT = "upcycle-training/1"


@dataclass
class Run:
    """The curves of one run folder."""

    name: str
    path: str
    command: str
    loss_key: str
    """Which training-record field the training curve shows."""
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    routing: dict[str, tuple[list[int], list[list[float]]]] = field(default_factory=dict)
    """{layer: (steps, fractions per record (E each))}."""
    accuracy: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """{language: (steps, validation accuracy)}, plus 'mean' (fine-tuning runs)."""


def _number(value) -> float:
    """metrics.jsonl writes non-finite floats as strings ('nan', 'inf')."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_records(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise ConfigError("runs", str(folder), "no such run folder")
    if not path.is_file():
        raise UserError(f"'{folder}' has no metrics.jsonl: not a run folder of upcycle pretrain or finetune")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash, as the training loop's own reader skips it
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not any(r.get("kind") == "train" for r in records):
        raise UserError(f"{path} holds no training records")
    return sorted(records, key=lambda r: (int(r["step"]), r.get("kind") != "train"))


def read_run(folder: str, name: str) -> Run:
    """The curves of a run folder (``metrics.jsonl``; ``run.json`` for the command, if present)."""
    root = Path(folder).expanduser()
    records = read_records(root)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    command = "pretrain"
    with_meta = root / "run.json"
    if with_meta.is_file():
        with contextlib.suppress(ValueError):
            command = json.loads(with_meta.read_text()).get("command", command)
    if any("languages" in r for r in evals):
        command = "finetune"
    loss_key = next((k for k in ("lm_loss", "task_loss") if k in train[0]), "loss")
    run = Run(name, str(folder), command, loss_key)
    run.train_steps = [int(r["step"]) for r in train]
    run.train_loss = [_number(r.get(loss_key)) for r in train]
    run.eval_steps = [int(r["step"]) for r in evals if "loss" in r]
    run.eval_loss = [_number(r["loss"]) for r in evals if "loss" in r]
    for layer in sorted({k for r in train for k in (r.get("routing") or {})}, key=int):
        rows = [
            (int(r["step"]), r["routing"][layer]["fraction"])
            for r in train
            if layer in (r.get("routing") or {})
        ]
        run.routing[layer] = ([s for s, _ in rows], [[_number(x) for x in f] for _, f in rows])
    for r in evals:
        for lang, stats in (r.get("languages") or {}).items():
            steps, values = run.accuracy.setdefault(lang, ([], []))
            steps.append(int(r["step"]))
            values.append(_number(stats.get("accuracy")))
        if r.get("languages") and "accuracy" in r:
            steps, values = run.accuracy.setdefault("mean", ([], []))
            steps.append(int(r["step"]))
            values.append(_number(r["accuracy"]))
    return run


# --------------------------------------------------------------------------- expert collapse


def collapses(run: Run, share: float, min_records: int) -> list[dict]:
    """Stretches where an expert's share stays below ``share`` / E for ≥ ``min_records`` consecutive
    training records (all of them if the run logged fewer)."""
    found = []
    for layer, (steps, fractions) in run.routing.items():
        E = len(fractions[0]) if fractions else 0
        need = min(min_records, len(steps))
        for e in range(E):
            below = [f[e] < share / E for f in fractions]
            start = None
            for i, low in enumerate([*below, False]):
                if low and start is None:
                    start = i
                elif not low and start is not None:
                    if i - start >= need:
                        found.append(
                            {
                                "layer": layer,
                                "expert": e,
                                "from_step": steps[start],
                                "to_step": steps[i - 1],
                                "records": i - start,
                                "min_share": min(f[e] for f in fractions[start:i]),
                            }
                        )
                    start = None
    return found


# --------------------------------------------------------------------------- summary and outputs


def _last(values: list[float]):
    return values[-1] if values else None


def _best(values: list[float], pick) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return pick(finite) if finite else None


def summary(run: Run, found: list[dict]) -> dict:
    out = {
        "path": run.path,
        "command": run.command,
        "loss_key": run.loss_key,
        "steps": run.train_steps[-1],
        "final_train_loss": _last(run.train_loss),
        "final_eval_loss": _last(run.eval_loss),
        "best_eval_loss": _best(run.eval_loss, min),
        "moe_layers": [int(layer) for layer in run.routing],
        "collapses": found,
    }
    if "mean" in run.accuracy:
        out["final_accuracy"] = _last(run.accuracy["mean"][1])
        out["best_accuracy"] = _best(run.accuracy["mean"][1], max)
    return out


def markdown_table(doc: dict) -> str:
    def fmt(x) -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"

    lines = [
        "# Training runs",
        "",
        f"Collapsed: an expert's share below {doc['collapse_share']} × the even share for ≥ "
        f"{doc['collapse_records']} consecutive records.",
        "",
        "| run | command | steps | train loss | held-out loss (final) | held-out loss (best) | "
        "collapsed experts | validation accuracy (final / best) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in doc["runs"].items():
        collapsed = ", ".join(f"L{c['layer']}/E{c['expert']}" for c in s["collapses"]) or "none"
        if not s["moe_layers"]:
            collapsed = "– (dense)"
        acc = f"{fmt(s['final_accuracy'])} / {fmt(s['best_accuracy'])}" if "final_accuracy" in s else "–"
        lines.append(
            f"| {name} | {s['command']} | {s['steps']} | {fmt(s['final_train_loss'])} | "
            f"{fmt(s['final_eval_loss'])} | {fmt(s['best_eval_loss'])} | {collapsed} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def run_names(runs: list[str], names: list[str] | None) -> list[str]:
    if names:
        return list(names)
    short = [Path(r).expanduser().resolve().name or r for r in runs]
    return short if len(set(short)) == len(short) else list(runs)


def analyze_training(cfg: TrainingAnalysisConfig) -> dict:
    """Read every run (errors before anything is written), then write the output folder in one go."""
    from upcycle.analysis import plots
    from upcycle.io import atomic_output_dir, check_output_dir

    check_output_dir(cfg.out, cfg.overwrite)
    runs = [read_run(r, n) for r, n in zip(cfg.runs, run_names(cfg.runs, cfg.names))]
    found = {run.name: collapses(run, cfg.collapse_share, cfg.collapse_records) for run in runs}
    doc = {
        "format": FORMAT,
        "collapse_share": cfg.collapse_share,
        "collapse_records": cfg.collapse_records,
        "runs": {run.name: summary(run, found[run.name]) for run in runs},
    }
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        (tmp / "training.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "training.md").write_text(markdown_table(doc))
        plots.save_figure(plots.loss_figure(runs), tmp, "loss")
        for run in runs:
            if run.routing:
                fig = plots.expert_activation_figure(run, found[run.name], cfg.collapse_share)
                plots.save_figure(fig, tmp, f"experts-{plots.file_stem(run.name)}")
        tuned = [run for run in runs if run.accuracy]
        if tuned:
            plots.save_figure(plots.accuracy_figure(tuned), tmp, "accuracy")
    return doc


__all__ = ["FORMAT", "Run", "analyze_training", "collapses", "read_run"]
