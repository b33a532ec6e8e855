"""Export an MoE checkpoint to a native Hugging Face Mixtral or Qwen2-MoE checkpoint.

The result loads with plain ``transformers`` (no ``import upcycle``), so any HF-compatible tool can use
it. Only models those architectures can express are exported; otherwise the error names every setting
that is not expressible. Training-only settings the target has no field for (z-loss and importance-loss
weights, noisy gating, a frozen router) do not change the forward pass; they are dropped and listed.

Mapping (per MoE layer i, E experts, expert width F):
  model.layers.i.mlp.router.weight            → model.layers.i.mlp.gate.weight              (E, D)
  (embedding router: its effective matrix, row i = P(d_i), computed once; Nexus §3, Fig. 2 notes the
  expert embeddings do not depend on the input, so the router is a plain linear router at inference)
  model.layers.i.mlp.experts.e.{gate,up}_proj → model.layers.i.mlp.experts.gate_up_proj[e]  (2F, D)
  model.layers.i.mlp.experts.e.down_proj      → model.layers.i.mlp.experts.down_proj[e]     (D, F)
  (Qwen2-MoE) shared experts, concatenated    → model.layers.i.mlp.shared_expert.*          (S·F)
  (Qwen2-MoE) shared_expert_gate              → model.layers.i.mlp.shared_expert_gate
  (Qwen2-MoE, ungated shared experts: gate weight 0, so sigmoid gives exactly 1/2, and the shared
  down_proj doubled; both factors are powers of two, so the output is the same to the last bit)
Everything else keeps its name.

Example:
  upcycle export llama-moe --format mixtral --out llama-moe-mixtral
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HELP = "export an MoE checkpoint to native Hugging Face Mixtral or Qwen2-MoE format"

FORMATS = ("mixtral", "qwen2_moe")


def add_arguments(parser) -> None:
    parser.add_argument(
        "path", metavar="PATH", help="MoE checkpoint folder written by `upcycle convert` or training"
    )
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="target architecture")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def _attn_bias(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) of the source attention."""
    if config.model_type == "moe_qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def unsupported_settings(model, fmt: str) -> list[str]:
    """Every setting of ``model`` that ``fmt`` cannot express (empty when exportable)."""
    cfg = model.config
    problems = []
    if cfg.model_type not in ("moe_llama", "moe_mistral", "moe_qwen2"):
        problems.append(
            f"architecture {cfg.model_type}: only Llama-family models (moe_llama, moe_mistral, moe_qwen2) map onto "
            f"{fmt}; GPT-2 has LayerNorm, learned positions and a non-gated MLP"
        )
        return problems
    from upcycle.models.modeling import moe_config_of

    m = moe_config_of(cfg)
    if m.expert_type != "glu" or m.expert_bias:
        problems.append("experts: need gated (glu) experts without biases")
    if m.router_type == "mlp" or m.router_bias:
        problems.append(
            f"router_type={m.router_type}, router_bias={m.router_bias}: need a linear (or embedding) router "
            "without bias"
        )
    if m.router_mode in ("random", "fixed"):
        problems.append(f"router_mode={m.router_mode}: need a learned (or frozen) router")
    if m.routing_unit != "token":
        problems.append(f"routing_unit={m.routing_unit}: need token-level routing")
    if m.global_routing:
        problems.append("global_routing: need layer-wise routing")
    if m.capacity_factor is not None:
        problems.append(f"capacity_factor={m.capacity_factor}: need dropless routing")
    qkv_bias, o_bias = _attn_bias(cfg)
    if fmt == "mixtral":
        if sorted(cfg.moe_layers) != list(range(cfg.num_hidden_layers)):
            problems.append(
                f"moe_layers={cfg.moe_layers}: Mixtral needs every layer to be MoE (try qwen2_moe)"
            )
        if m.num_shared_experts:
            problems.append(
                f"num_shared_experts={m.num_shared_experts}: Mixtral has no shared experts (try qwen2_moe)"
            )
        if m.score_order == "softmax_topk" and not m.renormalize:
            problems.append("renormalize=False: Mixtral always renormalises the top-k probabilities")
        if qkv_bias or o_bias:
            problems.append("attention biases: Mixtral attention has none")
    else:
        if o_bias:
            problems.append("attention output bias: Qwen2-MoE has q/k/v biases only")
        if getattr(cfg, "sliding_window", None) and cfg.model_type == "moe_mistral":
            problems.append("sliding_window: export Mistral-based models to mixtral")
    return problems


def dropped_training_settings(model) -> list[str]:
    from upcycle.models.modeling import moe_config_of

    m = moe_config_of(model.config)
    notes = []
    if m.z_loss_weight:
        notes.append(f"z_loss_weight={m.z_loss_weight}")
    if m.importance_loss_weight:
        notes.append(f"importance_loss_weight={m.importance_loss_weight}")
    if m.noisy_gating:
        notes.append("noisy_gating (noise weights not exported)")
    if m.router_mode == "frozen":
        notes.append("router_mode=frozen (exported as an ordinary router)")
    if m.router_type == "embedding":
        notes.append(
            "router_type=embedding (exported as its effective linear router; the domain embeddings and the "
            "projection stay in the upcycle checkpoint, which `upcycle extend` needs)"
        )
    if m.router_jitter:
        notes.append(f"router_jitter={m.router_jitter} (exported, but HF jitters the experts' input too)")
    return notes


def _base_config_fields(cfg) -> dict:
    keep = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
        "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
        "attention_dropout",
    )  # fmt: skip
    return {k: getattr(cfg, k) for k in keep if hasattr(cfg, k)}


