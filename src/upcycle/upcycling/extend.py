"""``upcycle extend``: append routed experts to a trained MoE, one per new dense model.

Nexus (Gritsch et al. 2024, arXiv 2408.15901, §3 "Efficient adaptation to new domains"): a dense model
trained on a new domain is added to an upcycled MoE by appending its MLP to the routed experts of every
MoE layer; the router entry of the new expert is the trained projection of the new domain's embedding,
e_new = P(d_new), so tokens reach the new expert before any further training. A lightweight finetuning
follows (``upcycle pretrain`` on the extended checkpoint).

- Embedding router: d_new is made the way the checkpoint's domain embeddings were made (recorded at
  conversion): the mean last hidden state of the embedder model (default: the recorded one, normally
  the seed) over ``--domain-data``, or a vector from ``--domain-embeddings``.
- Linear (or MLP) router, the naive baseline: the new row is drawn as ``--router-init`` says ('mean' of
  the existing rows, 'zeros', 'normal:STD', 'uniform:A'; default the checkpoint's router init). The
  paper's "MoE (linear router)" baseline instead re-initialises the whole router (§5.2).
- Every other weight is kept byte for byte (``--merge keep``, default). ``--merge average`` follows the
  paper: non-expert weights become (1 − λ)·φ_moe + λ·φ_new per new model, λ = 1/(n + 1) for n experts.
- ``--freeze-existing`` records ``trainable_parameters`` in the checkpoint's config (the new experts and
  the routers); the model applies it whenever it is loaded, so the following ``upcycle pretrain`` trains
  only those. The paper finetunes the whole extended model; freezing is the cheaper variant.

Function on the old domains is measured right after extension as at conversion: max |Δlogits| and mean
KL(old ‖ extended) on a probe batch (random tokens, or text of the old domains with ``--probe-data``),
plus the share of probe tokens the new experts take, and, for each new domain with text, the share of
its tokens routed to its expert in every layer. All of it is stored in the config's ``upcycling`` block
(``extensions``) and in ``upcycling.json``; the newest extension's figures are also the block's top-level
``function_preservation`` (with ``after_extension: N``), the conversion's kept as
``conversion_function_preservation``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle.config import ConfigError, UserError
from upcycle.moe.config import parse_router_init
from upcycle.upcycling.options import ExtendConfig, parse_named


@dataclass
class ExtendResult:
    model: object
    out: Path | None
    preservation: dict
    """max_abs_logit_diff, mean_kl, probe_tokens, probe, probe_routed_to_new."""
    new_expert_routing: dict = field(default_factory=dict)
    """name → {"expert", "tokens", "mean", "layers": {layer: share}} for new domains with text."""

    def report_line(self) -> str:
        p = self.preservation
        line = (
            f"function preservation on the old domains ({p['probe']}): max |Δlogits| = {p['max_abs_logit_diff']:.3g}, "
            f"mean KL = {p['mean_kl']:.3g}; {p['probe_routed_to_new']:.1%} of probe tokens go to the new expert(s)"
        )
        for name, r in self.new_expert_routing.items():
            line += (
                f"\n{name}: {r['mean']:.1%} of its tokens routed to expert {r['expert']} (mean over layers)"
            )
        return line


# --------------------------------------------------------------------------- loading and checks


def load_moe(name: str):
    """The MoE checkpoint to extend, in its stored dtype."""
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the MoE model types)
    from upcycle.models.loading import first_line, model_source

    source = model_source(name, flag="model")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load '{name}': {first_line(exc)}") from exc
    if not hasattr(model, "moe_layers") or not model.moe_layers():
        raise ConfigError(
            "model", name, f"is not an upcycle MoE checkpoint (model type {model.config.model_type})"
        )
    return model.eval()


def check_dense(moe_model, name: str, spec: str, dense) -> None:
    """One-line errors when the dense model cannot give the MoE an expert (architecture, shapes)."""
    from upcycle.models.modeling import FAMILY_BY_MOE_TYPE, moe_config_of
    from upcycle.upcycling.dense import DenseMLP

    want = FAMILY_BY_MOE_TYPE[moe_model.config.model_type].source_model_type
    if dense.config.model_type != want:
        raise ConfigError(
            "expert", spec, f"is a {dense.config.model_type} model; the MoE was built from {want}"
        )
    m = moe_config_of(moe_model.config)
    layers = moe_model.decoder_layers()
    dense_layers = dense.base_model.h if hasattr(dense.base_model, "h") else dense.base_model.layers
    if len(dense_layers) != len(layers):
        raise ConfigError("expert", spec, f"has {len(dense_layers)} layers; the MoE has {len(layers)}")
    mlp = DenseMLP.from_module(dense_layers[next(iter(moe_model.moe_layers()))].mlp)
    got = (mlp.kind, mlp.hidden_size, mlp.intermediate_size, mlp.up_bias is not None)
    expected = (m.expert_type, m.hidden_size, m.intermediate_size, m.expert_bias)
    if got != expected:
        raise ConfigError(
            "expert",
            spec,
            f"MLP (type, hidden, intermediate, bias) = {got}; the MoE's experts are {expected}",
        )
    moe_state = {k: v.shape for k, v in moe_model.state_dict().items()}
    for key, tensor in dense.state_dict().items():
        if key in moe_state and moe_state[key] != tensor.shape:
            raise ConfigError("expert", spec, f"differs from the MoE in shape at {key}")


def expert_names(config) -> list[str]:
    """Names of the routed experts in order (recorded by nexus conversions and extensions)."""
    from upcycle.models.modeling import moe_config_of

    n = moe_config_of(config).num_experts
    names = list((config.upcycling or {}).get("expert_names") or [])
    return names if len(names) == n else [f"expert{i}" for i in range(n)]


def added_experts(config) -> dict[str, int]:
    """Name → index of the routed experts added by ``upcycle extend`` (recorded in ``extensions``)."""
    extensions = (getattr(config, "upcycling", None) or {}).get("extensions") or []
    names = expert_names(config)
    return {n: names.index(n) for ext in extensions for n in ext.get("experts", {}) if n in names}


def recorded_embedder(config) -> str | None:
    """The model that embedded the checkpoint's domains from text, if the record names one."""
    domains = ((config.upcycling or {}).get("nexus") or {}).get("domain_embeddings", {}).get("domains", {})
    models = {r["model"] for r in domains.values() if "model" in r}
    return next(iter(models)) if len(models) == 1 else None


