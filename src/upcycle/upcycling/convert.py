"""``upcycle convert``: a dense Hugging Face causal LM in, an MoE checkpoint folder out.

Steps: load the source(s) → build the MoE model of the matching family without initialising it →
copy every non-MLP weight (averaged across sources for BTX) → initialise routers and experts with the
chosen method → measure function preservation on a fixed probe batch → write the folder atomically
(temporary folder, then rename), so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

import upcycle
from upcycle.config import ConfigError, UserError
from upcycle.data.tokenizers import align_pad_token, usable
from upcycle.io import atomic_output_dir, check_output_dir, expand_path
from upcycle.models.modeling import Family, family_for, moe_config_of
from upcycle.moe import MoE, MoEConfig
from upcycle.upcycling.dense import DenseMLP, copy_into_expert
from upcycle.upcycling.options import UpcycleConfig, parse_layers, used_options
from upcycle.upcycling.registry import LayerInit, get_method, prepare

#: Config keys of the source that must not be copied into the MoE config.
_DROP_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype"}


class UpcycleError(UserError):
    """A conversion that cannot proceed (unreadable source, mismatched BTX sources, …)."""


@dataclass
class Source:
    name: str
    model: PreTrainedModel
    tokenizer: object | None


@dataclass
class UpcycleResult:
    model: PreTrainedModel
    out: Path | None
    function_preservation: dict
    layer_info: dict[int, dict] = field(default_factory=dict)

    def report_line(self) -> str:
        return preservation_line(self.function_preservation)


def load_source(name: str) -> Source:
    """Load a dense causal LM (hub id or local folder, ``~`` expanded); errors are one line naming the
    source (a missing folder, an unreachable hub, a truncated weights file) and what is supported."""
    from upcycle.models.loading import first_line, load_errors, model_source

    try:
        source = model_source(name, flag="model", check_weights=True)
    except ConfigError as err:  # the library's error for a source it cannot use (the CLI checks first)
        raise UpcycleError(f"model '{name}': {err.allowed}") from None
    try:
        config = AutoConfig.from_pretrained(source)
    except load_errors() as exc:
        raise UpcycleError(f"cannot read model config from '{name}': {first_line(exc)}") from exc
    family_for(config.model_type)  # unsupported architectures fail here, before loading weights
    if config.model_type.startswith("moe_"):
        raise ConfigError("model", name, "is already an MoE checkpoint; give a dense source")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    except load_errors() as exc:
        raise UpcycleError(f"cannot load model weights from '{name}': {first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:  # a weights-only folder is a valid source; the output then has no tokenizer
        tokenizer = None
    if tokenizer is not None and not usable(tokenizer):
        # transformers 5 builds an empty tokenizer from a folder without vocabulary files instead of
        # failing; copying it would make every later text → [] silently.
        tokenizer = None
    return Source(name, model.eval(), tokenizer)


def build_moe_config(family: Family, source: PreTrainedModel, opts: UpcycleConfig) -> MoEConfig:
    """The MoEConfig of every MoE layer: user choices plus what the dense source decides."""
    cfg = source.config
    dense = DenseMLP.from_module(_blocks(source)[0].mlp)
    if dense.kind != family.expert_type:
        raise UpcycleError(f"{cfg.model_type} MLP is '{dense.kind}', expected '{family.expert_type}'")
    activation = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
    F_ = dense.intermediate_size
    if F_ % opts.granularity:
        raise ConfigError("granularity", opts.granularity, f"must divide the dense intermediate size {F_}")
    fields = dict(
        hidden_size=dense.hidden_size,
        intermediate_size=F_ // opts.granularity,
        expert_type=dense.kind,
        activation=activation,
        expert_bias=dense.up_bias is not None,
        dropout=float(getattr(cfg, "resid_pdrop", 0.0) or 0.0),
        shared_intermediate_size=F_,
        **opts.moe_fields(),
    )
    if fields["num_shared_experts"] and opts.moe.get("shared_intermediate_size", F_) != F_:
        raise ConfigError(
            "moe.shared_intermediate_size",
            opts.moe["shared_intermediate_size"],
            f"shared experts start as copies of the dense MLP, so it must equal d_ff={F_}",
        )
    return MoEConfig(**fields)


def _blocks(model: PreTrainedModel):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def _check_btx_sources(sources: list[Source], method: str = "btx") -> None:
    ref = sources[0]
    ref_shapes = {n: p.shape for n, p in ref.model.state_dict().items()}
    for src in sources[1:]:
        if src.model.config.model_type != ref.model.config.model_type:
            raise ConfigError(
                "model",
                src.name,
                f"{method} sources must share an architecture: {ref.model.config.model_type} "
                f"vs {src.model.config.model_type}",
            )
        shapes = {n: p.shape for n, p in src.model.state_dict().items()}
        if shapes.keys() != ref_shapes.keys():
            missing = sorted(ref_shapes.keys() ^ shapes.keys())[0]
            raise ConfigError("model", src.name, f"{method} sources differ in parameters (e.g. {missing})")
        for n, s in shapes.items():
            if s != ref_shapes[n]:
                raise ConfigError(
                    "model",
                    src.name,
                    f"{method} sources differ in shape at {n}: {tuple(ref_shapes[n])} vs {tuple(s)}",
                )


@torch.no_grad()
def upcycle_model(
    opts: UpcycleConfig, sources: list[Source] | None = None, progress: bool = True
) -> UpcycleResult:
    """Build (not save) the MoE model described by ``opts``. ``sources`` skips loading when given."""
    if sources is None:
        sources = [load_source(name) for name in opts.source_names]
    if opts.method in ("btx", "nexus"):
        if len(sources) < 2:
            raise ConfigError("model", opts.model, f"{opts.method} needs at least two dense sources")
        _check_btx_sources(sources, opts.method)
    src = sources[0].model
    family = family_for(src.config.model_type)
    method = get_method(opts.method)
    prepared = prepare(opts.method, opts, sources)
    moe_cfg = build_moe_config(family, src, opts).replace(**prepared.moe)
    layers = parse_layers(opts.layers, src.config.num_hidden_layers)

    cfg_dict = {k: v for k, v in src.config.to_dict().items() if k not in _DROP_KEYS}
    if cfg_dict.get("pad_token_id") is None and isinstance(cfg_dict.get("eos_token_id"), int):
        # Sequence classification on batches needs a pad token; GPT-2 has none, so reuse EOS (HF's advice).
        cfg_dict["pad_token_id"] = cfg_dict["eos_token_id"]
    upcycling = {
        "method": opts.method,
        "sources": [_recorded_source(name) for name in opts.source_names],
        "sources_as_given": opts.source_names,
        "seed": opts.seed,
        "layers": layers,
        "options": used_options(opts),
        "upcycle_version": upcycle.__version__,
        **prepared.upcycling,
    }
    config = family.config_cls(**cfg_dict, moe=moe_cfg.to_dict(), moe_layers=layers, upcycling=upcycling)
    # Every weight is about to be written: skip the random init (2-3 s and a full pass of RNG for GPT-2).
    with no_init_weights():
        model = family.causal_lm_cls(config)
    model.to(src.dtype)

    # 1. Everything that is not an MoE layer: copied, or averaged across BTX (Nexus: chosen) sources.
    state = _merged_state(prepared.merge or sources)
    moe_prefixes = tuple(f"{name}." for name, mod in model.named_modules() if isinstance(mod, MoE))
    written = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(moe_prefixes):
            continue
        if name not in state:
            if name in dict(model.named_buffers()):
                continue  # non-persistent buffers (rotary frequencies) are computed, not loaded
            raise UpcycleError(f"the source has no weight '{name}' needed by the MoE model")
        tensor.copy_(state[name])
        written.add(name)
    model.tie_weights()

    # 2. MoE layers: router init, then the method, then shared experts.
    generator = torch.Generator().manual_seed(opts.seed)
    per_source_blocks = [_blocks(s.model) for s in sources]
    layer_info: dict[int, dict] = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{opts.method} upcycling", total=len(layers))
        for i in layers:
            moe: MoE = _blocks(model)[i].mlp
            dense = [DenseMLP.from_module(blocks[i].mlp) for blocks in per_source_blocks]
            if moe.router is not None:
                moe.router.reset_parameters(generator)
            if moe.shared_expert_gate is not None:
                torch.nn.init.normal_(
                    moe.shared_expert_gate.weight, 0.0, config.initializer_range, generator=generator
                )
            ctx = LayerInit(
                i,
                moe,
                dense,
                generator,
                opts,
                getattr(config, "initializer_range", 0.02),
                prepared=prepared.data,
            )
            method(ctx)
            if "shared_experts" not in ctx.info:  # unless the method filled them (Nexus: the seed's MLP)
                _fill_shared_experts(moe, dense, opts.method == "scratch", ctx.initializer_range, generator)
            layer_info[i] = ctx.info
            bar.advance(task)

    model.generation_config = sources[0].model.generation_config
    model.eval()
    fp = function_preservation(src, model, opts)
    model.config.upcycling["function_preservation"] = fp
    return UpcycleResult(model, None, fp, layer_info)


def _recorded_source(name: str) -> str:
    """A local source as an absolute path (the record is read from other folders); a hub id as given."""
    from upcycle.io import absolute_path

    return absolute_path(name) if expand_path(name).is_dir() else name


def _fill_shared_experts(moe: MoE, dense: list[DenseMLP], scratch: bool, std: float, generator) -> None:
    """Shared experts: copies of the (averaged) dense MLP, or N(0, std) weights for from-scratch experts."""
    merged = DenseMLP.average(dense) if len(dense) > 1 else dense[0]
    for shared in moe.shared_experts:
        if not scratch:
            copy_into_expert(shared, merged)
            continue
        for p in shared.parameters():
            p.copy_(
                torch.normal(0.0, std, p.shape, generator=generator) if p.dim() == 2 else torch.zeros_like(p)
            )


def _merged_state(sources: list[Source]) -> dict[str, torch.Tensor]:
    states = [s.model.state_dict() for s in sources]
    if len(states) == 1:
        return states[0]
    merged = {}
    for name, t in states[0].items():
        if t.is_floating_point():
            merged[name] = torch.stack([s[name].float() for s in states]).mean(0).to(t.dtype)
        else:
            merged[name] = t
    return merged


def probe_batch(vocab_size: int, batch: int, length: int) -> torch.Tensor:
    """A fixed, tokenizer-independent probe: uniform random token ids from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


