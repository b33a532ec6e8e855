"""The experiment report: ``upcycle report RUN`` writes RUN/report.md and a self-contained RUN/report.html
from the files the run's commands wrote (plan.json, metrics.jsonl, results.json, routing.json,
fertility.json, training.json, upcycling.json), with the published numbers of the founding report or
Drop-Upcycling beside ours where the experiment is theirs.

Reads files only (design notes: "analysis and the report only read those files"); no model is loaded.
"""

from upcycle._lazy import lazy_exports

_EXPORTS = {
    "ReportConfig": "upcycle.report.config",
    "write_report": "upcycle.report.build",
    "PUBLISHED": "upcycle.report.published",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["PUBLISHED", "ReportConfig", "write_report"]
