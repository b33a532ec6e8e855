"""``upcycle analyze routing``: how many tokens of each group (language, NLI label, text domain) each expert
of each MoE layer receives, for one or more models side by side.

Each model runs over the same grouped text (:mod:`upcycle.analysis.routing_data`, ``--max-tokens`` real
tokens per group) while hooks on its MoE layers count the router's choices (:mod:`upcycle.analysis.hooks`):
every top-k choice, and separately the top-1 choice, padding excluded. Token- and sequence-level routing
and global routing (followers reuse the first layer's decision) are all read from what the layer used.
Causal LMs and fine-tuned sequence classifiers (a folder whose ``architectures`` names a
``…ForSequenceClassification``) both work.

``DIR/routing.json`` (format ``upcycle-routing/1``)::

    {
      "format": "upcycle-routing/1",
      "group_by": "language" | "label" | "domain",
      "groups": [group names, in the order of every matrix row below],
      "data": {what was read: data / split / languages, or domains: {name: {source, config}}},
      "max_tokens": tokens per group asked for,
      "choice": counts the figures draw ("topk" | "top1"),
      "models": {
        NAME: {
          "path", "architecture", "head": "causal_lm" | "sequence_classification",
          "num_experts": E, "top_k": K, "routing_unit", "global_routing", "max_length",
          "added_experts": {name: expert index} of the experts `upcycle extend` added ({} if none),
          "tokens": [non-padding tokens counted per group],
          "layers": {
            "LAYER": {                       # decoder layer index of an MoE layer
              "topk": G×E counts of every top-k choice (rows sum to K × tokens),
              "top1": G×E counts of the top-1 choice (rows sum to tokens),
              "metrics": {"topk": {...}, "top1": {...}}  # balance, max_over_mean, specialisation
            }
          }
        }
      }
    }

The metrics are defined in :mod:`upcycle.analysis.metrics`; ``routing.md`` tabulates them per model and
layer. Figures (PNG and SVG, :mod:`upcycle.analysis.plots`): ``expert_shares-NAME`` (the founding
report's Figures 1–4), ``group_fractions`` (Drop-Upcycling's Figure 5, all models side by side) and
``heatmap-NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from upcycle.analysis.config import RoutingAnalysisConfig
from upcycle.config import ConfigError, UserError

FORMAT = "upcycle-routing/1"
#: Default sequence length of XNLI pairs: the fine-tuning input's.
XNLI_MAX_LENGTH = 128
DOCUMENT_MAX_LENGTH = 1024
#: model_type → name of the native MoE checkpoints ``upcycle export`` writes.
NATIVE_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}


@dataclass
class RoutedModel:
    """A checked model name: what to load and how."""

    name: str
    source: str
    config: object
    head: str
    """'causal_lm' or 'sequence_classification'."""


def check_model(name: str, display: str):
    """Read a model's config and check that it has MoE layers with a router; no weights loaded."""
    from transformers import AutoConfig

    import upcycle.models  # noqa: F401  (registers the MoE model types)
    from upcycle.models.loading import first_line, model_source
    from upcycle.models.modeling import moe_config_of

    source = model_source(name, flag="models")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config of '{name}': {first_line(exc)}") from exc
    problem = routing_problem(name, config.to_dict())
    if problem is not None:
        raise UserError(problem)
    if moe_config_of(config).router_mode == "fixed":
        raise UserError(f"'{name}' routes by a given label (router_mode 'fixed'): its routing is not learned")
    archs = list(getattr(config, "architectures", None) or [])
    head = "sequence_classification" if any("ForSequenceClassification" in a for a in archs) else "causal_lm"
    return RoutedModel(display, source, config, head)


def routing_problem(name: str, config: dict) -> str | None:
    """Why a model has no routing this command can read, from its config.json fields; None if it has."""
    if config.get("moe_layers"):
        return None
    model_type = config.get("model_type")
    if model_type in NATIVE_NAMES:
        # Mixtral's and Qwen2-MoE's own MoE blocks, which the routing hooks do not read (finetune trains
        # them, issue 12); the upcycle checkpoint an export came from holds the same routers in our layers.
        return (
            f"'{name}' is a native {NATIVE_NAMES[model_type]} checkpoint, whose routing this command cannot "
            "read; analyse the upcycle checkpoint it was exported from"
        )
    return (
        f"'{name}' ({model_type}) has no MoE layers, so there is no routing to analyse; give an upcycled "
        "checkpoint (tokenizer fertility works for any model: upcycle fertility)"
    )


