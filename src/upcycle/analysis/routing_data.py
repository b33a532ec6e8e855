"""The grouped text ``upcycle analyze routing`` runs a model over, and its token rows per tokenizer.

Groups:

- ``language``: one group per XNLI language; each example is the fine-tuning input, premise + SEP +
  hypothesis (:class:`upcycle.data.xnli.PairFormat`), so premise and hypothesis tokens are routed as the
  fine-tuned model sees them.
- ``label``: one group per NLI label, examples of all the chosen languages taken in turn (en, fr, …,
  en, fr, …) so a token budget covers every language alike.
- ``domain``: one group per ``--domain NAME=SOURCE`` text source (any source :mod:`upcycle.data.sources`
  reads); each document is encoded with the tokenizer's special tokens and cut into consecutive pieces of
  ``max_length`` tokens.

Text is read once and kept, and only as far as the largest token budget needs: a second model with
another tokenizer reads further where its tokenizer needs more text for the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from upcycle.config import ConfigError, UserError

#: Examples or documents read from a source at a time.
_CHUNK = 256


@dataclass
class TextGroup:
    """The items (text pairs or documents) of one group, read lazily from ``pull``."""

    name: str
    pull: Callable[[int], list]
    """Returns up to n more items; an empty list at the end of the source."""
    where: str
    items: list = field(default_factory=list)
    exhausted: bool = False

    def chunk(self, start: int) -> list:
        """Items [start, start + _CHUNK), reading more from the source as needed."""
        while len(self.items) < start + _CHUNK and not self.exhausted:
            more = self.pull(_CHUNK)
            if not more:
                self.exhausted = True
            self.items.extend(more)
        return self.items[start : start + _CHUNK]


@dataclass
class GroupedText:
    kind: str
    """'pairs' (XNLI premise/hypothesis) or 'documents'."""
    groups: list[TextGroup]
    description: dict
    """What routing.json records about the data."""

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]


# --------------------------------------------------------------------------- reading text


def languages_of(data: str, spec: str) -> list[str]:
    """Languages (configurations) to read: XNLI's codes for ``facebook/xnli`` and for 'all'; any
    configuration names of another hub-layout data set."""
    from upcycle.data.xnli import XNLI_HUB, XNLI_LANGUAGES, parse_languages

    strict = data == XNLI_HUB or str(spec).strip() == "all"
    return parse_languages(spec, allowed=XNLI_LANGUAGES if strict else None)


def _pairs_puller(datasets: Sequence, label: int | None = None) -> Callable[[int], list]:
    """Pairs from ``datasets`` taken in turn (one from each, then the next from each …), optionally only
    those with ``label``."""
    iters = [iter(zip(ds["premise"], ds["hypothesis"], ds["label"])) for ds in datasets]

    def pull(n: int) -> list:
        out: list = []
        while len(out) < n and iters:
            for it in list(iters):
                for premise, hypothesis, y in it:
                    if label is None or y == label:
                        out.append((premise, hypothesis))
                        break
                else:
                    iters.remove(it)
        return out

    return pull


def xnli_groups(data: str, languages: Sequence[str], split: str, group_by: str) -> GroupedText:
    """XNLI-layout data grouped by language or by label."""
    from upcycle.data.xnli import XNLI_TEXT_FIELDS, check_fields, label_names, load_split

    loaded = {}
    for lang in languages:
        ds = load_split(data, lang, split, field="data")
        try:
            check_fields(ds, XNLI_TEXT_FIELDS, "label", where=f"{data} ({lang}, {split})")
        except ConfigError as err:  # no --text-fields flag here: the data is what is wrong
            raise ConfigError("data", data, f"'{err.value}' is {err.allowed}") from None
        loaded[lang] = ds
    description = {"data": data, "split": split, "languages": list(languages), "group_by": group_by}
    if group_by == "language":
        groups = [
            TextGroup(lang, _pairs_puller([ds]), f"{data} ({lang}, {split})") for lang, ds in loaded.items()
        ]
    else:
        labels = label_names(next(iter(loaded.values())), "label")
        where = f"{data} ({', '.join(languages)}, {split})"
        groups = [
            TextGroup(name, _pairs_puller(list(loaded.values()), label=i), f"{where}, label {name}")
            for i, name in enumerate(labels)
        ]
    return GroupedText("pairs", groups, description)


def parse_domain(spec: str) -> tuple[str, str, str | None]:
    """``NAME=SOURCE`` or ``NAME=HUB_ID:CONFIG`` → (name, source, config)."""
    from upcycle.data.sources import looks_local

    name, sep, source = str(spec).partition("=")
    name, source = name.strip(), source.strip()
    if not sep or not name or not source:
        raise ConfigError("domain", spec, "expected NAME=SOURCE (a file, folder or hub dataset id)")
    config = None
    if not looks_local(source) and ":" in source:
        source, config = source.split(":", 1)
    return name, source, config


def domain_groups(specs: Sequence[str], split: str, text_field: str) -> GroupedText:
    """One group per ``NAME=SOURCE`` text source."""
    from upcycle.data.sources import DocumentStream, resolve_source

    groups, sources = [], {}
    for spec in specs:
        name, source, config = parse_domain(spec)
        if name in sources:
            raise ConfigError("domain", spec, f"domain '{name}' is given twice")
        resolved = resolve_source(source, config, split, text_field, field="domain")
        stream = DocumentStream(resolved, loop=False, field="domain")
        groups.append(TextGroup(name, stream.take, resolved.describe()))
        sources[name] = {"source": source, **({"config": config} if config else {})}
    description = {"domains": sources, "split": split, "text_field": text_field, "group_by": "domain"}
    return GroupedText("documents", groups, description)


# --------------------------------------------------------------------------- token rows


def encoder(kind: str, tokenizer, max_length: int) -> Callable[[list], list[list[int]]]:
    """items → token rows of at most ``max_length`` tokens."""
    if kind == "pairs":
        from upcycle.data.xnli import PairFormat, encode_examples

        fmt = PairFormat.for_tokenizer(tokenizer, max_length)
        return lambda items: encode_examples(tokenizer, [[p for p, _ in items], [h for _, h in items]], fmt)

    def encode_documents(items: list) -> list[list[int]]:
        rows = []
        for ids in tokenizer(list(items))["input_ids"]:
            rows.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length))
        return rows

    return encode_documents


def token_rows(
    group: TextGroup, encode: Callable[[list], list[list[int]]], max_tokens: int
) -> list[list[int]]:
    """Rows of ``group`` holding ``max_tokens`` tokens in all (fewer only if the source ends first); the
    last row is cut to fit. An empty group is an error."""
    rows: list[list[int]] = []
    total, start = 0, 0
    while total < max_tokens:
        items = group.chunk(start)
        if not items:
            break
        start += len(items)
        for row in encode(items):
            if not row:
                continue
            row = row[: max_tokens - total]
            rows.append(row)
            total += len(row)
            if total >= max_tokens:
                break
    if not rows:
        raise UserError(f"group '{group.name}' has no tokens: {group.where} holds no text for it")
    return rows


__all__ = [
    "GroupedText",
    "TextGroup",
    "domain_groups",
    "encoder",
    "languages_of",
    "parse_domain",
    "token_rows",
    "xnli_groups",
]
