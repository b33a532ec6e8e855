"""Write the report of a run folder: RUN/report.md and a self-contained RUN/report.html (figures embedded,
no network) with the setup, pretraining curves MoE vs dense, tokenizer fertility, per-language accuracy
with confidence intervals and significance marks, routing figures, and the time and tokens per stage;
with --paper, the published numbers of the founding report or Drop-Upcycling beside ours.

`upcycle run` writes it as its last stage; this command rebuilds it from the files alone.

Examples:
  upcycle report runs/demo
  upcycle report runs/founding-report --paper founding-report --title "GPT-2 MoE on XNLI"
"""

from __future__ import annotations

from upcycle.config import ConfigError, add_dataclass_flags, field_docs
from upcycle.report.config import ReportConfig

HELP = "write RUN/report.md and a self-contained RUN/report.html from a run folder of `upcycle run`"


def add_arguments(parser) -> None:
    parser.add_argument(
        "run", nargs="?", default=None, metavar="RUN", help=field_docs(ReportConfig).get("run")
    )
    add_dataclass_flags(parser, ReportConfig, skip=("run",))


def config_from_args(args) -> ReportConfig:
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    values = {k: v for k, v in ns.items() if k in ReportConfig.__dataclass_fields__ and v is not None}
    return ReportConfig(**values)


def check(args) -> ReportConfig:
    from upcycle.io import expand_path

    cfg = config_from_args(args)
    if not cfg.run:
        raise ConfigError("RUN", None, "give the run folder: upcycle report RUN")
    run_dir = expand_path(cfg.run)
    if not run_dir.is_dir():
        raise ConfigError("RUN", cfg.run, "no such run folder")
    if not (run_dir / "plan.json").is_file():
        raise ConfigError("RUN", cfg.run, "holds no plan.json: give a folder written by upcycle run")
    return cfg


def run(args) -> int:
    from upcycle.report.build import headline, write_report

    cfg = check(args)
    paths = write_report(cfg)
    table = headline(paths["html"].parent)
    if table:
        print(table)
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return 0
