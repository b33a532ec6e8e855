"""The published numbers beside ours: a run folder whose files say what the commands would write (an
lm-eval evaluation of a drop-upcycled MoE, a naive one and the dense baseline) gets Drop-Upcycling's
Table 1 rows matched by construction, with the difference."""

from __future__ import annotations

import json

from upcycle.report.build import write_report
from upcycle.report.config import ReportConfig


def _task(key, kind, out, **extra):
    return {"key": key, "name": key.split("/", 1)[1], "kind": kind, "out": str(out), "hash": key, "deps": [],
            "role": None, "model": None, "setting": None, "models": {}, "config": {}, **extra}  # fmt: skip


def _entry(acc: float) -> dict:
    return {"path": "x", "task": "lm-eval:hellaswag", "accuracy": {"hellaswag": acc}, "n": {"hellaswag": 100},
            "ci95": {"hellaswag": [acc - 0.05, acc + 0.05]}, "average": acc}  # fmt: skip


MOE = {"ratio": 0.5, "experts": 8, "top_k": 2, "layers": "all"}


def test_drop_upcycling_rows_stand_beside_ours_with_the_difference(tmp_path):
    run = tmp_path
    results = {"dense": _entry(0.30), "naive": _entry(0.31), "drop": _entry(0.33)}
    (run / "evaluate" / "hellaswag").mkdir(parents=True)
    (run / "evaluate" / "hellaswag" / "results.json").write_text(json.dumps(results))
    tasks = [
        _task("convert/naive", "convert", run / "convert/naive", config={**MOE, "method": "naive"}),
        _task("convert/drop", "convert", run / "convert/drop", config={**MOE, "method": "drop"}),
        _task(
            "pretrain/naive",
            "pretrain",
            run / "pretrain/naive",
            role="moe",
            model="naive",
            deps=["convert/naive"],
        ),
        _task(
            "pretrain/drop",
            "pretrain",
            run / "pretrain/drop",
            role="moe",
            model="drop",
            deps=["convert/drop"],
        ),
        _task("pretrain/dense", "pretrain", run / "pretrain/dense", role="dense", model="dense"),
        _task(
            "evaluate/hellaswag", "evaluate", run / "evaluate/hellaswag", config={"task": "lm-eval:hellaswag"}
        ),  # fmt: skip
    ]
    plan = {"experiment": "drop-upcycling", "source": "d.yaml", "run": str(run), "created": "now", "points": [""],
            "report": {"paper": "drop-upcycling"}, "stages": [{"stage": "all", "tasks": tasks}]}  # fmt: skip
    (run / "plan.json").write_text(json.dumps(plan))
    write_report(ReportConfig(run=str(run)))
    md = (run / "report.md").read_text()
    assert "| DU (r=0.5) (paper) | 32.5 |" in md and "| drop (ours) | 33.00 |" in md
    assert "| NU (paper) | 31.9 |" in md and "| Dense (paper) | 28.6 |" in md
    lines = md.splitlines()
    drop = lines.index("| DU (r=0.5) (paper) | 32.5 |")
    assert lines[drop + 1] == "| difference | +0.50 |"
    assert "190M active / 417M total" in md  # Table 4 beside the setup
    # Without a paper, no published numbers.
    write_report(ReportConfig(run=str(run), paper="none"))
    assert "(paper)" not in (run / "report.md").read_text()
