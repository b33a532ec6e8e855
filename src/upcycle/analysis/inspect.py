"""Show an MoE (or dense) checkpoint's layout, router settings, parameters, FLOPs and upcycling record.

Reads config.json only; parameters are counted on a model built on the meta device, so inspecting a
multi-billion-parameter checkpoint takes a second and no memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HELP = "show an MoE checkpoint's layout, routing, total/active parameters and FLOPs per token"


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint folder (or hub id)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="sequence length for FLOPs (default: context size)"
    )


def inspect_checkpoint(path: str, seq_len: int | None = None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the MoE model types)
    from upcycle.analysis.accounting import account
    from upcycle.config import UserError
    from upcycle.models.modeling import moe_config_of

    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise UserError(f"'{path}' has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint config from '{path}': {str(exc).splitlines()[0]}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    acc = account(config, total, seq_len)
    info: dict = {
        "path": str(path),
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "parameters": {"total": acc.total_params, "active": acc.active_params},
        "flops_per_token": {"forward": acc.flops_per_token, "dense_equivalent": acc.dense_flops_per_token},
        "flops_seq_len": acc.seq_len,
    }
    moe_layers = list(getattr(config, "moe_layers", None) or [])
    if moe_layers:
        m = moe_config_of(config)
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
        if moe["routing_unit"] != "token" and moe["top_k"] > 1 and moe["router_mode"] != "fixed":
            score = "Fan et al. eq. 2 (summed logits, softmax, top-k, softmax of the chosen probabilities)"
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
    return "\n".join(lines)


def run(args) -> int:
    info = inspect_checkpoint(args.path, args.seq_len)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
