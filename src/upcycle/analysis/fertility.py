"""How many tokens a tokenizer spends on each language: the founding report's Table 1 and its relatives.

Per language and tokenizer, on the text fields of every example (XNLI: premise and hypothesis):

- **fertility**: tokens per word, Σ tokens / Σ words (the founding report's Table 1; Rust et al. 2021);
- **proportion of continued words**: the share of words split into two or more tokens (Rust et al. 2021);
- **tokens per example**, and the **tokenisation premium** relative to English (Petrov et al. 2023): on
  parallel data (XNLI's languages are translations of the same examples) the mean over examples of
  tokens(language, i) / tokens(English, i); 1.0 for English itself.

Tokens are counted on the text as the model sees it: each field is encoded whole, without special tokens,
as the fine-tuning input encodes it (:func:`upcycle.data.xnli.encode_examples`), so a word inside a
sentence costs what it costs there (with GPT-2's leading space), not what it would cost encoded alone. A
token belongs to every word its characters overlap (its span trimmed of white space), so "words split
into ≥ 2 tokens" follows the tokenizer's real segmentation of the sentence; tokens covering only white
space (GPT-2 spends one on a double space) count in the totals but belong to no word.

What a word is (``--words``):

- ``whitespace`` (default): maximal runs of non-space characters, punctuation attached ("world," is one
  word). This is what the founding report's 9.48 for Thai reflects: Thai, like Chinese and Japanese, is
  written without spaces between words, so a Thai "word" here is a phrase.
- ``unicode``: Unicode default word boundaries (UAX #29, via the ``regex`` module's ``WORD`` flag);
  words are the segments holding a letter, digit or ideograph (punctuation is no word). UAX #29 has no
  dictionary, so each Han ideograph, Hiragana letter and Thai letter is a word of its own.
- ``icu``: ICU's word break iterator (UAX #29 tailored with dictionaries for Thai, Lao, Khmer, Burmese,
  Chinese and Japanese), the closest to linguistic words; needs PyICU (``pip install PyICU``).

Outputs (``--out DIR``): ``fertility.json`` (format ``upcycle-fertility/1``: ``{"format", "data": {data,
split, languages, text_fields, words, reference}, "tokenizers": {NAME: {"languages": {LANG: {"examples",
"words", "tokens", "fertility", "continued_words", "proportion_continued", "tokens_per_example",
"premium"}}}}}``), ``fertility.csv`` (one row per tokenizer and language), ``fertility.md`` (the report's
table layout: languages as columns) and ``fertility.png``/``.svg`` (bars per language, tokenizers side by
side).

The command-line entry is :mod:`upcycle.analysis.fertility_cli`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from upcycle.analysis.config import FertilityConfig
from upcycle.config import ConfigError, UserError

FORMAT = "upcycle-fertility/1"


# --------------------------------------------------------------------------- words


def whitespace_words(text: str) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of non-space characters."""
    import regex

    return [m.span() for m in regex.finditer(r"\S+", text)]


def unicode_words(text: str) -> list[tuple[int, int]]:
    """UAX #29 default word boundaries; the segments holding a letter, digit or ideograph."""
    import regex

    spans, start = [], 0
    for m in regex.finditer(r"(?w)\b", text):
        end = m.start()
        if end > start and regex.search(r"[\p{L}\p{N}]", text[start:end]):
            spans.append((start, end))
        start = end
    return spans


def icu_words(text: str, locale: str = "") -> list[tuple[int, int]]:
    """ICU word breaks (dictionary-based for scripts without spaces); segments of letters/digits/ideographs."""
    try:
        import icu
    except ImportError as exc:
        raise UserError(
            "--words icu needs PyICU (pip install 'upcycle[icu]'); --words unicode needs nothing more"
        ) from exc
    breaker = icu.BreakIterator.createWordInstance(icu.Locale(locale))
    breaker.setText(text)
    breaker.first()
    # ICU counts UTF-16 code units; map them back to Python string indices.
    utf16 = _utf16_offsets(text)
    spans, start = [], 0
    for end in breaker:
        if breaker.getRuleStatus() >= 100:  # UBRK_WORD_NUMBER and above: numbers, letters, kana, ideographs
            spans.append((utf16[start], utf16[end]))
        start = end
    return spans


