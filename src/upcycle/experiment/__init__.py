"""``upcycle run``: one YAML runs a whole experiment (issue 14).

    from upcycle.experiment import RunOptions, run_experiment
    run_experiment(RunOptions(experiment="configs/experiments/demo.yaml"))

Stages (seed, specialists, convert, pretrain, extend, finetune, evaluate, analyze, report) call the
commands' own entry points; the plan, stage hashes, resume and sweeps live here. Format: docs/experiments.md.
"""

from upcycle._lazy import lazy_exports

_EXPORTS = {
    "RunOptions": "upcycle.experiment.runner",
    "run_experiment": "upcycle.experiment.runner",
    "prepare": "upcycle.experiment.runner",
    "load_experiment": "upcycle.experiment.spec",
    "build_plan": "upcycle.experiment.plan",
    "STAGES": "upcycle.experiment.sections",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["STAGES", "RunOptions", "build_plan", "load_experiment", "prepare", "run_experiment"]
