"""ReportConfig: the options of ``upcycle report`` (also the ``report:`` section of an experiment YAML).
Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from upcycle.config import check_literals, to_dict

Paper = Literal["founding-report", "drop-upcycling", "none"]


@dataclass
class ReportConfig:
    """Options of ``upcycle report``: RUN/report.md and a self-contained RUN/report.html."""

    run: str | None = None
    """The run folder written by `upcycle run` (it holds plan.json)."""
    paper: Paper | None = None
    """Published numbers printed beside ours, with the difference: founding-report (its Tables 1-3),
    drop-upcycling (Nakamura et al. 2025, Tables 1 and 4) or none; default: what the experiment's report
    section says (none if it says nothing)."""
    title: str | None = None
    """Title of the report (default: the experiment's name)."""
    figures: bool = True
    """Embed the figures (training curves, routing, fertility) in report.html as data URIs."""

    def __post_init__(self) -> None:
        check_literals(self)

    def to_dict(self) -> dict:
        return to_dict(self)


__all__ = ["Paper", "ReportConfig"]