@torch.no_grad()
def logit_divergence(
    reference: PreTrainedModel, model: PreTrainedModel, ids: torch.Tensor
) -> tuple[float, float]:
    """(max |Δlogits|, mean KL(reference ‖ model) per token) on the rows of ``ids``, both in eval mode."""
    m = moe_config_of(model.config)
    max_diff, kl_sum = 0.0, 0.0
    # One sequence at a time: full-vocabulary logits of a whole batch would dominate peak memory.
    for i, row in enumerate(ids.split(1)):
        # Fixed routing takes its expert from a per-sequence label: the probe rows take turns.
        extra = {"sequence_labels": torch.tensor([i % m.num_experts])} if m.router_mode == "fixed" else {}
        ref_extra = extra if getattr(reference.config, "moe_layers", None) else {}
        d = reference.eval()(input_ids=row, **ref_extra).logits.float()
        out = model.eval()(input_ids=row, **extra).logits.float()
        max_diff = max(max_diff, float((d - out).abs().max()))
        kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(d, -1), log_target=True, reduction="none").sum(-1)
        kl_sum += float(kl.sum())
    # KL is ≥ 0; float rounding of two equal distributions can give -1e-9.
    return max_diff, max(0.0, kl_sum / ids.numel())


@torch.no_grad()
def function_preservation(dense: PreTrainedModel, moe_model: PreTrainedModel, opts: UpcycleConfig) -> dict:
    """max |Δlogits| and mean KL(dense ‖ MoE) per token on the probe batch, both models in eval mode."""
    length = min(opts.probe_length, getattr(dense.config, "max_position_embeddings", opts.probe_length))
    ids = probe_batch(dense.config.vocab_size, opts.probe_batch, length)
    m = moe_config_of(moe_model.config)
    max_diff, mean_kl = logit_divergence(dense, moe_model, ids)
    scaled = bool((moe_model.config.upcycling or {}).get("options", {}).get("weight_scaling"))
    return {
        "max_abs_logit_diff": max_diff,
        "mean_kl": mean_kl,
        "probe_tokens": int(ids.numel()),
        "scales_by_router_probability": not m.weights_sum_to_one,
        "weight_scaling": scaled or opts.scaling,
        **({"method": "nexus"} if getattr(opts, "method", None) == "nexus" else {}),
        **routing_warnings(m),
    }


