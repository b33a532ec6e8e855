"""Run a whole experiment from one YAML: seed model, conversion, continued pretraining of the MoE and of
the equal dense baseline, fine-tuning per train-language setting, evaluation, analysis and the report.

Each stage calls the command of the same name; a YAML section holds that command's keys. The plan
(stages, models, steps, tokens, estimated FLOPs) is printed before anything starts and written to
RUN/plan.json. A rerun skips every task whose output is complete and whose config (and upstream) is
unchanged, continues an interrupted training from its checkpoint, and reruns what changed and everything
downstream of it. A `sweep:` grid runs one MoE per point; what the points share runs once.

Examples:
  upcycle run configs/experiments/demo.yaml                     # the founding report in miniature, offline
  upcycle run configs/experiments/founding-report.yaml --dry-run
  upcycle run configs/experiments/founding-report.yaml --out runs/report-2
  upcycle run configs/experiments/demo.yaml --from finetune     # fine-tune, evaluate, analyse, report again
  upcycle run configs/experiments/demo.yaml --only report
"""

from __future__ import annotations

from upcycle.experiment.sections import STAGES

HELP = "run a whole experiment from one YAML (stages, resume, sweeps) and write its report"


def add_arguments(parser) -> None:
    parser.add_argument(
        "experiment", nargs="?", default=None, metavar="EXPERIMENT", help="the experiment YAML"
    )
    parser.add_argument(
        "--out", default=None, metavar="RUN", help="the run folder (default: the YAML's out, else runs/NAME)"
    )
    parser.add_argument(
        "--only",
        default=None,
        choices=list(STAGES),
        help="run only this stage again (earlier stages must be complete)",
    )
    parser.add_argument("--from", dest="from_stage", default=None, choices=list(STAGES), metavar="STAGE",
                        help="run this stage and every later one again (earlier stages must be complete)")  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="check the YAML and print the plan; write nothing"
    )


def options(args):
    from upcycle.experiment.runner import RunOptions

    ns = vars(args) if not isinstance(args, dict) else args
    return RunOptions(
        experiment=ns.get("experiment"),
        out=ns.get("out"),
        only=ns.get("only"),
        from_stage=ns.get("from_stage"),
        dry_run=bool(ns.get("dry_run")),
    )


def check(args):
    """The YAML, every section of every sweep point, and the plan, checked before torch is imported."""
    from upcycle.experiment.runner import prepare

    return prepare(options(args))


def run(args) -> int:
    from upcycle.experiment.runner import run_experiment

    return run_experiment(options(args))
