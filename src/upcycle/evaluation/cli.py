"""Evaluate models: the 15-language XNLI accuracy table of fine-tuned classifiers (the founding
report's Tables 2 and 3) with paired significance tests, held-out perplexity, or any
lm-evaluation-harness task zero-shot.

Options come from, in increasing priority: the defaults, the YAML file given with --config (same keys
as the flags, with underscores or dashes), and the flags. Writes OUT/results.json, OUT/results.csv and
OUT/results.md (all three, atomically).

Examples:
  upcycle evaluate runs/dense-fr/best runs/moe-fr/best --names GPT2 MoE --out results/fr
  upcycle evaluate runs/moe-fr/best --languages en,fr,es --data ./xnli-mirror --out results/moe
  upcycle evaluate gpt2 runs/moe/final --task lm --data allenai/c4 --limit 200 --out results/c4
  upcycle evaluate gpt2 runs/moe/final --task lm-eval:xnli --out results/zero-shot
  upcycle evaluate runs/moe/final --task lm-eval:hellaswag --limit 500 --out results/hellaswag
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from upcycle.config import ConfigError, add_dataclass_flags, merge_layers, read_yaml_layer, split_commas
from upcycle.evaluation.config import EvaluateConfig

HELP = "evaluate models: the XNLI table over 15 languages, held-out perplexity, or lm-eval tasks"


def add_arguments(parser) -> None:
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="model folders or hub ids, evaluated one after another (the first is the paired tests' baseline)",
    )
    parser.add_argument("--config", default=None, help="YAML file with any of the options below")
    add_dataclass_flags(parser, EvaluateConfig, skip=("models",))


def config_from_args(args) -> EvaluateConfig:
    """Resolve defaults < YAML < flags into a validated EvaluateConfig."""
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    yaml_path = ns.pop("config", None)
    flags = {k: v for k, v in ns.items() if k in EvaluateConfig.__dataclass_fields__}
    yaml_layer = read_yaml_layer(yaml_path, EvaluateConfig) if yaml_path else {}
    merged = merge_layers(yaml_layer, flags)
    if "names" in merged:  # --names a b, or --names a,b (as in every command)
        merged["names"] = split_commas(merged["names"])
    return EvaluateConfig.from_dict(merged)


def preflight(cfg: EvaluateConfig) -> None:
    """What can be checked without torch: the values a run needs, the results folder, model names, XNLI
    language codes and a hub dataset name (a mistyped one fails now, not after the models load)."""
    from upcycle.data.sources import resolve_source
    from upcycle.data.xnli import XNLI_LANGUAGES, parse_languages
    from upcycle.io import check_output_dir
    from upcycle.models.loading import check_dataset_name, model_source

    cfg.validate()
    cfg.check_runnable()
    check_output_dir(cfg.out, cfg.overwrite)  # before hours of evaluation, not after
    for path in cfg.models:
        model_source(path, flag="models")  # a mistyped folder fails before any data is read
    if cfg.task == "xnli" or cfg.lm_eval_task == "xnli":
        parse_languages(cfg.languages, field="languages", allowed=XNLI_LANGUAGES)
    if cfg.task == "lm":
        resolve_source(cfg.data, cfg.data_config, cfg.resolved_split, cfg.text_field_list[0], field="data")
    if cfg.resolved_data is not None:
        check_dataset_name(cfg.resolved_data)


def check(args) -> EvaluateConfig:
    """The resolved options and the names they point to, checked before torch is imported (issue 11)."""
    cfg = config_from_args(args)
    preflight(cfg)
    return cfg


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the evaluation ``cfg`` describes and write its results folder; returns results.json's dict."""
    from upcycle.evaluation.results import add_paired_tests, model_names, write_results
    from upcycle.evaluation.tasks import resolve_device

    preflight(cfg)
    resolve_device(cfg.device)
    names = model_names(cfg.models, cfg.names)
    baseline = cfg.baseline if cfg.baseline is not None else names[0]
    if baseline not in names:
        raise ConfigError("baseline", baseline, f"not a model name; the names are {', '.join(names)}")
    with quiet_datasets():
        if cfg.task == "lm":
            from upcycle.evaluation.tasks import lm_models

            results, correct = lm_models(cfg, names)
        elif cfg.is_lm_eval:
            from upcycle.evaluation.harness import lm_eval_models

            results, correct = lm_eval_models(cfg, names)
        else:
            from upcycle.evaluation.tasks import classification_models

            results, correct = classification_models(cfg, names)
    if len(correct) > 1 and baseline in correct:
        add_paired_tests(results, correct, baseline, cfg.bootstrap, cfg.seed)
    write_results(cfg.out, results, overwrite=cfg.overwrite, title=_title(cfg))
    return results


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No per-split "Generating ..." bars from datasets between our own progress lines."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _title(cfg: EvaluateConfig) -> str:
    if cfg.task == "lm":
        return f"Held-out language modelling on {cfg.data}"
    if cfg.is_lm_eval:
        shots = f"{cfg.num_fewshot}-shot" if cfg.num_fewshot else "zero-shot"
        return f"lm-evaluation-harness {cfg.lm_eval_task}, {shots}"
    return f"{cfg.task} accuracy on {cfg.resolved_data} ({cfg.resolved_split})"


def run(args) -> int:
    from upcycle.evaluation.results import render_markdown

    cfg = config_from_args(args)
    results = evaluate(cfg)  # checks again what check() did: evaluate() is also the Python entry point
    print(render_markdown(results, intervals=False).rstrip())
    print(f"wrote {cfg.out}/results.json, results.csv, results.md")
    return 0