def freeze_patterns(first_new: int, count: int) -> list[str]:
    """``trainable_parameters`` for --freeze-existing: the new experts of every MoE layer and the routers."""
    return [f"*.mlp.experts.{e}.*" for e in range(first_new, first_new + count)] + ["*.mlp.router.*"]


def new_domain_embeddings(old, cfg: ExtendConfig, names: list[str], data: dict[str, str]):
    """The new domains' embeddings for an embedding router (None for other routers)."""
    from upcycle.models.modeling import moe_config_of
    from upcycle.upcycling.convert import load_source
    from upcycle.upcycling.domains import embed_domains

    m = moe_config_of(old.config)
    if m.router_type != "embedding":
        for name in ("domain_embeddings", "embedder"):
            if getattr(cfg, name):
                raise ConfigError(
                    name,
                    getattr(cfg, name),
                    f"the MoE's router is {m.router_type}: it has no domain embeddings",
                )
        return None
    if cfg.router_init is not None:  # the new entry is P(d_new): there is no row to initialise
        raise ConfigError(
            "router_init",
            cfg.router_init,
            "applies to linear and mlp routers only; the MoE's embedding router gives the new expert "
            "the projection of its domain embedding",
        )
    embedder = None
    if data:
        name = cfg.embedder or recorded_embedder(old.config)
        if name is None:
            raise ConfigError(
                "embedder",
                None,
                "the checkpoint records no model that embedded its domains; give --embedder MODEL",
            )
        try:
            embedder = (load_source(name).model, name)
        except UserError as err:
            flag = "embedder" if cfg.embedder else "embedder (recorded in the checkpoint)"
            raise ConfigError(flag, name, f"cannot be loaded ({err}); give --embedder MODEL") from None
    found = embed_domains(
        names, data, cfg.domain_embeddings, embedder, cfg.embed_tokens, cfg.domain_text_field
    )
    size = m.domain_embedding_size or m.hidden_size
    if found.size != size:
        raise ConfigError("domain_embeddings", found.size, f"the router's domain embeddings have size {size}")
    return found


