"""Options of ``upcycle analyze routing``, ``upcycle analyze training`` and ``upcycle fertility``: typed
dataclasses whose field docstrings are the command-line help, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from upcycle.config import ConfigError, check_literals, check_positive

GroupBy = Literal["language", "label", "domain"]
Choice = Literal["topk", "top1"]
Words = Literal["whitespace", "unicode", "icu"]
DType = Literal["float32", "bfloat16", "float16"]


def _check_names(names: list[str] | None, n: int, what: str) -> None:
    if names is None:
        return
    if len(names) != n:
        raise ConfigError("names", names, f"give one name per {what} ({n}), in order")
    if len(set(names)) != len(names):
        raise ConfigError("names", names, "names must be distinct")


@dataclass
class RoutingAnalysisConfig:
    """Options of ``upcycle analyze routing``: which experts the tokens of each group go to."""

    models: list[str] = field(default_factory=list)
    """MoE checkpoints (folders or hub ids): causal LMs or fine-tuned sequence classifiers."""
    data: str = "facebook/xnli"
    """XNLI-layout data: a hub id or a local folder with one sub-folder per language. Ignored with
    --domain."""
    group_by: GroupBy | None = None
    """Group tokens by 'language' or 'label' (XNLI data) or by 'domain' (--domain sources); default
    'domain' with --domain, else 'language'."""
    languages: str = "all"
    """XNLI languages to read: 'all' or a comma-separated list (en,fr,es)."""
    split: str | None = None
    """Split to read: default 'test' for XNLI data, 'validation' for hub --domain sources (local files
    have no splits)."""
    domain: list[str] | None = None
    """A text domain as NAME=SOURCE (repeat the flag): a local file or folder of JSON lines, Parquet or
    text, or a hub dataset id, optionally with its configuration as HUB_ID:CONFIG."""
    text_field: str = "text"
    """Column holding the text of --domain sources."""
    max_tokens: int = 200_000
    """Tokens (padding excluded) counted per group; the last sequence of a group is cut to fit, so groups
    with enough text have equal totals. Drop-Upcycling's analysis used about 200k tokens per domain."""
    max_length: int | None = None
    """Tokens per sequence: default 128 for XNLI pairs (the fine-tuning input) and 1024 (or the model's
    context, if shorter) for domain text, whose longer documents are cut into consecutive pieces."""
    batch_size: int = 16
    """Sequences per forward pass."""
    device: str | None = None
    """Torch device (default: cuda if available, else cpu)."""
    dtype: DType = "float32"
    """Model weights' dtype for the forward passes (routers compute in float32 whatever this is)."""
    names: list[str] | None = None
    """Names of the models (routing) or runs (training) in the outputs, in order, space- or
    comma-separated (default: folder or hub names)."""
    choice: Choice = "topk"
    """Counts the figures draw: every top-k choice ('topk', fractions sum to k per group) or the top-1
    choice ('top1'). routing.json always holds both."""
    out: str | None = None
    """Output folder (written whole at the end): routing.json, routing.md and figures for routing;
    training.json, training.md and figures for training."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        if self.group_by is None:
            self.group_by = "domain" if self.domain else "language"
        if self.split is None:
            self.split = "validation" if self.domain else "test"
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        if not self.models:
            raise ConfigError("models", self.models, "give at least one MoE checkpoint")
        check_positive(self, "max_tokens", "max_length", "batch_size")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError("max_length", self.max_length, "must be ≥ 3")
        if self.group_by == "domain" and not self.domain:
            raise ConfigError(
                "domain", self.domain, "--group-by domain needs --domain NAME=SOURCE (repeat it)"
            )
        if self.domain and self.group_by != "domain":
            raise ConfigError(
                "group_by", self.group_by, "--domain sources are grouped by domain; use --group-by domain"
            )
        if self.out is None:
            raise ConfigError("out", None, "give the output folder with --out DIR")
        _check_names(self.names, len(self.models), "model")


@dataclass
class TrainingAnalysisConfig:
    """Options of ``upcycle analyze training``: loss curves, expert activation over training, accuracy."""

    runs: list[str] = field(default_factory=list)
    """Run folders of ``upcycle pretrain`` or ``upcycle finetune`` (each with a metrics.jsonl)."""
    names: list[str] | None = None
    """Names of the runs in the outputs, in order, space- or comma-separated (default: folder names)."""
    collapse_share: float = 0.1
    """An expert has collapsed where its share of the layer's assignments stays below this fraction of an
    even share 1/E (Fan et al. 2024's expert collapse)."""
    collapse_records: int = 3
    """Consecutive training records an expert's share must stay below that threshold to count as a
    collapse (all the records, in a run that logged fewer)."""
    out: str | None = None
    """Output folder: training.json, training.md and the figures (PNG and SVG)."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("runs", self.runs, "give at least one run folder")
        check_positive(self, "collapse_share", "collapse_records")
        if self.collapse_share >= 1:
            raise ConfigError("collapse_share", self.collapse_share, "must be in (0, 1)")
        if self.out is None:
            raise ConfigError("out", None, "give the output folder with --out DIR")
        _check_names(self.names, len(self.runs), "run")


@dataclass
class FertilityConfig:
    """Options of ``upcycle fertility``: how many tokens a tokenizer spends per word, per language."""

    tokenizer: list[str] = field(default_factory=lambda: ["gpt2"])
    """Tokenizers to compare (hub ids or folders; 'gpt2' works offline)."""
    data: str = "facebook/xnli"
    """XNLI-layout data: a hub id or a local folder with one sub-folder per language."""
    languages: str = "all"
    """Languages: 'all' or a comma-separated list (en,fr,th)."""
    split: str = "test"
    """Split to count on."""
    text_fields: list[str] = field(default_factory=lambda: ["premise", "hypothesis"])
    """Columns whose text is counted, space- or comma-separated (each encoded on its own, as the
    fine-tuning input encodes them)."""
    words: Words = "whitespace"
    """What a word is: 'whitespace' (runs between spaces, as the founding report's Table 1; Thai and
    Chinese 'words' are then whole phrases), 'unicode' (Unicode default word boundaries, UAX #29: each
    Han ideograph or Thai letter is a word) or 'icu' (ICU's dictionary-based word breaks for Thai, Lao,
    Khmer, Burmese, Chinese and Japanese; needs PyICU)."""
    reference: str = "en"
    """Language the tokenisation premium is relative to (Petrov et al. 2023); added if not listed."""
    max_examples: int | None = None
    """Examples per language (default: all)."""
    names: list[str] | None = None
    """Names of the tokenizers in the outputs, in order, space- or comma-separated (default: as given)."""
    out: str | None = None
    """Output folder: fertility.json, fertility.csv, fertility.md and the bar chart (PNG and SVG)."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_literals(self)
        if not self.tokenizer:
            raise ConfigError("tokenizer", self.tokenizer, "give at least one tokenizer")
        if not self.text_fields:
            raise ConfigError("text_fields", self.text_fields, "give at least one column")
        check_positive(self, "max_examples")
        if self.out is None:
            raise ConfigError("out", None, "give the output folder with --out DIR")
        _check_names(self.names, len(self.tokenizer), "tokenizer")


__all__ = ["FertilityConfig", "RoutingAnalysisConfig", "TrainingAnalysisConfig"]