def model_names(models: list[str], names: list[str] | None) -> list[str]:
    """Given names, else the folder (or hub) names, falling back to the full strings when those clash."""
    if names:
        return list(names)
    short = [Path(m).name or m if Path(m).expanduser().exists() else m for m in models]
    if len(set(short)) == len(short):
        return short
    if len(set(models)) != len(models):
        raise ConfigError("models", models, "a model is listed twice")
    return list(models)


def load_model(checked: RoutedModel, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from upcycle.models.loading import first_line, load_classifier

    torch_dtype = getattr(torch, dtype)
    if checked.head == "sequence_classification":
        model = load_classifier(checked.source)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(checked.source, dtype=torch.float32)
        except (OSError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot load '{checked.source}': {first_line(exc)}") from exc
    return model.to(device=device, dtype=torch_dtype).eval()


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError("device", device, f"not usable here ({str(exc).splitlines()[0]})") from exc
    return device


def sequence_length(cfg: RoutingAnalysisConfig, kind: str, model_config) -> int:
    if cfg.max_length is not None:
        return cfg.max_length
    if kind == "pairs":
        return XNLI_MAX_LENGTH
    context = getattr(model_config, "n_positions", None) or getattr(
        model_config, "max_position_embeddings", None
    )
    return min(DOCUMENT_MAX_LENGTH, context or DOCUMENT_MAX_LENGTH)


# --------------------------------------------------------------------------- counting


def batches(rows_per_group: list[list[list[int]]], batch_size: int, pad_id: int):
    """(input_ids_BS, attention_mask_BS, group_B) batches, one group per batch, rows sorted by length so
    little padding is computed (routing does not depend on which rows share a batch: dropless routing
    decides per token or per sequence, and capacity drops happen after the choice counted here)."""
    from upcycle.data.xnli import pad_batch

    for g, rows in enumerate(rows_per_group):
        ordered = sorted(rows, key=len)
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i : i + batch_size]
            ids, mask = pad_batch(chunk, pad_id, "right")
            yield ids, mask, [g] * len(chunk)


def count_routing(model, head: str, batch_iter, num_groups: int, device: str) -> dict[int, dict]:
    """Run ``model`` over the batches with a :class:`RoutingCounter` attached; its per-layer counts."""
    import torch

    from upcycle.analysis.hooks import RoutingCounter

    # The logits are not needed: a causal LM computes them for the last position only.
    extra = {"logits_to_keep": 1} if head == "causal_lm" else {}
    with torch.inference_mode(), RoutingCounter(model.moe_layers(), num_groups) as counter:
        for ids, mask, group_B in batch_iter:
            counter.set_groups(group_B)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra)
    return counter.result()


def model_record(checked: RoutedModel, counts: dict[int, dict], max_length: int) -> dict:
    """The routing.json entry of one model (see the module docstring)."""
    from upcycle.analysis.metrics import layer_metrics
    from upcycle.models.modeling import moe_config_of
    from upcycle.upcycling.extend import added_experts

    moe = moe_config_of(checked.config)
    layers = {}
    tokens = None
    for index in sorted(counts):
        c = counts[index]
        tokens = c["tokens"]
        layers[str(index)] = {
            "topk": c["topk"],
            "top1": c["top1"],
            "metrics": {"topk": layer_metrics(c["topk"]), "top1": layer_metrics(c["top1"])},
        }
    return {
        "path": checked.source,
        "architecture": (list(getattr(checked.config, "architectures", None) or ["?"]))[0],
        "head": checked.head,
        "num_experts": moe.num_experts,
        "added_experts": added_experts(checked.config),
        "top_k": moe.top_k,
        "routing_unit": moe.routing_unit,
        "global_routing": moe.global_routing,
        "max_length": max_length,
        "tokens": tokens,
        "layers": layers,
    }