def _router_rows(old: torch.Tensor, count: int, spec: str, generator: torch.Generator) -> torch.Tensor:
    """``count`` new rows for a linear (or MLP output) router matrix ``old`` (E, in)."""
    from upcycle.moe.router import init_router_weight

    if spec == "mean":
        return old.float().mean(0, keepdim=True).expand(count, -1).to(old.dtype)
    rows = torch.empty(count, old.shape[1], dtype=torch.float32)
    init_router_weight(rows, parse_router_init(spec), generator)
    return rows.to(old.dtype)


def _extend_router_state(state: dict, prefix: str, moe, count: int, embeddings, spec: str, generator) -> None:
    """Append ``count`` experts' entries to the router tensors of one MoE layer in ``state``."""
    import torch.nn.functional as F

    cat = torch.cat
    if moe.config.router_type == "embedding":
        key = prefix + "router.domain_embeddings"
        # Unit rows as Router.set_domain_embeddings stores them; the old rows are kept bit for bit.
        state[key] = cat([state[key], F.normalize(embeddings.float(), dim=-1).to(state[key].dtype)])
    else:
        key = prefix + "router.weight"
        state[key] = cat([state[key], _router_rows(state[key], count, spec, generator)])
    for name in ("router.bias", "router.noise_weight"):  # start at zero, as Router.reset_parameters does
        if prefix + name in state:
            old = state[prefix + name]
            state[prefix + name] = cat([old, old.new_zeros(count, *old.shape[1:])])