def routing_warnings(m: MoEConfig) -> dict:
    """Routing settings a user should choose knowingly (issue 10), as flags stored with the checkpoint."""
    return {
        "router_without_lm_gradient": m.router_mode == "learned" and not m.router_learns_from_lm_loss,
        "routing_sees_future_tokens": m.routing_unit == "sequence" and m.router_mode != "fixed",
    }


def preservation_line(fp: dict) -> str:
    """The function-preservation figures (a conversion's, or the newest extension's) and, in the same line,
    what the routing choice implies for them and for the router's training signal; a second line warns of
    routing that sees future tokens."""
    line = f"function preservation: max |Δlogits| = {fp['max_abs_logit_diff']:.3g}, mean KL = {fp['mean_kl']:.3g}"
    if fp.get("after_extension"):  # `upcycle extend`'s figures: the MoE before vs after extension N
        line = (
            f"function preservation after extension {fp['after_extension']} (vs the MoE before it, on "
            f"{fp.get('probe', 'random tokens')}): max |Δlogits| = {fp['max_abs_logit_diff']:.3g}, mean KL = "
            f"{fp['mean_kl']:.3g}; {fp.get('probe_routed_to_new', 0):.1%} of probe tokens go to the new expert(s)"
        )
    elif fp.get("method") == "nexus":
        line += (
            " (vs the seed: a Nexus MoE adds each token's routed domain expert to the seed's MLP by design)"
        )
    elif fp.get("scales_by_router_probability") and not fp.get("weight_scaling"):
        line += (
            " — note: softmax-then-top-k without renormalisation (Switch-style) multiplies each expert's output"
            " by its router probability (≈ top_k/experts at initialisation), so the MoE does not start as the"
            " dense model; use --renormalize, --score-order topk_softmax or --weight-scaling to start from it"
        )
    if fp.get("router_without_lm_gradient"):
        line += (
            " — note: top-1 with combine weights that sum to 1 (renormalised, or top-k-then-softmax) gives every"
            " token weight 1, so the router gets no gradient from the LM loss, only from the auxiliary losses;"
            " use --no-renormalize (Switch-style) or --top-k 2 for a router the LM loss trains"
        )
    if fp.get("routing_sees_future_tokens"):
        line += (
            "\nwarning: routing_unit=sequence routes every token on logits summed over the whole sequence, so a"
            " token's experts depend on later tokens (the future leaks into a causal LM's predictions, and cached"
            " generation differs from a full forward); it reproduces Fan et al. 2024 — use --routing-unit"
            " sequence_prefix for the causal variant"
        )
    return line