def _utf16_offsets(text: str) -> dict[int, int]:
    out, unit = {0: 0}, 0
    for i, ch in enumerate(text):
        unit += 2 if ord(ch) > 0xFFFF else 1
        out[unit] = i + 1
    return out


def word_splitter(kind: str, language: str = "") -> Callable[[str], list[tuple[int, int]]]:
    if kind == "whitespace":
        return whitespace_words
    if kind == "unicode":
        return unicode_words
    if kind == "icu":
        icu_words("", language)  # fail now, not mid-count, if PyICU is missing
        return lambda text: icu_words(text, language)
    raise ConfigError("words", kind, "allowed values are 'whitespace', 'unicode', 'icu'")


# --------------------------------------------------------------------------- counting


@dataclass
class TextCount:
    tokens: int
    words: int
    continued: int
    """Words overlapped by two or more tokens."""


def token_spans(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token character spans trimmed of surrounding white space (empty spans for white-space tokens)."""
    spans = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans


def count_text(text: str, offsets: Sequence[tuple[int, int]], words: list[tuple[int, int]]) -> TextCount:
    """Tokens, words and words split into ≥ 2 tokens of one text, from its tokens' character offsets."""
    per_word = [0] * len(words)
    starts = [s for s, _ in words]
    for start, end in token_spans(text, offsets):
        if start >= end:
            continue
        # Words overlapping [start, end): from the last word starting at or before `start` onwards.
        w = max(bisect.bisect_right(starts, start) - 1, 0)
        while w < len(words) and words[w][0] < end:
            if words[w][1] > start:
                per_word[w] += 1
            w += 1
    return TextCount(len(offsets), len(words), sum(1 for n in per_word if n >= 2))


def count_texts(tokenizer, texts: list[str], split_words) -> list[TextCount]:
    """One :class:`TextCount` per text, encoded as a whole without special tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{type(tokenizer).__name__} is a slow tokenizer: fertility needs token offsets (a fast one)"
        )
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [count_text(t, o, split_words(t)) for t, o in zip(texts, encoded["offset_mapping"])]


def language_counts(tokenizer, columns: Sequence[list[str]], split_words) -> dict:
    """Totals of one language (``columns``: one list of texts per field) and tokens per example."""
    per_field = [count_texts(tokenizer, list(col), split_words) for col in columns]
    per_example = [sum(c.tokens for c in counts) for counts in zip(*per_field)]
    flat = [c for counts in per_field for c in counts]
    tokens, words, continued = (sum(getattr(c, k) for c in flat) for k in ("tokens", "words", "continued"))
    return {
        "examples": len(per_example),
        "words": words,
        "tokens": tokens,
        "fertility": tokens / words if words else None,
        "continued_words": continued,
        "proportion_continued": continued / words if words else None,
        "tokens_per_example": tokens / len(per_example) if per_example else None,
        "_per_example": per_example,
    }


def add_premium(stats: dict[str, dict], reference: str) -> None:
    """Petrov et al. (2023)'s premium: mean over parallel examples of tokens(lang, i) / tokens(ref, i)."""
    ref = stats[reference]["_per_example"]
    for lang, s in stats.items():
        mine = s.pop("_per_example") if lang != reference else s["_per_example"]
        pairs = [(m, r) for m, r in zip(mine, ref) if r > 0]
        s["premium"] = sum(m / r for m, r in pairs) / len(pairs) if len(mine) == len(ref) and pairs else None
    stats[reference].pop("_per_example")


def load_columns(cfg: FertilityConfig, languages: list[str]) -> dict[str, list[list[str]]]:
    """{language: one list of texts per text field}, checked before any counting."""
    from upcycle.data.xnli import check_fields, load_split

    columns = {}
    for lang in languages:
        ds = load_split(cfg.data, lang, cfg.split, field="data")
        check_fields(ds, cfg.text_fields, None, where=f"{cfg.data} ({lang}, {cfg.split})")
        if cfg.max_examples is not None:
            ds = ds.select(range(min(cfg.max_examples, len(ds))))
        if len(ds) == 0:
            raise UserError(f"{cfg.data} ({lang}, {cfg.split}) has no examples")
        columns[lang] = [[t or "" for t in ds[f]] for f in cfg.text_fields]
    return columns


def _model_config(name: str):
    """A model folder's config, so a converted GPT-2 without tokenizer files gets GPT-2's tokenizer."""
    from pathlib import Path

    if not (Path(name).expanduser() / "config.json").is_file():
        return None
    from transformers import AutoConfig

    import upcycle.models  # noqa: F401  (registers the MoE model types)

    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()))
    except (OSError, ValueError):
        return None


