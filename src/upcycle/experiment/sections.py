"""What each section of an experiment YAML may hold: the keys of the command it runs, minus the keys the
runner sets itself, plus a few keys of its own (documented in the small dataclasses below, whose field
docstrings are also the reference in docs/experiments.md).

A section is checked with the command's own field types (``upcycle.config.check_mapping``), so an unknown
key is refused naming its YAML path and the keys allowed there (``finetune.lr_rate`` → "did you mean
finetune.lr?"), and a value of the wrong type names the key, the value and the type. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from upcycle.config import (
    ConfigError,
    check_mapping,
    check_positive,
    field_types,
    from_dict,
    normalise_keys,
    unknown_key_error,
)

#: The stages of an experiment, in the order they run (issue 14; ``specialists`` and ``extend`` serve the
#: Nexus study of issue 15).
STAGES = (
    "data",
    "seed",
    "specialists",
    "convert",
    "pretrain",
    "extend",
    "finetune",
    "evaluate",
    "analyze",
    "report",
)
#: Sections whose keys a ``sweep:`` may vary (the others merge every point: evaluate and analyze compare
#: all models side by side, the data is generated once).
SWEEPABLE = ("convert", "pretrain", "finetune", "seed", "specialists", "extend")
#: Which models an evaluation or routing analysis takes.
Of = Literal["pretrained", "finetuned", "extended"]

# ------------------------------------------------------------------------------------------ data


@dataclass
class XnliData:
    """An XNLI-layout folder (``{data}/xnli``) written by ``upcycle.data.synthetic.write_synthetic_xnli``:
    the same events rendered in every language, labels a small model can learn."""

    languages: str = "all"
    """'all' (XNLI's 15) or a comma-separated list."""
    train: int = 300
    """Training examples per language."""
    validation: int = 100
    """Validation examples per language."""
    test: int = 200
    """Test examples per language."""
    seed: int = 0
    """Seed of the generated events."""

    def __post_init__(self) -> None:
        check_positive(self, "train", "validation", "test")


@dataclass
class CorpusData:
    """A multilingual text corpus (``{data}/corpus/train.jsonl`` and ``eval.jsonl``) from the same
    lexicons, for the seed model and continued pretraining."""

    languages: str = "en,fr,es"
    """'all' or a comma-separated list of XNLI languages."""
    train: int = 2000
    """Training documents."""
    eval: int = 200
    """Held-out documents."""
    seed: int = 0
    """Seed of the documents."""

    def __post_init__(self) -> None:
        check_positive(self, "train", "eval")


@dataclass
class DomainData:
    """Text domains (``{data}/domains/NAME.jsonl``, ``NAME-eval.jsonl``, and ``mix.jsonl`` /
    ``mix-eval.jsonl`` of all of them shuffled) for specialised experts and routing per domain."""

    domains: list[str] = field(default_factory=lambda: ["prose", "code", "math"])
    """Domains to write: prose, code, math."""
    train: int = 400
    """Training documents per domain."""
    eval: int = 100
    """Held-out documents per domain."""
    seed: int = 0
    """Seed of the documents."""

    def __post_init__(self) -> None:
        from upcycle.data.synthetic import DOMAINS

        check_positive(self, "train", "eval")
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad or not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError("domains", bad[0] if bad else self.domains, f"give distinct names of {DOMAINS}")


@dataclass
class DataSection:
    """Generated data for offline studies, written to ``RUN/data/`` and referred to as ``{data}``."""

    xnli: XnliData | None = None
    """An XNLI-layout folder: ``{data}/xnli``."""
    corpus: CorpusData | None = None
    """A multilingual corpus: ``{data}/corpus/train.jsonl``, ``{data}/corpus/eval.jsonl``."""
    domains: DomainData | None = None
    """Text domains: ``{data}/domains/NAME.jsonl`` (and ``-eval``), ``mix.jsonl``."""


# ------------------------------------------------------------------------------ run-only keys


@dataclass
class SpecialistKeys:
    domains: dict = field(default_factory=dict)
    """NAME: {pretrain keys} per dense model specialised on one domain, each trained from the seed (or
    ``model``) with the section's keys plus its own (Nexus, BTX: Gritsch et al. 2024, Sukhbaatar et al.
    2024). Their final models are ``{specialists.NAME}``."""


@dataclass
class ConvertKeys:
    variants: dict = field(default_factory=dict)
    """NAME: {convert keys} per MoE to build and compare side by side, each overriding the section's keys
    (e.g. scratch / naive / drop); default: one MoE named 'moe'."""


@dataclass
class PretrainKeys:
    baseline: bool = True
    """Also give the dense model (the seed, else convert's source) the identical continued pretraining:
    same data, steps, batch and seed (the founding report's "future work 1": an equal baseline)."""


@dataclass
class ExtendKeys:
    of: list[str] | None = None
    """Variants (convert.variants names) to extend after their pretraining; default: every variant."""


@dataclass
class FinetuneKeys:
    settings: dict | list | None = None
    """Train-language settings, each model fine-tuned once per setting: a list ('fr', 'en,fr,es'; named
    fr, en-fr-es) or a mapping NAME: LANGUAGES. Default: one setting, train_languages."""


@dataclass
class EvaluateKeys:
    of: Of | None = None
    """Models evaluated: 'finetuned' (one results table per fine-tuning setting; default for xnli and
    classification), 'pretrained' (default for lm and lm-eval tasks) or 'extended'."""


@dataclass
class RoutingKeys:
    of: Of | None = None
    """Models analysed (MoE models only): 'finetuned' (one analysis per setting; default when there is a
    finetune section), 'pretrained' (the default otherwise) or 'extended' (after `upcycle extend`)."""


@dataclass
class AnalyzeSection:
    """``upcycle analyze`` and ``upcycle fertility`` over the run's models and training runs."""

    routing: dict = field(default_factory=dict)
    """NAME: {analyze routing keys} per routing analysis (by language, label or domain)."""
    training: dict | bool = True
    """{analyze training keys}: training curves of the pretraining runs (MoE vs dense) and of each
    fine-tuning setting; false: none."""
    fertility: dict | bool = False
    """{fertility keys}: tokenizer fertility per language (the founding report's Table 1); false: none."""


@dataclass
class SectionKind:
    """How one section maps onto a command: its config class, the keys the runner owns, its own keys."""

    command: type
    owned: dict[str, str]
    extra: type | None = None

    def types(self) -> dict[str, Any]:
        own = {k: v for k, v in field_types(self.command).items() if k not in self.owned}
        return {**own, **(field_types(self.extra) if self.extra else {})}


def _owned(*names: str, why: str) -> dict[str, str]:
    return dict.fromkeys(names, why)


_OUT = "upcycle run writes each task to RUN/<stage>/<name>"
_RESUME = "upcycle run resumes and reruns tasks itself"


def section_kinds() -> dict[str, SectionKind]:
    """Section name → its command's config, the runner-owned keys and the section's own keys."""
    from upcycle.analysis.config import FertilityConfig, RoutingAnalysisConfig, TrainingAnalysisConfig
    from upcycle.training.config import PretrainConfig
    from upcycle.training.finetune_config import FinetuneConfig
    from upcycle.upcycling.options import ExtendConfig

    runner = {
        **_owned("out", why=_OUT),
        **_owned("resume", "overwrite", why=_RESUME),
    }
    model = "upcycle run chooses it: every converted MoE and the dense baseline (set convert.model or seed)"
    kinds = {
        "seed": SectionKind(PretrainConfig, runner),
        "specialists": SectionKind(PretrainConfig, runner, SpecialistKeys),
        "pretrain": SectionKind(PretrainConfig, {**runner, "model": model}, PretrainKeys),
        "extend": SectionKind(ExtendConfig, {**runner, "model": model}, ExtendKeys),
        "finetune": SectionKind(FinetuneConfig, {**runner, "model": model}, FinetuneKeys),
        "analyze.routing": SectionKind(
            RoutingAnalysisConfig,
            {**runner, "models": model, "names": "upcycle run names the models"},
            RoutingKeys,
        ),
        "analyze.training": SectionKind(
            TrainingAnalysisConfig, {**runner, "runs": "upcycle run passes its training runs", "names": ""}
        ),
        "analyze.fertility": SectionKind(FertilityConfig, runner),
    }
    with contextlib.suppress(ImportError):  # upcycle evaluate
        from upcycle.evaluation.config import EvaluateConfig

        kinds["evaluate"] = SectionKind(
            EvaluateConfig, {**runner, "models": model, "names": "upcycle run names the models"}, EvaluateKeys
        )
    from upcycle.report.config import ReportConfig

    kinds["report"] = SectionKind(ReportConfig, {"run": "the run folder itself"})
    return kinds


@contextlib.contextmanager
def located(where: str, source: str | None, note: str = "") -> Iterator[None]:
    """Errors of a config built from a section name the section's YAML path and file (a config's own
    validation names only its field)."""
    try:
        yield
    except ConfigError as err:
        if err.source is not None:
            raise
        field_ = f"{where}.{err.field}" if where and not str(err.field).startswith(f"{where}.") else err.field
        raise ConfigError(field_, err.value, err.allowed + note, source=source) from None


def check_section(
    data: Any, kind: SectionKind, where: str, source: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(command keys, run-only keys) of one section, every key known and typed; runner-owned keys are
    refused with the reason."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, data, "expected a mapping of keys to values", source=source)
    data = normalise_keys(data) if not (kind.extra and _has_named(kind.extra)) else _normalise_top(data)
    for key in data:
        if key in kind.owned:
            why = kind.owned[key] or "upcycle run sets it"
            raise ConfigError(f"{where}.{key}", data[key], f"{why}; remove it", source=source)
    types_ = kind.types()
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise unknown_key_error([str(k) for k in unknown], data, types_, where=where, source=source)
    data = {k: _named_list(v) if _is_text_list(types_[k]) else v for k, v in data.items()}
    checked = check_mapping(data, types_, where=where, source=source)
    extra_names = {f.name for f in dataclasses.fields(kind.extra)} if kind.extra else set()
    return (
        {k: v for k, v in checked.items() if k not in extra_names},
        {k: v for k, v in checked.items() if k in extra_names},
    )


def _is_text_list(tp: Any) -> bool:
    import types
    import typing

    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    return any(typing.get_origin(a) is list and typing.get_args(a) == (str,) for a in args)


def _named_list(value: Any) -> Any:
    """NAME=VALUE lists (expert, domain_data, domain) may be written as a mapping {NAME: VALUE}."""
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    return value


def _has_named(extra: type) -> bool:
    """Run-only keys holding NAME: {...} mappings (variants, domains, settings), whose names are kept as
    written (only the keys inside are normalised)."""
    return any(f.name in ("variants", "domains", "settings") for f in dataclasses.fields(extra))


def _normalise_top(data: dict) -> dict:
    """Dashes to underscores in a section's own keys and in the keys of its named entries, not in the
    names themselves (a setting named en-fr-es keeps its name)."""
    out = {}
    for key, value in data.items():
        key = key.replace("-", "_") if isinstance(key, str) else key
        if key in ("variants", "domains", "settings") and isinstance(value, dict):
            value = {n: normalise_keys(v) if isinstance(v, dict) else v for n, v in value.items()}
        elif isinstance(value, dict):
            value = normalise_keys(value)
        out[key] = value
    return out


def build_config(cls: type, values: dict, where: str, source: str | None, note: str = ""):
    """``cls`` from checked values; its validation errors name the YAML path."""
    with located(where, source, note):
        return from_dict(cls, values, where="", source=None)


__all__ = [
    "STAGES",
    "SWEEPABLE",
    "AnalyzeSection",
    "CorpusData",
    "DataSection",
    "DomainData",
    "SectionKind",
    "XnliData",
    "build_config",
    "check_section",
    "located",
    "section_kinds",
]