def save_atomically(model: PreTrainedModel, tokenizer, out: str | os.PathLike, overwrite: bool) -> Path:
    """Write the checkpoint (and tokenizer, and ``upcycling.json``) through an atomic output folder."""
    with atomic_output_dir(out, overwrite) as tmp:
        # Shards bound the extra memory safetensors needs to serialise (it builds each file in memory).
        model.save_pretrained(tmp, max_shard_size="500MB")
        if tokenizer is not None:
            align_pad_token(tokenizer, model.config)
            tokenizer.save_pretrained(tmp)
        if model.config.upcycling:
            (tmp / "upcycling.json").write_text(json.dumps(model.config.upcycling, indent=2))
    return expand_path(out)


def convert(opts: UpcycleConfig, progress: bool = True) -> UpcycleResult:
    """Load, upcycle and save (when ``opts.out`` is set). The output folder is checked before any work."""
    if opts.out is not None:
        check_output_dir(opts.out, opts.overwrite)
    sources = [load_source(name) for name in opts.source_names]
    result = upcycle_model(opts, sources, progress=progress)
    if opts.out is not None:
        result.out = save_atomically(result.model, sources[0].tokenizer, opts.out, opts.overwrite)
    return result


def options_from(preset_name: str | None = None, **overrides) -> UpcycleConfig:
    """UpcycleConfig from a preset plus overrides (None values are ignored); unknown or mistyped option
    names are refused with a suggestion."""
    from upcycle.config import from_dict
    from upcycle.upcycling.options import preset

    base = preset(preset_name) if preset_name else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(UpcycleConfig, base)


__all__ = [
    "Source",
    "UpcycleError",
    "UpcycleResult",
    "convert",
    "function_preservation",
    "load_source",
    "logit_divergence",
    "options_from",
    "save_atomically",
    "upcycle_model",
]