def measure(cfg: FertilityConfig) -> dict:
    """The fertility.json document (see the module docstring)."""
    from upcycle.analysis.routing_data import languages_of
    from upcycle.data.tokenizers import load_tokenizer

    languages = languages_of(cfg.data, cfg.languages)
    loaded = languages if cfg.reference in languages else [cfg.reference, *languages]
    names = cfg.names or list(cfg.tokenizer)
    tokenizers = {
        name: load_tokenizer(t, model_config=_model_config(t)) for name, t in zip(names, cfg.tokenizer)
    }
    splitters = {lang: word_splitter(cfg.words, lang) for lang in loaded}
    columns = load_columns(cfg, loaded)
    out: dict = {
        "format": FORMAT,
        "data": {
            "data": cfg.data,
            "split": cfg.split,
            "languages": loaded,
            "text_fields": list(cfg.text_fields),
            "words": cfg.words,
            "reference": cfg.reference,
        },
        "tokenizers": {},
    }
    for name, tokenizer in tokenizers.items():
        stats = {lang: language_counts(tokenizer, columns[lang], splitters[lang]) for lang in loaded}
        add_premium(stats, cfg.reference)
        out["tokenizers"][name] = {"path": cfg.tokenizer[names.index(name)], "languages": stats}
    return out


# --------------------------------------------------------------------------- outputs

#: (key in fertility.json, column title) of the per-language figures, in table order.
COLUMNS = (
    ("fertility", "tokens per word"),
    ("proportion_continued", "words split into ≥ 2 tokens"),
    ("tokens_per_example", "tokens per example"),
    ("premium", "premium vs {ref}"),
)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def csv_text(doc: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    keys = ["examples", "words", "tokens", "continued_words", *(k for k, _ in COLUMNS)]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["tokenizer", "language", *keys])
    for name, entry in doc["tokenizers"].items():
        for lang, s in entry["languages"].items():
            writer.writerow([name, lang, *("" if s[k] is None else s[k] for k in keys)])
    return buf.getvalue()


def markdown_text(doc: dict) -> str:
    """The founding report's Table 1 layout: languages as columns, one row per tokenizer and measure."""
    data = doc["data"]
    langs = data["languages"]
    lines = [
        f"# Tokenizer fertility on {data['data']} ({data['split']}, {', '.join(data['text_fields'])})",
        "",
        f"Words: {data['words']} (see `upcycle fertility --help`). Premium: mean over parallel examples of "
        f"tokens(language) / tokens({data['reference']}) (Petrov et al. 2023).",
        "",
        "| tokenizer | measure | " + " | ".join(langs) + " |",
        "| --- | --- | " + " | ".join("---" for _ in langs) + " |",
    ]
    for name, entry in doc["tokenizers"].items():
        for key, title in COLUMNS:
            values = [_fmt(entry["languages"][lang][key]) for lang in langs]
            lines.append(f"| {name} | {title.format(ref=data['reference'])} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, folder) -> list[str]:
    import json

    from upcycle.analysis import plots

    (folder / "fertility.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (folder / "fertility.csv").write_text(csv_text(doc))
    (folder / "fertility.md").write_text(markdown_text(doc))
    figure = plots.fertility_figure(doc, [(k, t.format(ref=doc["data"]["reference"])) for k, t in COLUMNS])
    return [
        "fertility.json",
        "fertility.csv",
        "fertility.md",
        *plots.save_figure(figure, folder, "fertility"),
    ]


def fertility(cfg: FertilityConfig) -> dict:
    """Measure every tokenizer, then write the output folder in one go."""
    from upcycle.io import atomic_output_dir, check_output_dir

    check_output_dir(cfg.out, cfg.overwrite)
    doc = measure(cfg)
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        write_outputs(doc, tmp)
    return doc


__all__ = [
    "FORMAT",
    "count_text",
    "count_texts",
    "fertility",
    "icu_words",
    "measure",
    "unicode_words",
    "whitespace_words",
    "word_splitter",
]
