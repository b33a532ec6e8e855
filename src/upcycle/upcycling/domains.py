"""Domain embeddings for the Nexus router (Gritsch et al. 2024, arXiv 2408.15901, §3).

The router of a Nexus MoE scores token x for expert i as x · P(d_i), where d_i embeds the data domain
expert i was trained on. The paper embeds each domain's training data with an external embedding model
(Cohere Embed v3) and averages; offline and model-agnostic, we default to the *seed* model as the
embedder: d = the mean over a sample of the domain's text (``embed_tokens`` tokens, documents packed
with EOS between them into blocks of up to ``EMBED_BLOCK`` tokens) of the seed's last hidden state (after
its final norm). A file of precomputed vectors (``--domain-embeddings``, safetensors or .pt, one vector
per domain name, any size) replaces the embedder, e.g. for vectors from a sentence-embedding model.

The same embedder must embed a domain added later (``upcycle extend``), so every checkpoint records how
its embeddings were made (config ``upcycling`` block and ``upcycling.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle.config import ConfigError, UserError

#: Tokens per block when embedding text (capped by the model's context length).
EMBED_BLOCK = 256
#: Blocks per forward pass when embedding text.
EMBED_BATCH = 8
#: The embedder's name in checkpoint records.
EMBEDDER = "mean last hidden state of the seed model"


@dataclass
class DomainEmbeddings:
    """One vector per domain name and how each was made."""

    vectors: dict[str, torch.Tensor]
    """name → (M,) float32 vector, as computed or read (the router stores it scaled to unit length)."""
    record: dict[str, dict] = field(default_factory=dict)
    """name → {"source", "tokens", "model", "embedder"} or {"file"}: stored with the checkpoint."""
    token_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    """name → the token ids a vector was averaged over (domains embedded from text only)."""

    @property
    def size(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def matrix(self, names: list[str]) -> torch.Tensor:
        """(len(names), M) in the order of ``names``."""
        return torch.stack([self.vectors[n] for n in names])


def load_embedding_file(path: str, field_name: str = "domain_embeddings") -> dict[str, torch.Tensor]:
    """{name: vector} from a safetensors or .pt file holding a mapping of names to 1-D tensors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(field_name, path, "no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(file))
        else:
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            field_name, path, f"cannot read it as safetensors or a torch file: {first}"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError(field_name, path, "expected a mapping of domain names to vectors")
    out = {}
    for name, vector in data.items():
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or not vector.is_floating_point():
            raise ConfigError(
                field_name, path, f"entry '{name}' is not a 1-D float tensor (one vector per domain)"
            )
        if not torch.isfinite(vector).all() or not vector.abs().sum() > 0:
            raise ConfigError(field_name, path, f"entry '{name}' is zero or not finite")
        out[str(name)] = vector.float()
    return out


def sample_tokens(tokenizer, source: str, tokens: int, text_field: str, field_name: str) -> torch.Tensor:
    """Up to ``tokens`` token ids (1-D) from the first documents of ``source``, EOS after each document."""
    from upcycle.data.sources import DocumentStream, resolve_source

    spec = resolve_source(source, None, "train", text_field, field=field_name)
    docs = DocumentStream(spec, loop=False, field=field_name)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    while len(ids) < tokens:
        texts = docs.take(64)
        if not texts:
            break
        for doc in tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]:
            ids.extend(doc)
            if eos is not None and (not doc or doc[-1] != eos):
                ids.append(eos)
    if not ids:
        raise UserError(f"{field_name}: {source} yields no tokens")
    return torch.tensor(ids[:tokens], dtype=torch.long)


def blocks_of(ids: torch.Tensor, model) -> list[torch.Tensor]:
    """``ids`` cut into (1, ≤ EMBED_BLOCK) rows the model's context can take (the last may be shorter)."""
    cfg = model.config
    context = (
        getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or EMBED_BLOCK
    )
    return [b.unsqueeze(0) for b in ids.split(min(EMBED_BLOCK, context))]


@torch.no_grad()
def mean_last_hidden_state(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean over every token of ``ids`` of ``model``'s last hidden state (float32, (D,))."""
    model.eval()
    total, count = None, 0
    rows = blocks_of(ids, model)
    full = [r for r in rows if r.shape[1] == rows[0].shape[1]]
    batches = [torch.cat(full[i : i + EMBED_BATCH]) for i in range(0, len(full), EMBED_BATCH)]
    batches += [r for r in rows if r.shape[1] != rows[0].shape[1]]
    for batch in batches:
        hidden = model.base_model(
            input_ids=batch, attention_mask=torch.ones_like(batch)
        ).last_hidden_state.float()
        s = hidden.sum(dim=(0, 1))
        total = s if total is None else total + s
        count += batch.numel()
    return total / count


def embedder_tokenizer(model, name: str, field_name: str):
    """The embedder's tokenizer; a one-line error naming the way around it when there is none."""
    from upcycle.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(name, model_config=model.config)
    except UserError as err:
        raise UserError(
            f"cannot tokenise --{field_name.replace('_', '-')}: {err}; or give --domain-embeddings FILE"
        ) from None


def _recorded(name: str) -> str:
    """A local file or folder as an absolute path (``upcycle extend`` reads the record from any folder and
    loads the recorded embedder again); a hub id as given."""
    from upcycle.io import absolute_path, expand_path

    return absolute_path(name) if expand_path(name).exists() else name


def embed_domains(
    names: list[str],
    data: dict[str, str],
    file: str | None,
    embedder: tuple[object, str] | None,
    tokens: int,
    text_field: str,
    field_name: str = "domain_data",
) -> DomainEmbeddings:
    """A vector for every name: from its text in ``data`` under ``embedder`` = (model, name), else from
    ``file``. Errors (one line) name a domain with neither, and vectors of different sizes."""
    from_file = load_embedding_file(file) if file else {}
    for name in names:  # every domain covered, before any text is embedded
        if name not in data and name not in from_file:
            where = f"; {file} holds {', '.join(sorted(from_file))}" if file else ""
            raise ConfigError(
                field_name,
                name,
                f"domain '{name}' has no --domain-data and no --domain-embeddings entry{where}",
            )
    if data and embedder is None:
        raise ConfigError(field_name, next(iter(data.values())), "no embedder model to embed the text with")
    vectors, record, token_ids = {}, {}, {}
    tokenizer = embedder_tokenizer(*embedder, field_name) if data and any(n in data for n in names) else None
    for name in names:
        if name in data:
            ids = sample_tokens(tokenizer, data[name], tokens, text_field, field_name)
            vectors[name], token_ids[name] = mean_last_hidden_state(embedder[0], ids), ids
            record[name] = {
                "source": _recorded(data[name]),
                "tokens": int(ids.numel()),
                "model": _recorded(embedder[1]),
                "embedder": EMBEDDER,
            }
        else:
            vectors[name], record[name] = from_file[name], {"file": _recorded(file)}
    sizes = {n: v.numel() for n, v in vectors.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError("domain_embeddings", sizes, "every domain embedding must have the same size")
    return DomainEmbeddings(vectors, record, token_ids)


__all__ = [
    "EMBEDDER",
    "DomainEmbeddings",
    "embed_domains",
    "load_embedding_file",
    "mean_last_hidden_state",
    "sample_tokens",
]
