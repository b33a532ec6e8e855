"""XNLI and other sentence-pair (or single-text) classification data: languages, labels, loading, and
the input a decoder-only model sees.

Layout. The hub repository ``facebook/xnli`` has one configuration per language, each a folder holding
``train-*.parquet``, ``validation-*.parquet`` and ``test-*.parquet`` with the columns ``premise``,
``hypothesis`` and ``label`` (0 entailment, 1 neutral, 2 contradiction). A local folder laid out the
same way (one sub-folder per language; Parquet or JSON lines files whose names start with the split
name) is read directly from its files, so no hub access and no README are needed; a folder written by
:func:`upcycle.data.synthetic.write_synthetic_xnli` also carries the hub's README ``configs:`` block, so
``datasets.load_dataset(folder, "fr")`` works on it too. Any other dataset (PAWS-X, MNLI, a single-text
task) goes through the same code with other ``text_fields`` / ``label_field``; its "languages" are its
configuration names (``None`` for a dataset without configurations).

Model input (documented choice; the founding report gives none). A pair (a, b) becomes

    ids(a) + [SEP] + ids(b)

with SEP the tokenizer's ``sep_token`` if it has one, else its EOS token (GPT-2: ``<|endoftext|>``).
Nothing is appended after the last segment: the classified position is the last real token, found from
the attention mask, never from the pad id. GPT-2 has no pad token, so pad = EOS (as ``convert`` sets)
and an EOS can occur inside a row (the separator), which is why pooling must use the mask (transformers
issues #35352 and #35909). Too long pairs are truncated longest-first, keeping the separator. Rows are
padded on the right by default.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle.config import ConfigError, UserError, first_line
from upcycle.io import expand_path, looks_like_path

#: The 15 XNLI languages in the order of the founding report's tables.
XNLI_LANGUAGES: tuple[str, ...] = (
    "en", "ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh",
)  # fmt: skip
#: XNLI's label ids, in order: 0 entailment, 1 neutral, 2 contradiction.
XNLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
XNLI_HUB = "facebook/xnli"
XNLI_TEXT_FIELDS: tuple[str, ...] = ("premise", "hypothesis")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: File suffixes a local mirror may use, and the datasets builder of each.
_LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json"}


def parse_languages(
    spec: str | Sequence[str] | None,
    *,
    field: str = "languages",
    allowed: Sequence[str] | None = XNLI_LANGUAGES,
) -> list[str]:
    """``'all'``, ``'en,fr,es'`` or a list → language codes in the order given (``'all'``: ``allowed``).

    With ``allowed=None`` (a dataset other than XNLI) any configuration name is accepted, and ``'none'``
    means the dataset has no configurations (returns ``[]``).
    """
    if spec is None:
        raise ConfigError(field, spec, "give 'all' or a comma-separated list of language codes")
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if items == ["all"]:
        if allowed is None:
            raise ConfigError(field, spec, "'all' needs a known language list; name the configurations")
        return list(allowed)
    if allowed is None and items == ["none"]:
        return []
    if not items:
        raise ConfigError(field, spec, "give 'all' or a comma-separated list of language codes")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise ConfigError(field, bad[0], f"unknown language; XNLI's are {', '.join(allowed)} (or 'all')")
    if len(set(items)) != len(items):
        raise ConfigError(field, spec, "a language is listed twice")
    return items


def report_order(languages: Sequence[str]) -> list[str]:
    """XNLI languages in the founding report's order (en ar bg … zh, its Tables 2 and 3: issue 12),
    whatever order they were listed in; anything else in the order given."""
    if all(lang in XNLI_LANGUAGES for lang in languages):
        return [lang for lang in XNLI_LANGUAGES if lang in languages]
    return list(languages)


def is_local(data: str) -> bool:
    return looks_like_path(data)


def local_files(data: str, config: str | None, split: str, *, field: str = "data") -> tuple[str, list[str]]:
    """(builder, files) of ``split`` in a local hub-layout folder: ``DATA/CONFIG/SPLIT*`` (or
    ``DATA/SPLIT*`` without a configuration). Errors name what the folder does have."""
    root = expand_path(data)
    if not root.is_dir():
        raise ConfigError(field, data, "no such folder")
    folder = root / config if config else root
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise ConfigError(
            field, data, f"has no folder for language '{config}'; it has {', '.join(have) or 'none'}"
        )
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.startswith(split) and _builder_of(p) is not None
    )
    if not files:
        have = sorted({p.name.split("-")[0].split(".")[0] for p in folder.iterdir() if _builder_of(p)})
        raise ConfigError(
            field,
            data,
            f"{folder} has no '{split}' files ({split}-*.parquet or .jsonl); splits there: "
            f"{', '.join(have) or 'none'}",
        )
    builders = {_builder_of(p) for p in files}
    if len(builders) > 1:
        raise ConfigError(field, data, f"{folder} mixes Parquet and JSON files for split '{split}'")
    return builders.pop(), [str(p) for p in files]


def _builder_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for s, b in _LOCAL_BUILDERS.items() if name.endswith(s)), None)


def load_split(data: str, config: str | None, split: str, *, field: str = "data"):
    """One split as a ``datasets.Dataset``: a hub id (``load_dataset(data, config, split=split)``) or
    a local hub-layout folder (read from its files). Errors are one line naming ``field``."""
    from datasets import load_dataset

    try:
        if is_local(data):
            builder, files = local_files(data, config, split, field=field)
            return load_dataset(builder, data_files={split: files}, split=split)
        return load_dataset(data, config, split=split)
    except (ConfigError, UserError):
        raise
    except Exception as exc:  # offline hub, unknown config, unreadable file
        first = first_line(exc)
        where = f"{data}" + (f" ({config}, {split})" if config else f" ({split})")
        hint = "" if is_local(data) else " (offline? pass a local folder laid out like the hub repository)"
        raise UserError(f"cannot load {where}: {first}{hint}") from exc


def check_fields(dataset, text_fields: Sequence[str], label_field: str | None, *, where: str) -> None:
    """The named columns exist; the error lists the columns the dataset has."""
    columns = list(dataset.column_names)
    for name, flag in [*((t, "text_fields") for t in text_fields), (label_field, "label_field")]:
        if name is not None and name not in columns:
            raise ConfigError(flag, name, f"not a column of {where}; columns are {', '.join(columns)}")


def label_names(dataset, label_field: str) -> list[str]:
    """Names of the label ids: a ``ClassLabel``'s names, else XNLI's for 3 integer classes, else
    ``label_0``… for integers (or the sorted distinct strings for string labels)."""
    feature = dataset.features.get(label_field)
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = sorted(set(dataset[label_field]))
    if all(isinstance(v, str) for v in values):
        return list(values)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        n = max(values) + 1
        return list(XNLI_LABELS) if n == 3 else [f"label_{i}" for i in range(n)]
    raise ConfigError("label_field", label_field, "labels must be integers or strings")


@dataclass(frozen=True)
class PairFormat:
    """How examples become token ids for a decoder-only classifier (see the module docstring)."""

    sep_id: int
    pad_id: int
    max_length: int = 128

    @classmethod
    def for_tokenizer(cls, tokenizer, max_length: int = 128) -> PairFormat:
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if sep is None or pad is None:
            raise UserError("the tokenizer has neither a separator nor an end-of-sequence token")
        if max_length < 3:
            raise ConfigError("max_length", max_length, "must be ≥ 3 (two segments and a separator)")
        return cls(sep, pad, max_length)

    def join(self, segments: Sequence[list[int]]) -> list[int]:
        """Segments joined by SEP, truncated longest-first to ``max_length`` (separators kept)."""
        segs = [list(s) for s in segments]
        budget = self.max_length - (len(segs) - 1)
        while sum(len(s) for s in segs) > budget:
            longest = max(range(len(segs)), key=lambda i: len(segs[i]))
            segs[longest].pop()
        out: list[int] = []
        for i, s in enumerate(segs):
            if i:
                out.append(self.sep_id)
            out.extend(s)
        return out


def encode_examples(tokenizer, columns: Sequence[Sequence[str]], fmt: PairFormat) -> list[list[int]]:
    """Token ids of every row: ``columns`` holds one list of strings per text field (premises,
    hypotheses); each row is its segments joined by :meth:`PairFormat.join`."""
    encoded = [tokenizer(list(col), add_special_tokens=False)["input_ids"] for col in columns]
    return [fmt.join(segments) for segments in zip(*encoded)]


def pad_batch(rows: Sequence[list[int]], pad_id: int, side: str = "right"):
    """(input_ids_BS, attention_mask_BS) long tensors, padded to the longest row on ``side``."""
    import torch

    if side not in ("right", "left"):
        raise ConfigError("padding_side", side, "allowed values are 'right', 'left'")
    S = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(0, len(r)) if side == "right" else slice(S - len(r), S)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def last_token_index(attention_mask_BS):
    """Index of the last real token of every row, for right or left padding (never from pad ids)."""
    import torch

    S = attention_mask_BS.shape[1]
    positions = torch.arange(S, device=attention_mask_BS.device).expand_as(attention_mask_BS)
    return torch.where(attention_mask_BS.bool(), positions, -1).max(dim=1).values


__all__ = [
    "SPLITS",
    "XNLI_HUB",
    "XNLI_LABELS",
    "XNLI_LANGUAGES",
    "XNLI_TEXT_FIELDS",
    "PairFormat",
    "check_fields",
    "encode_examples",
    "is_local",
    "label_names",
    "last_token_index",
    "load_split",
    "local_files",
    "pad_batch",
    "parse_languages",
]
