"""``upcycle report RUN``: RUN/report.md and a self-contained RUN/report.html from the run's files.

Sections: the setup (models, parameters, active parameters, FLOPs per token, function preservation at
conversion), pretraining (curves MoE vs dense, final held-out figures), tokenizer fertility, the
evaluations (per-language accuracy with significance marks and 95 % intervals), fine-tuning curves, routing
figures, and the time and tokens each stage took. Where the experiment is the founding report's or
Drop-Upcycling's (``paper``), the published numbers stand beside ours with the difference.

Everything is read from files (plan.json, state records, metrics, results.json, routing.json,
fertility.json, training.json, the models' config.json); no model weights are loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from upcycle.config import ConfigError, UserError
from upcycle.report.config import ReportConfig
from upcycle.report.document import Block, Heading, to_html, to_markdown


def pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.2f}"


def num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else f"{x:,}"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RunFiles:
    """The run folder as the report sees it: plan.json's tasks and their records and outputs."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.plan = read_json(run_dir / "plan.json")
        if self.plan is None:
            raise ConfigError("RUN", str(run_dir), "holds no plan.json: give a folder written by upcycle run")
        self.tasks = [t for stage in self.plan["stages"] for t in stage["tasks"]]

    def of(self, kind: str) -> list[dict]:
        return [t for t in self.tasks if t["kind"] == kind]

    def record(self, task: dict) -> dict:
        stage, name = task["key"].split("/", 1)
        return read_json(self.run_dir / "state" / stage / f"{name}.json") or {}

    def complete(self, task: dict) -> bool:
        record = self.record(task)
        return record.get("status") == "complete" and record.get("hash") == task["hash"]

    def out(self, task: dict) -> Path:
        return Path(task["out"])

    def figure(self, task: dict, stem: str) -> Path | None:
        path = self.out(task) / f"{stem}.png"
        return path if path.is_file() else None


def write_report(cfg: ReportConfig) -> dict[str, Path]:
    """Write RUN/report.md, RUN/report.html and RUN/report/report.json (the numbers shown); their paths."""
    from upcycle.io import atomic_output_dir, expand_path

    if not cfg.run:
        raise ConfigError("RUN", None, "give the run folder: upcycle report RUN")
    run_dir = expand_path(cfg.run).absolute()
    if not run_dir.is_dir():
        raise ConfigError("RUN", cfg.run, "no such run folder")
    files = RunFiles(run_dir)
    paper = cfg.paper or (files.plan.get("report") or {}).get("paper") or "none"
    title = (
        cfg.title or (files.plan.get("report") or {}).get("title") or f"Experiment {files.plan['experiment']}"
    )
    blocks, numbers = report_blocks(files, paper, title)
    with atomic_output_dir(run_dir / "report", overwrite=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    _write_atomic(run_dir / "report.md", to_markdown(blocks, run_dir))
    _write_atomic(run_dir / "report.html", to_html(blocks, title, embed=cfg.figures))
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html"}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report_blocks(files: RunFiles, paper: str, title: str) -> tuple[list[Block], dict]:
    """Every section's blocks, and the numbers they show (report.json)."""
    from upcycle.report import sections as s

    numbers: dict = {"paper": paper, "experiment": files.plan["experiment"]}
    blocks: list[Block] = [Heading(title, 1), *s.header(files)]
    for make in (s.setup, s.pretraining, s.fertility, s.evaluations, s.finetuning, s.routing, s.cost):
        made, found = make(files, paper)
        blocks += made
        numbers[make.__name__] = found
    return blocks, numbers


def headline(run_dir: Path) -> str:
    """The headline table ``upcycle run`` prints at the end: each evaluation's average per model (and the
    average over the train languages, for fine-tuning settings)."""
    from upcycle.experiment.display import format_table

    try:
        files = RunFiles(run_dir)
    except (ConfigError, UserError):
        return ""
    rows = []
    for task in files.of("evaluate"):
        results = read_json(files.out(task) / "results.json") or {}
        langs = _train_languages(files, task)
        for name, r in results.items():
            acc = r.get("accuracy")
            if isinstance(acc, dict):
                on_train = [acc[lang] for lang in langs if lang in acc]
                shown = pct(sum(on_train) / len(on_train)) if on_train else "–"
                rows.append([task["name"], name, pct(r.get("average")), shown])
            else:
                rows.append([task["name"], name, num(r.get("perplexity")), "–"])
    if not rows:
        return ""
    header = ["evaluation", "model", "average (%, or perplexity)", "on the train languages (%)"]
    return format_table(header, rows)


def _train_languages(files: RunFiles, task: dict) -> list[str]:
    """The train languages of the fine-tuning runs an evaluation's models come from."""
    for dep in task["deps"]:
        for t in files.tasks:
            if t["key"] == dep and t["kind"] == "finetune":
                return [x.strip() for x in str(t["config"]["train_languages"]).split(",")]
    return []


__all__ = ["RunFiles", "headline", "report_blocks", "write_report"]
