"""Show an MoE (or dense) checkpoint's layout, router settings, parameters, FLOPs and upcycling record.

Reads config.json only; parameters are counted on a model built on the meta device, so inspecting a
multi-billion-parameter checkpoint takes a second and no memory. Native Hugging Face Mixtral and
Qwen2-MoE checkpoints (``upcycle export`` writes them) are read too, so an export can be compared with its
source (issue 11).

Examples:
  upcycle inspect gpt2-moe
  upcycle inspect mixtral-export --json --seq-len 2048
"""

from __future__ import annotations

import json

HELP = "show an MoE checkpoint's layout, routing, total/active parameters and FLOPs per token"


def add_arguments(parser) -> None:
    from upcycle.config import integer

    parser.add_argument("path", metavar="PATH", help="checkpoint folder (or hub id)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--seq-len",
        type=integer,
        default=None,
        metavar="SEQ_LEN",
        help="sequence length for FLOPs (default: the model's context size)",
    )


def native_moe(config) -> tuple[list[int], dict] | None:
    """(MoE layer indices, MoEConfig fields) of a native Mixtral or Qwen2-MoE config, or None for others.

    The inverse of ``upcycle.models.export.target_config``: Mixtral is MoE in every layer with
    renormalised softmax-then-top-k; Qwen2-MoE is sparse where ``(i + 1) % decoder_sparse_step == 0`` and
    ``i`` is not in ``mlp_only_layers``, with one sigmoid-gated shared expert of
    ``shared_expert_intermediate_size`` units.
    """
    if config.model_type not in ("mixtral", "qwen2_moe"):
        return None  # a dense model (or one of ours): no native MoE fields to read
    n = config.num_hidden_layers
    common = dict(
        hidden_size=config.hidden_size,
        expert_type="glu",
        activation=getattr(config, "hidden_act", "silu"),
        expert_bias=False,
        top_k=config.num_experts_per_tok,
        # Our weight of the same strength as HF's coefficient (its loss is k times ours).
        aux_loss_weight=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        * config.num_experts_per_tok,
    )
    if config.model_type == "mixtral":
        fields = dict(
            common,
            intermediate_size=config.intermediate_size,
            num_experts=config.num_local_experts,
            renormalize=True,
            router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        )
        return list(range(n)), fields
    if config.model_type == "qwen2_moe":
        step = getattr(config, "decoder_sparse_step", 1) or 1
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        layers = [i for i in range(n) if i not in dense and config.num_experts > 0 and (i + 1) % step == 0]
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        fields = dict(
            common,
            intermediate_size=config.moe_intermediate_size,
            num_experts=config.num_experts,
            renormalize=bool(config.norm_topk_prob),
            num_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared or None,
            shared_expert_gate=bool(shared),
        )
        return layers, fields
    return None


def _moe_view(config):
    """``(config for accounting, MoE layers, MoEConfig)``: our MoE types as stored, native ones translated."""
    from types import SimpleNamespace

    from upcycle.moe.config import MoEConfig

    moe_layers = list(getattr(config, "moe_layers", None) or [])
    if moe_layers:
        from upcycle.models.modeling import moe_config_of

        return config, moe_layers, moe_config_of(config)
    native = native_moe(config)
    if native is None or not native[0]:
        return config, [], None
    layers, fields = native
    m = MoEConfig(**fields)
    view = SimpleNamespace(**config.to_dict())
    view.moe, view.moe_layers = m.to_dict(), layers
    return view, layers, m