@torch.no_grad()
def build_extended(old, dense_models: list, embeddings, cfg: ExtendConfig):
    """The MoE with ``len(dense_models)`` more routed experts per MoE layer; see the module docstring."""
    from transformers.initialization import no_init_weights

    from upcycle.models.modeling import FAMILY_BY_MOE_TYPE, moe_config_of
    from upcycle.moe import MoE
    from upcycle.upcycling.dense import DenseMLP, copy_into_expert

    m, count = moe_config_of(old.config), len(dense_models)
    config = copy.deepcopy(old.config)
    config.moe = m.replace(num_experts=m.num_experts + count).to_dict()
    config.trainable_parameters = freeze_patterns(m.num_experts, count) if cfg.freeze_existing else None
    with no_init_weights():
        model = FAMILY_BY_MOE_TYPE[config.model_type].causal_lm_cls(config)
    model.to(old.dtype)
    state = dict(old.state_dict())
    prefixes = {f"{name}.": mod for name, mod in old.named_modules() if isinstance(mod, MoE)}
    generator = torch.Generator().manual_seed(cfg.seed)
    for prefix, moe in prefixes.items():
        if moe.router is not None:
            _extend_router_state(
                state, prefix, moe, count, embeddings, cfg.router_init or m.router_init, generator
            )
    if cfg.merge == "average":
        # Nexus §3: φ = (1 − λ)·φ_moe + λ·φ_new with λ = 1/(n + 1), one share per new model.
        n = m.num_experts
        news = [d.state_dict() for d in dense_models]
        for key, tensor in state.items():
            if (
                not key.startswith(tuple(prefixes))
                and tensor.is_floating_point()
                and all(key in s for s in news)
            ):
                total = tensor.float() * n + sum(s[key].float() for s in news)
                state[key] = (total / (n + count)).to(tensor.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_keys = {k for k in model.state_dict() if k not in state}
    if unexpected or set(missing) != new_keys:
        raise UserError(
            f"extension mapping incomplete: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}"
        )
    blocks = [d.base_model.h if hasattr(d.base_model, "h") else d.base_model.layers for d in dense_models]
    for i, moe in model.moe_layers().items():
        for j, dense_blocks in enumerate(blocks):
            copy_into_expert(moe.experts[m.num_experts + j], DenseMLP.from_module(dense_blocks[i].mlp))
    model.tie_weights()
    model.apply_trainable_parameters()
    model.generation_config = old.generation_config
    return model.eval()


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def routed_share(model, ids: torch.Tensor, experts: list[int]) -> dict:
    """Share of the tokens of ``ids`` that ``experts`` receive, per MoE layer and on average."""
    from upcycle.upcycling.domains import blocks_of

    model.eval()
    model.reset_routing_stats()
    for block in blocks_of(ids, model):
        model(input_ids=block, attention_mask=torch.ones_like(block))
    layers = {}
    for layer, s in model.routing_stats().items():
        layers[str(layer)] = sum(s["tokens_per_expert"][e] for e in experts) / max(s["tokens"], 1)
    model.reset_routing_stats()
    return {"tokens": int(ids.numel()), "mean": sum(layers.values()) / len(layers), "layers": layers}


def probe_ids(old, cfg: ExtendConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """The probe batch: rows of --probe-data text, or the fixed random-token probe of `convert`."""
    from upcycle.upcycling.convert import probe_batch
    from upcycle.upcycling.domains import sample_tokens

    context = getattr(old.config, "max_position_embeddings", cfg.probe_length)
    length = min(cfg.probe_length, context)
    if cfg.probe_data is None:
        return probe_batch(old.config.vocab_size, cfg.probe_batch, length), "random tokens"
    tok = tokenizer()
    ids = sample_tokens(tok, cfg.probe_data, cfg.probe_batch * length, cfg.domain_text_field, "probe_data")
    rows = ids.numel() // length
    if rows == 0:
        raise ConfigError("probe_data", cfg.probe_data, f"holds fewer than --probe-length={length} tokens")
    return ids[: rows * length].view(rows, length), cfg.probe_data


def measure(
    old, model, cfg: ExtendConfig, new_ids: list[int], domain_ids: dict, tokenizer
) -> tuple[dict, dict]:
    """(preservation on the old domains, routing of each new domain's tokens); ``domain_ids``: name →
    (its expert index, its token ids)."""
    from upcycle.upcycling.convert import logit_divergence

    ids, probe = probe_ids(old, cfg, tokenizer)
    max_diff, mean_kl = logit_divergence(old, model, ids)
    preservation = {
        "max_abs_logit_diff": max_diff,
        "mean_kl": mean_kl,
        "probe_tokens": int(ids.numel()),
        "probe": probe,
        "probe_routed_to_new": routed_share(model, ids.reshape(-1), new_ids)["mean"],
    }
    routing = {name: {"expert": e, **routed_share(model, t, [e])} for name, (e, t) in domain_ids.items()}
    return preservation, routing


# --------------------------------------------------------------------------- the command's function


def _record(
    old, cfg: ExtendConfig, new: dict[str, str], embeddings, preservation: dict, routing: dict
) -> dict:
    """The checkpoint's ``upcycling`` block with this extension added."""
    import upcycle
    from upcycle.models.modeling import moe_config_of
    from upcycle.upcycling.convert import routing_warnings

    up = copy.deepcopy(old.config.upcycling or {})
    up["expert_names"] = expert_names(old.config) + list(new)
    if embeddings is not None:
        domains = up.setdefault("nexus", {}).setdefault("domain_embeddings", {}).setdefault("domains", {})
        domains.update(embeddings.record)
    m = moe_config_of(old.config)
    router = (
        "projection of the domain embedding"
        if m.router_type == "embedding"
        else cfg.router_init or m.router_init
    )
    extensions = up.setdefault("extensions", [])
    extensions.append(
        {
            "from": cfg.model,
            "experts": new,
            "router": router,
            "merge": cfg.merge,
            "freeze_existing": cfg.freeze_existing,
            "function_preservation": preservation,
            "new_expert_routing": routing,
            "options": {
                k: v for k, v in cfg.to_dict().items() if k not in ("model", "expert", "out", "overwrite")
            },
            "upcycle_version": upcycle.__version__,
        }
    )
    # The top level holds the newest figures, where `convert` writes them and `inspect` and the report
    # read them; the conversion's own move to conversion_function_preservation (issue 15).
    if "function_preservation" in up and "conversion_function_preservation" not in up:
        up["conversion_function_preservation"] = up["function_preservation"]
    up["function_preservation"] = {**preservation, "after_extension": len(extensions), **routing_warnings(m)}
    return up


def _tokenizer_of(path: str, config):
    """A lazily loaded tokenizer for the MoE (needed only for text probes and linear-router domain text)."""
    from upcycle.data.tokenizers import load_tokenizer

    cache = []

    def get():
        if not cache:
            try:
                cache.append(load_tokenizer(path, model_config=config))
            except UserError as err:
                raise UserError(f"cannot tokenise text for the MoE: {err}") from None
        return cache[0]

    return get


def _saved_tokenizer(path: str):
    """The MoE folder's own tokenizer, copied to the output (None for a weights-only folder)."""
    from transformers import AutoTokenizer

    from upcycle.data.tokenizers import usable

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        return None
    return tokenizer if usable(tokenizer) else None


def extend(cfg: ExtendConfig) -> ExtendResult:
    """Load the MoE and the new dense models, append the experts, measure, and save (when ``cfg.out``)."""
    from upcycle.io import check_output_dir
    from upcycle.models.modeling import moe_config_of
    from upcycle.upcycling.convert import load_source, save_atomically
    from upcycle.upcycling.domains import sample_tokens

    if cfg.out is not None:
        check_output_dir(cfg.out, cfg.overwrite)
    old = load_moe(cfg.model)
    m = moe_config_of(old.config)
    if not m.has_router:
        raise ConfigError(
            "model", cfg.model, "router_mode=fixed assigns experts by label: there is no router to extend"
        )
    new = parse_named(cfg.expert, "expert")
    taken = [n for n in new if n in expert_names(old.config)]
    if taken:
        raise ConfigError("expert", taken[0], f"the MoE already has an expert named '{taken[0]}'")
    dense = {}
    for name, path in new.items():
        try:
            dense[name] = load_source(path).model
        except ConfigError as err:  # e.g. an MoE checkpoint given as the new expert
            raise ConfigError("expert", f"{name}={path}", err.allowed) from None
        check_dense(old, name, f"{name}={path}", dense[name])
    data = parse_named(cfg.domain_data, "domain_data")
    embeddings = new_domain_embeddings(old, cfg, list(new), data)
    model = build_extended(
        old, list(dense.values()), embeddings.matrix(list(new)) if embeddings is not None else None, cfg
    )
    tokenizer = _tokenizer_of(cfg.model, old.config)
    first = m.num_experts
    domain_ids = {}
    for j, name in enumerate(new):
        if name in data:
            found = embeddings.token_ids.get(name) if embeddings is not None else None
            ids = (
                found
                if found is not None
                else sample_tokens(
                    tokenizer(), data[name], cfg.embed_tokens, cfg.domain_text_field, "domain_data"
                )
            )
            domain_ids[name] = (first + j, ids)
    preservation, routing = measure(
        old, model, cfg, list(range(first, first + len(new))), domain_ids, tokenizer
    )
    model.config.upcycling = _record(old, cfg, new, embeddings, preservation, routing)
    out = None
    if cfg.out is not None:
        out = save_atomically(model, _saved_tokenizer(cfg.model), cfg.out, cfg.overwrite)
    return ExtendResult(model, out, preservation, routing)


__all__ = [
    "ExtendConfig",
    "ExtendResult",
    "added_experts",
    "build_extended",
    "expert_names",
    "extend",
    "routed_share",
]