def analyze_model(checked: RoutedModel, grouped, cfg: RoutingAnalysisConfig, device: str) -> dict:
    """Load one model, encode the groups with its tokenizer, count its routing."""
    from upcycle.analysis.routing_data import encoder, token_rows
    from upcycle.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(checked.source, model_config=checked.config)
    max_length = sequence_length(cfg, grouped.kind, checked.config)
    encode = encoder(grouped.kind, tokenizer, max_length)
    rows = [token_rows(group, encode, cfg.max_tokens) for group in grouped.groups]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(checked, cfg.dtype, device)
    counts = count_routing(model, checked.head, batches(rows, cfg.batch_size, pad_id or 0), len(rows), device)
    return model_record(checked, counts, max_length)


# --------------------------------------------------------------------------- outputs


def markdown_table(result: dict) -> str:
    """routing.md: per model and MoE layer, load balance and specialisation (top-k and top-1 counts)."""

    def fmt(x) -> str:
        return "–" if x is None else f"{x:.3f}"

    lines = [
        f"# Routing by {result['group_by']}: {', '.join(result['groups'])}",
        "",
        "balance: normalised entropy of the expert load (1 = even); max/mean: busiest expert over the mean "
        "load (1 = even); specialisation: I(group; expert) / H(group) (0 = routing ignores the group, "
        "1 = the expert determines the group). Computed on all top-k choices and on the top-1 choice.",
        "",
        "| model | layer | tokens | balance | max/mean | specialisation | balance (top-1) | max/mean (top-1) "
        "| specialisation (top-1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, record in result["models"].items():
        total = sum(record["tokens"])
        for layer, entry in record["layers"].items():
            k, one = entry["metrics"]["topk"], entry["metrics"]["top1"]
            lines.append(
                f"| {name} | {layer} | {total:,} | {fmt(k['balance'])} | {fmt(k['max_over_mean'])} | "
                f"{fmt(k['specialisation'])} | {fmt(one['balance'])} | {fmt(one['max_over_mean'])} | "
                f"{fmt(one['specialisation'])} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, folder: Path) -> list[str]:
    """routing.json, routing.md and the three kinds of figures into ``folder``."""
    import json

    from upcycle.analysis import plots

    (folder / "routing.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "routing.md").write_text(markdown_table(result))
    files = ["routing.json", "routing.md"]
    groups, choice = result["groups"], result["choice"]
    for name, record in result["models"].items():
        stem = plots.file_stem(name)
        files += plots.save_figure(
            plots.expert_share_figure(name, record, groups, choice), folder, f"expert_shares-{stem}"
        )
        files += plots.save_figure(
            plots.heatmap_figure(name, record, groups, choice), folder, f"heatmap-{stem}"
        )
    files += plots.save_figure(
        plots.group_fraction_figure(result["models"], groups, choice), folder, "group_fractions"
    )
    return files


def analyze_routing(cfg: RoutingAnalysisConfig) -> dict:
    """Check every input, count every model's routing, then write the output folder in one go."""
    from upcycle.analysis.routing_data import domain_groups, languages_of, xnli_groups
    from upcycle.io import atomic_output_dir, check_output_dir

    check_output_dir(cfg.out, cfg.overwrite)
    device = resolve_device(cfg.device)
    names = model_names(cfg.models, cfg.names)
    checked = [check_model(m, n) for m, n in zip(cfg.models, names)]  # before any long work
    if cfg.group_by == "domain":
        grouped = domain_groups(cfg.domain or [], cfg.split, cfg.text_field)
    else:
        grouped = xnli_groups(cfg.data, languages_of(cfg.data, cfg.languages), cfg.split, cfg.group_by)
    result = {
        "format": FORMAT,
        "group_by": cfg.group_by,
        "groups": grouped.names,
        "data": grouped.description,
        "max_tokens": cfg.max_tokens,
        "choice": cfg.choice,
        "models": {},
    }
    for model in checked:
        result["models"][model.name] = analyze_model(model, grouped, cfg, device)
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        result["files"] = write_outputs(result, tmp)
    return result


__all__ = ["FORMAT", "analyze_routing", "batches", "count_routing", "markdown_table", "model_record"]