def inspect_checkpoint(path: str, seq_len: int | None = None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import upcycle.models.modeling  # noqa: F401  (registers the MoE model types)
    from upcycle.analysis.accounting import account
    from upcycle.config import ConfigError, UserError
    from upcycle.models.loading import first_line, model_source

    if seq_len is not None and seq_len < 1:
        raise ConfigError("seq_len", seq_len, "must be a positive integer")
    source = model_source(path, flag="PATH")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read checkpoint config from '{path}': {first_line(exc)}") from exc
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:  # not a causal LM architecture transformers knows
        raise UserError(
            f"'{path}' ({config.model_type}) is not a causal language model: {first_line(exc)}"
        ) from exc
    total = sum(p.numel() for p in model.parameters())
    view, moe_layers, m = _moe_view(config)
    acc = account(view, total, seq_len)
    info: dict = {
        "path": str(path),
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "parameters": {"total": acc.total_params, "active": acc.active_params},
        "flops_per_token": {"forward": acc.flops_per_token, "dense_equivalent": acc.dense_flops_per_token},
        "flops_seq_len": acc.seq_len,
    }
    if moe_layers:
        info["moe"] = {"layers": moe_layers, **m.to_dict()}
        if m.has_router:
            from upcycle.moe.losses import equivalent_aux_loss_weights

            # Global routing: only the first MoE layer routes, so the mean is over one layer.
            routed = 1 if m.global_routing else len(moe_layers)
            info["aux_loss_conventions"] = {
                "routed_layers": routed,
                **equivalent_aux_loss_weights(m.aux_loss_weight, routed, m.top_k),
            }
        info["upcycling"] = getattr(config, "upcycling", None) or {}
    return info


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render(info: dict) -> str:
    lines = [
        f"{info['path']}: {info['model_type']}, {info['num_layers']} layers, hidden {info['hidden_size']}"
    ]
    moe = info.get("moe")
    if moe:
        n = len(moe["layers"])
        score = moe["score_order"]
        if score == "softmax_topk":
            score += " (renormalised)" if moe["renormalize"] else " (raw probabilities, Switch-style)"
        if moe["routing_unit"] != "token" and moe["router_mode"] != "fixed":
            score = (
                "Fan et al. eq. 2 (summed logits, softmax, top-k, softmax of the chosen probabilities)"
                if moe["top_k"] > 1
                else "Fan et al. eq. 1 (summed logits, softmax, the top expert's probability)"
            )
        lines += [
            f"MoE layers: {n} of {info['num_layers']}: {', '.join(map(str, moe['layers']))}",
            f"experts: {moe['num_experts']} × {moe['expert_type']} (d_ff {moe['intermediate_size']}, "
            f"{moe['activation']}{', biases' if moe['expert_bias'] else ''}), top-{moe['top_k']}, "
            f"shared {moe['num_shared_experts']}{' (gated)' if moe['shared_expert_gate'] else ''}",
            f"router: {moe['router_type']}/{moe['router_mode']}, {score}, init {moe['router_init']}, "
            f"jitter {moe['router_jitter']}, noisy gating {moe['noisy_gating']}, unit {moe['routing_unit']}, "
            f"{'global' if moe['global_routing'] else 'layer-wise'}, "
            + ("dropless" if moe["capacity_factor"] is None else f"capacity factor {moe['capacity_factor']}"),
            f"loss weights: load-balancing {moe['aux_loss_weight']}, z {moe['z_loss_weight']}, "
            f"importance {moe['importance_loss_weight']}",
        ]
        conv = info.get("aux_loss_conventions")
        if conv:
            lines.append(
                f"load-balancing weight {moe['aux_loss_weight']} applies to the mean over {conv['routed_layers']} "
                f"routed layer(s); the same in other conventions: {conv['per_layer_sum']:.4g} per layer, summed "
                f"(Switch, Megatron-LM), router_aux_loss_coef {conv['hugging_face']:.4g} (Hugging Face, k={moe['top_k']})"
            )
    p = info["parameters"]
    f = info["flops_per_token"]
    lines += [
        f"parameters: total {_fmt_count(p['total'])}, active {_fmt_count(p['active'])} per token",
        f"forward FLOPs per token (s={info['flops_seq_len']}): {_fmt_count(f['forward'])} "
        f"(dense equivalent {_fmt_count(f['dense_equivalent'])}, ratio {f['forward'] / f['dense_equivalent']:.3f})",
    ]
    up = info.get("upcycling") or {}
    if up:
        opts = up.get("options", {})
        detail = {
            "drop": f"r={opts.get('ratio')}, index sharing {opts.get('index_sharing')}",
            "granular": f"G={opts.get('granularity')}",
            "noise": f"σ={opts.get('noise_std')}",
            "nexus": f"experts {', '.join(up.get('expert_names', []))} (shared expert: the seed's MLP)",
        }.get(up.get("method"), "")
        lines.append(
            f"upcycled: {up.get('method')} {detail} from {', '.join(up.get('sources', []))}, seed {up.get('seed')}"
        )
        fp = up.get("function_preservation")
        if fp:
            from upcycle.upcycling.convert import preservation_line

            lines.append(preservation_line(fp))
        conv = up.get("conversion_function_preservation")
        if conv:  # after `upcycle extend`: the figures above are the extension's
            lines.append(
                f"function preservation at conversion (vs the dense source): max |Δlogits| = "
                f"{conv['max_abs_logit_diff']:.3g}, mean KL = {conv['mean_kl']:.3g}"
            )
        for i, ext in enumerate(up.get("extensions") or [], 1):
            lines.append(
                f"extension {i}: added {', '.join(ext.get('experts', {}))} (router: {ext.get('router')})"
            )
    return "\n".join(lines)


def run(args) -> int:
    info = inspect_checkpoint(args.path, args.seq_len)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
