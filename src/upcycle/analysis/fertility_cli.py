"""Tokenizer fertility per language (the founding report's Table 1): tokens per word, the share of words
split into two or more tokens (Rust et al. 2021) and the tokenisation premium relative to English on
parallel data (Petrov et al. 2023), counted on the text as the model sees it. Words are
whitespace-separated by default (Thai and Chinese "words" are then phrases); --words unicode uses
Unicode word boundaries (UAX #29), --words icu ICU's dictionaries. Definitions: docs/analysis.md.

Examples:
  upcycle fertility --tokenizer gpt2 --data facebook/xnli --languages all --split test --out fertility
  upcycle fertility --tokenizer gpt2 meta-llama/Llama-3.2-1B --languages en,th,zh --words unicode --out fert
"""

from __future__ import annotations

from upcycle.analysis.config import FertilityConfig
from upcycle.config import add_dataclass_flags, split_commas

HELP = "tokenizer fertility per language: tokens per word, words split, tokenisation premium vs English"


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, FertilityConfig)


def config_from_args(args) -> FertilityConfig:
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    values = {k: v for k, v in ns.items() if k in FertilityConfig.__dataclass_fields__ and v is not None}
    for name in ("names", "text_fields"):  # space- or comma-separated, as in every command
        if name in values:
            values[name] = split_commas(values[name])
    return FertilityConfig(**values)


def check(args) -> FertilityConfig:
    """The options, the output folder and the tokenizer and data names, checked before torch is imported
    (issue 11): a mistyped name fails at once while the hub is unreachable."""
    from upcycle.io import check_output_dir
    from upcycle.models.loading import check_dataset_name, check_tokenizer_name

    cfg = config_from_args(args)
    check_output_dir(cfg.out, cfg.overwrite)
    for name in cfg.tokenizer:
        check_tokenizer_name(name)
    check_dataset_name(cfg.data)
    return cfg


def run(args) -> int:
    from upcycle.analysis.cli import quiet_datasets
    from upcycle.analysis.fertility import fertility

    cfg = config_from_args(args)
    quiet_datasets()
    doc = fertility(cfg)
    for name, entry in doc["tokenizers"].items():
        shown = ", ".join(
            f"{lang} {'–' if s['fertility'] is None else format(s['fertility'], '.2f')}"
            for lang, s in entry["languages"].items()
        )
        print(f"{name}: tokens per word {shown}")
    print(f"wrote {cfg.out}")
    return 0
