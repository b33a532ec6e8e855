"""Run the demo experiment: the founding report in miniature, offline, in a few minutes on 2 CPU cores.

`upcycle demo` is `upcycle run configs/experiments/demo.yaml` (what `make demo` runs): a small GPT-2 with
GPT-2's real tokenizer is first trained on a generated multilingual corpus, drop-upcycled with the founding
report's setting, the MoE and the dense baseline get identical continued pretraining, both are fine-tuned
on generated XNLI-layout data (fr, and en+fr+es), evaluated in all 15 languages, analysed, and the report
is written; it ends by printing the report's path and the headline table. A second run skips what is done.
"""

from __future__ import annotations

from pathlib import Path

HELP = "run the demo experiment (the founding report in miniature, offline): upcycle run demo.yaml"

#: The demo experiment, in the source tree (configs/ sits beside src/).
DEMO_YAML = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "demo.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, metavar="RUN", help="the run folder (default: demo-out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")


def options(args):
    from upcycle.config import ConfigError
    from upcycle.experiment.runner import RunOptions

    if not DEMO_YAML.is_file():
        raise ConfigError(
            "demo",
            str(DEMO_YAML),
            "the demo experiment is not here; run `upcycle run DEMO.yaml` from a clone",
        )
    ns = vars(args) if not isinstance(args, dict) else args
    return RunOptions(experiment=str(DEMO_YAML), out=ns.get("out"), dry_run=bool(ns.get("dry_run")))


def check(args):
    from upcycle.experiment.runner import prepare

    return prepare(options(args))


def run(args) -> int:
    from upcycle.experiment.runner import run_experiment

    return run_experiment(options(args))
