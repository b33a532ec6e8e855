"""What the plan prints before anything runs: each task's model (parameters, active parameters), steps,
tokens and estimated FLOPs, from the configs alone (``upcycle.analysis.accounting``: forward FLOPs per
token after Drop-Upcycling's Table 3; training counts forward + backward as 3 × forward).

Models that do not exist yet are sized from what will make them: a model preset, a converted MoE from its
dense source and the convert options, a training run from its input model. A hub model that is neither
in the local cache nor known here is shown as '?'. Figures are estimates: fine-tuning tokens are bounded by
max_length (pairs are shorter), evaluation tokens likewise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from upcycle.experiment.plan import Plan
from upcycle.experiment.tasks import Task


@dataclass
class Shape:
    """Size of a causal LM, as ``upcycle inspect`` reports it."""

    total: int
    active: int
    forward: dict  # seq_len → forward FLOPs per token
    config: object
    head_flops: float
    """Forward FLOPs per token of the LM head (absent from a classifier's body tokens)."""

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self.forward:
            from upcycle.analysis.accounting import account

            self.forward[seq_len] = account(self.config, self.total, seq_len).flops_per_token
        return self.forward[seq_len]


def _meta_shape(config) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    from upcycle.analysis.accounting import account

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    acc = account(config, total)
    head = 2 * config.hidden_size * config.vocab_size
    return Shape(total, acc.active_params, {acc.seq_len: acc.flops_per_token}, config, head)


def _hub_config(name: str):
    """A hub model's config from the local cache; GPT-2's is transformers' GPT2Config defaults."""
    from transformers import AutoConfig, GPT2Config

    with contextlib.suppress(Exception):
        return AutoConfig.from_pretrained(name, local_files_only=True)
    return GPT2Config() if name in ("gpt2", "openai-community/gpt2") else None


def source_shape(name: str, known: dict[str, Shape]) -> Shape | None:
    """The shape of a model named in a config: made by an earlier task, a preset, a folder or a hub id."""
    from upcycle.models.presets import PRESETS, build_model

    if name in known:
        return known[name]
    if name in PRESETS:
        import torch

        with torch.device("meta"):
            model = build_model(name)
        return _meta_shape(model.config)
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return _meta_shape(AutoConfig.from_pretrained(path))
    config = _hub_config(name)
    return _meta_shape(config) if config is not None else None


def moe_shape(dense: Shape, opts) -> Shape | None:
    """The shape ``upcycle convert`` with ``opts`` gives a dense model of shape ``dense``."""
    from upcycle.models.modeling import family_for
    from upcycle.models.presets import ModelPreset, moe_config_fields
    from upcycle.upcycling.options import parse_layers

    config = dense.config
    family = family_for(config.model_type)
    fields = opts.moe_fields()
    if fields.get("router_type") == "embedding":
        fields.setdefault("domain_embedding_size", config.hidden_size)
    preset = ModelPreset("plan", "", "gpt2" if family.expert_type == "mlp" else "llama", {}, moe=fields)
    moe = moe_config_fields(preset, config)
    F_ = moe["intermediate_size"]
    moe.update(intermediate_size=F_ // opts.granularity, shared_intermediate_size=F_)
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    keep = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "dtype")}
    return _meta_shape(family.config_cls(**keep, moe=moe, moe_layers=layers, upcycling={}))


def _training(task: Task, shape: Shape | None, classifier: bool = False) -> dict:
    cfg = task.config
    length = cfg.max_length if classifier else cfg.seq_len
    steps = cfg.steps if cfg.steps is not None else _finetune_steps(task)
    tokens = steps * cfg.batch_size * cfg.grad_accum * length if steps else None
    out = {"steps": steps, "tokens": tokens}
    if shape is not None:
        out.update(params=shape.total, active=shape.active)
        if tokens:
            per_token = shape.flops_per_token(length) - (shape.head_flops if classifier else 0.0)
            out["flops"] = 3 * per_token * tokens
    return out


def _finetune_steps(task: Task) -> int | None:
    """Steps of an epoch-based fine-tuning on generated XNLI data (whose size the plan knows)."""
    import math

    cfg = task.config
    xnli = next((d.config for d in task.deps if d.kind == "data-xnli"), None)
    if xnli is None or "data" not in str(cfg.data):
        return None
    examples = xnli.train * len([lang for lang in str(cfg.train_languages).split(",") if lang.strip()])
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, round(cfg.epochs * math.ceil(examples / per_step)))


def estimate_task(task: Task, shapes: dict[str, Shape]) -> dict:
    """Fill ``shapes`` with the model the task makes (by its folder) and return its estimate."""
    cfg = task.config
    if task.kind in ("pretrain", "finetune"):
        shape = source_shape(str(cfg.model), shapes)
        if shape is not None:
            shapes[str(task.model_dir())] = shape
        return _training(task, shape, classifier=task.kind == "finetune")
    if task.kind == "convert":
        dense = source_shape(str(cfg.model[0]), shapes)
        shape = moe_shape(dense, cfg) if dense is not None else None
        if shape is not None:
            shapes[str(task.model_dir())] = shape
            return {"params": shape.total, "active": shape.active}
        return {}
    if task.kind == "extend":
        shape = source_shape(str(cfg.model), shapes)
        if shape is not None:
            shapes[str(task.model_dir())] = shape  # a few experts more: the same per-token FLOPs
        return {}
    if task.kind in ("evaluate", "routing"):
        return _forward_estimate(task, shapes)
    return {}


def _forward_estimate(task: Task, shapes: dict[str, Shape]) -> dict:
    cfg = task.config
    if task.kind == "routing":
        groups = 3 if cfg.group_by == "label" else len(cfg.domain or []) or _languages(task)
        length, tokens = cfg.max_length or 128, cfg.max_tokens * groups if groups else None
    else:
        xnli = next((d.config for d in _upstream(task) if d.kind == "data-xnli"), None)
        per_language = cfg.limit or (xnli.test if xnli is not None else None)
        languages = _languages(task)
        length = cfg.max_length
        tokens = per_language * languages * length if per_language and languages else None
    if not tokens:
        return {}
    flops = 0.0
    for path in task.models.values():
        shape = shapes.get(path) or shapes.get(str(Path(path).parent / "final"))
        if shape is None:
            return {"tokens": tokens * len(task.models)}
        flops += shape.flops_per_token(length) * tokens
    return {"tokens": tokens * len(task.models), "flops": flops}


def _upstream(task: Task) -> list[Task]:
    seen, stack = {}, list(task.deps)
    while stack:
        t = stack.pop()
        if t.key not in seen:
            seen[t.key] = t
            stack.extend(t.deps)
    return list(seen.values())


def _languages(task: Task) -> int:
    from upcycle.data.xnli import XNLI_LANGUAGES

    spec = str(getattr(task.config, "languages", "all"))
    if spec == "all":
        xnli = next((d.config for d in _upstream(task) if d.kind == "data-xnli"), None)
        return (
            len(XNLI_LANGUAGES) if xnli is None or xnli.languages == "all" else len(xnli.languages.split(","))
        )
    return len([p for p in spec.split(",") if p.strip()])


def estimate_plan(plan: Plan) -> None:
    """Fill every task's ``estimate`` (empty where nothing can be said)."""
    shapes: dict[str, Shape] = {}
    for task in plan.tasks.values():
        try:
            task.estimate = estimate_task(task, shapes)
        except Exception:  # an estimate is a courtesy: a model it cannot size is shown as '?'
            task.estimate = {}


__all__ = ["Shape", "estimate_plan", "moe_shape", "source_shape"]