def target_config(model, fmt: str):
    from transformers import MixtralConfig, Qwen2MoeConfig

    from upcycle.models.modeling import moe_config_of

    cfg = model.config
    m = moe_config_of(cfg)
    fields = _base_config_fields(cfg)
    fields.update(
        hidden_act=m.activation,
        num_experts_per_tok=m.top_k,
        # HF's load-balancing loss is k times ours (its token fractions sum to k): the same strength is
        # weight / k (moe.losses.equivalent_aux_loss_weights).
        router_aux_loss_coef=m.aux_loss_weight / m.top_k,
    )
    if fmt == "mixtral":
        head_dim = getattr(cfg, "head_dim", None)
        return MixtralConfig(
            **fields,
            intermediate_size=m.intermediate_size,
            num_local_experts=m.num_experts,
            router_jitter_noise=m.router_jitter,
            sliding_window=getattr(cfg, "sliding_window", None),
            **({"head_dim": head_dim} if head_dim else {}),
        )
    dense_layers = [i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layers]
    step = _sparse_step(cfg.moe_layers, cfg.num_hidden_layers)
    return Qwen2MoeConfig(
        **fields,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=m.intermediate_size,
        num_experts=m.num_experts,
        norm_topk_prob=m.renormalize or m.score_order == "topk_softmax",
        shared_expert_intermediate_size=m.num_shared_experts * m.shared_size,
        decoder_sparse_step=step or 1,
        mlp_only_layers=[] if step else dense_layers,
        qkv_bias=_attn_bias(cfg)[0],
    )


def _sparse_step(moe_layers: list[int], n: int) -> int | None:
    """Qwen2-MoE's decoder_sparse_step k (layer i is sparse iff (i+1) % k == 0) if it reproduces the layout."""
    for k in range(1, n + 1):
        if [i for i in range(n) if (i + 1) % k == 0] == sorted(moe_layers):
            return k
    return None


def export_state_dict(model, fmt: str) -> dict[str, torch.Tensor]:
    import torch

    with torch.no_grad():
        return _export_state_dict(model, fmt)


def _export_state_dict(model, fmt: str) -> dict[str, torch.Tensor]:
    import torch

    from upcycle.models.mapping import stacked_glu_experts

    state: dict[str, torch.Tensor] = {}
    moe_by_layer = model.moe_layers()
    prefixes = {i: f"model.layers.{i}.mlp." for i in moe_by_layer}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p) for p in prefixes.values()):
            continue
        state[name] = tensor
    for i, moe in moe_by_layer.items():
        p = prefixes[i]
        gate_up, down = stacked_glu_experts(moe)
        # The router's logit matrix (a Nexus embedding router's P(d_i) rows, computed in float32).
        state[p + "gate.weight"] = moe.router.effective_weight().detach().to(gate_up.dtype)
        state[p + "experts.gate_up_proj"] = gate_up
        state[p + "experts.down_proj"] = down
        if fmt == "qwen2_moe":
            shared = list(moe.shared_experts)
            gate = moe.shared_expert_gate
            # Qwen2-MoE always multiplies the shared expert by sigmoid(x·w): an ungated one becomes w = 0
            # (factor exactly 1/2) with its output projection doubled.
            unit = 1.0 if gate is not None or not shared else 2.0
            # S shared MLPs sum to one MLP whose units are all of theirs concatenated.
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                factor = unit if proj == "down_proj" else 1.0
                parts = [getattr(s, proj).weight.detach() * factor for s in shared]
                D, F_ = model.config.hidden_size, 0
                if parts:
                    state[p + f"shared_expert.{proj}.weight"] = torch.cat(parts, dim=dim)
                else:
                    shape = (F_, D) if dim == 0 else (D, F_)
                    state[p + f"shared_expert.{proj}.weight"] = gate_up.new_zeros(shape)
            state[p + "shared_expert_gate.weight"] = (
                gate.weight.detach() if gate is not None else gate_up.new_zeros(1, model.config.hidden_size)
            )
    return state


def export(path: str, fmt: str, out: str, overwrite: bool = False) -> list[str]:
    """Write ``fmt`` checkpoint to ``out``; returns the training-only settings that were dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    import upcycle.models.modeling  # noqa: F401  (registers the MoE model types)
    from upcycle.config import ConfigError, UserError
    from upcycle.io import atomic_output_dir, check_output_dir
    from upcycle.models.loading import first_line, load_errors, model_source

    if fmt not in FORMATS:
        raise ConfigError("format", fmt, f"allowed values are {', '.join(FORMATS)}")
    check_output_dir(out, overwrite)
    source = model_source(path, flag="PATH", check_weights=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except load_errors() as exc:
        raise UserError(f"cannot load '{path}': {first_line(exc)}") from exc
    if not hasattr(model, "moe_layers"):
        raise UserError(f"'{path}' is not an upcycle MoE checkpoint (model type {model.config.model_type})")
    problems = unsupported_settings(model, fmt)
    if problems:
        raise UserError(f"cannot export to {fmt}: " + "; ".join(problems))
    tcfg = target_config(model, fmt)
    tcfg.architectures = None
    with no_init_weights():
        target = AutoModelForCausalLM.from_config(tcfg, dtype=model.dtype)
    state = export_state_dict(model, fmt)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq"))]
    if target.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    target.tie_weights()
    target.generation_config = model.generation_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:
        tokenizer = None
    with atomic_output_dir(out, overwrite) as tmp:
        target.save_pretrained(tmp, max_shard_size="500MB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return dropped_training_settings(model)


def run(args) -> int:
    dropped = export(args.path, args.format, args.out, args.overwrite)
    print(f"wrote {args.out} ({args.format})")
    if dropped:
        print("training-only settings not carried over: " + ", ".join(dropped))
    return 0
