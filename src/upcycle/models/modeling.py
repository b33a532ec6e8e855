"""Hugging Face model types whose chosen layers use our MoE layer in place of the dense MLP.

Each supported family gets a config subclass (``model_type = "moe_<family>"``) that adds three fields:

- ``moe``: the :class:`~upcycle.moe.MoEConfig` of every MoE layer, as a dict;
- ``moe_layers``: indices of the decoder layers whose MLP is an MoE;
- ``upcycling``: provenance (method, source, seed, function-preservation figures), informational only,
- ``trainable_parameters``: optional glob patterns of the parameters that train (all others get
  ``requires_grad=False`` when the model is built and after ``from_pretrained``; ``upcycle extend
  --freeze-existing`` writes it),

and causal-LM and sequence-classification classes that build the dense architecture, swap the MLPs of
``moe_layers`` for :class:`~upcycle.moe.MoE`, and add the weighted auxiliary losses to ``loss``. The rest
is Hugging Face's code, so ``generate``, ``Trainer``, PEFT and ``save_pretrained``/``from_pretrained``
work unchanged once ``import upcycle`` has registered the types with the Auto classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, SequenceClassifierOutputWithPast

from upcycle.config import ConfigError
from upcycle.moe import MoE, MoEConfig, MoEContext
from upcycle.moe.experts import experts_in_own_storage
from upcycle.moe.router import Router


@dataclass
class MoECausalLMOutput(CausalLMOutputWithCrossAttentions):
    """Causal-LM output plus the MoE losses. ``loss`` = ``lm_loss`` + ``aux_loss`` when labels are given."""

    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


@dataclass
class MoESequenceClassifierOutput(SequenceClassifierOutputWithPast):
    """Classification output plus the MoE losses. ``loss`` = ``task_loss`` + ``aux_loss`` with labels."""

    task_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


def moe_config_of(config) -> MoEConfig:
    """The validated MoEConfig stored in a model config (errors name the field as ``moe.<field>``)."""
    data = dict(config.moe or {})
    data.setdefault("hidden_size", config.hidden_size)
    try:
        return MoEConfig.from_dict(data)
    except ConfigError as err:
        field = err.field if err.field.startswith("moe.") else f"moe.{err.field}"
        raise ConfigError(field, err.value, err.allowed) from None


def check_moe_layers(config) -> list[int]:
    layers = list(config.moe_layers or [])
    n = config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError("moe_layers", bad, f"layer indices must be in [0, {n - 1}]")
    if len(set(layers)) != len(layers):
        raise ConfigError("moe_layers", layers, "layer indices must be unique")
    return sorted(layers)


class MoEModelMixin:
    """Installs MoE layers and combines their losses. Mixed into a Hugging Face model class."""

    def _install_moe(self) -> None:
        cfg = self.config
        moe_cfg = moe_config_of(cfg)
        layers = check_moe_layers(cfg)
        # A plain object (not a module): the side channel for masks, labels and global routing.
        self.moe_context = MoEContext()
        # Sequence and prefix routing keep router sums per generation cache (MoEContext.save_prefix).
        self._routes_on_sums = moe_cfg.sequence_units
        blocks = self.decoder_layers()
        for i in layers:
            moe = MoE(moe_cfg, context=self.moe_context)
            moe.apply(self._init_moe_module)
            blocks[i].mlp = moe
        self.apply_trainable_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Hugging Face hands back every loaded parameter with requires_grad=True, so the config's
        # trainable_parameters are applied again once the weights are in.
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_trainable_parameters()
        return loaded

    def save_pretrained(self, *args, **kwargs):
        # Expert weights are views into stacked storage (ExpertList); saved as they are, each would be
        # copied first (all experts at once), so they move to storage of their own for the save.
        with experts_in_own_storage(self):
            return super().save_pretrained(*args, **kwargs)

    def apply_trainable_parameters(self) -> None:
        """Freeze every parameter whose name matches none of ``config.trainable_parameters`` (fnmatch
        patterns such as ``*.mlp.experts.4.*``); no-op when the field is unset. Optimisers built over
        the parameters that require a gradient (``upcycle pretrain``'s) then train only the matches."""
        patterns = getattr(self.config, "trainable_parameters", None)
        if not patterns:
            return
        named = list(self.named_parameters())
        keep = [any(fnmatchcase(name, pattern) for pattern in patterns) for name, _ in named]
        if not any(keep):
            raise ConfigError("trainable_parameters", patterns, "matches no parameter of the model")
        for (_, param), trains in zip(named, keep):
            param.requires_grad_(trains)

    def decoder_layers(self) -> nn.ModuleList:
        base = self.base_model
        return base.h if hasattr(base, "h") else base.layers

    def moe_layers(self) -> dict[int, MoE]:
        """{decoder layer index: MoE module}."""
        return {i: b.mlp for i, b in enumerate(self.decoder_layers()) if isinstance(b.mlp, MoE)}

    def _init_moe_module(self, module: nn.Module) -> None:
        # Experts of a freshly built (not upcycled) model: N(0, initializer_range) like the dense model's
        # own init (also the from-scratch init of Drop-Upcycling, §4); routers use their configured init.
        # nn.init functions, so Hugging Face's no_init_weights() skips them when weights will be loaded.
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, Router):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _init_weights(self, module):
        if isinstance(module, Router):
            module.reset_parameters()
            return
        super()._init_weights(module)

    def reset_routing_stats(self) -> None:
        for moe in self.moe_layers().values():
            moe.stats.reset()

    def routing_stats(self) -> dict[int, dict]:
        """{layer index: RouterStats.summary()} accumulated since the last reset."""
        return {i: moe.stats.summary() for i, moe in self.moe_layers().items()}

    def aux_losses(self) -> dict[str, torch.Tensor] | None:
        """Per-layer losses of the last forward, averaged over MoE layers that have a router (computing
        them per layer and averaging avoids HF Mixtral's pooling, where one layer's imbalance can cancel
        another's), plus ``aux_loss``, their weighted sum."""
        layers = [m for m in self.moe_layers().values() if m.aux_losses]
        if not layers:
            return None
        cfg = layers[0].config
        out = {
            name: torch.stack([m.aux_losses[name] for m in layers]).mean()
            for name in ("load_balancing", "z", "importance")
        }
        out["aux_loss"] = (
            cfg.aux_loss_weight * out["load_balancing"]
            + cfg.z_loss_weight * out["z"]
            + cfg.importance_loss_weight * out["importance"]
        )
        return out

    def _moe_forward(self, parent_forward, output_cls, main_loss_field, args, kwargs):
        sequence_labels = kwargs.pop("sequence_labels", None)
        bound = _signature(parent_forward).bind_partial(*args, **kwargs).arguments
        attention_mask = bound.get("attention_mask")
        has_labels = bound.get("labels") is not None
        # Sequence and prefix routing continue the router sums of the tokens a generation cache holds.
        cache = _cache_argument(bound) if self._routes_on_sums else None
        with self.moe_context.scope(attention_mask, sequence_labels, cache) as ctx:
            out = parent_forward(*args, **kwargs)
            if self._routes_on_sums:
                ctx.save_prefix(getattr(out, "cache", None) if not isinstance(out, tuple) else cache)
        aux = self.aux_losses()
        if isinstance(out, tuple):  # return_dict=False: only fold the aux loss into the leading loss
            if has_labels and aux is not None:
                out = (out[0] + aux["aux_loss"].to(out[0].dtype), *out[1:])
            return out
        fields = dict(out.items())
        fields[main_loss_field] = out.loss
        if aux is not None:
            fields.update(
                aux_loss=aux["aux_loss"],
                load_balancing_loss=aux["load_balancing"],
                z_loss=aux["z"],
                importance_loss=aux["importance"],
            )
            if out.loss is not None:
                fields["loss"] = out.loss + aux["aux_loss"].to(out.loss.dtype)
        return output_cls(**fields)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ):
        # A checkpointed block is recomputed in backward, after this model's forward has returned: the
        # MoE context replays what the block's forward saw (padding mask, sequence labels, the leader's
        # routing for global routing), so every routing option works with gradient checkpointing.
        if enable:
            reentrant = getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant")
            if reentrant and any(m.router is not None for m in self.moe_layers().values()):
                # The auxiliary losses (and, with global routing, the leader's routing) leave a block
                # outside its outputs; a reentrant checkpoint runs the block without autograd, so they
                # would silently carry no gradient.
                raise ConfigError(
                    "gradient_checkpointing_kwargs.use_reentrant",
                    True,
                    "MoE layers with a router need use_reentrant=False (the default): a reentrant checkpoint "
                    "runs each block without autograd, so the auxiliary losses and global routing would give "
                    "the routers no gradient",
                )
            gradient_checkpointing_func = self.moe_context.checkpoint_function(gradient_checkpointing_func)
        return super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)


def _cache_argument(bound: dict):
    """The generation cache passed to a forward (``cache``, or the deprecated ``past_key_values``)."""
    cache = bound.get("cache")
    if cache is None:
        cache = bound.get("past_key_values", bound.get("kwargs", {}).get("past_key_values"))
    return cache if hasattr(cache, "get_seq_length") else None


_SIGNATURES: dict = {}


def _signature(fn) -> inspect.Signature:
    key = getattr(fn, "__func__", fn)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(fn)
    return _SIGNATURES[key]


class MoECausalLMMixin(MoEModelMixin):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._install_moe()

    def forward(self, *args, **kwargs):
        return self._moe_forward(super().forward, MoECausalLMOutput, "lm_loss", args, kwargs)

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: reorder the cache and, for sequence and prefix routing, the router sums kept for it
        (generate calls this hook when a model defines it)."""
        cache.reorder_cache(beam_idx)
        self.moe_context.reorder_prefix(cache, beam_idx)
        return cache


class MoESequenceClassificationMixin(MoEModelMixin):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._install_moe()

    def forward(self, *args, **kwargs):
        return self._moe_forward(super().forward, MoESequenceClassifierOutput, "task_loss", args, kwargs)


# --------------------------------------------------------------------------- families
# Each family: a config adding the MoE fields, a causal LM and a sequence classifier.


@strict
class MoEGPT2Config(GPT2Config):
    model_type = "moe_gpt2"
    moe: dict | None = None
    moe_layers: list[int] | None = None
    upcycling: dict | None = None
    trainable_parameters: list[str] | None = None


class MoEGPT2LMHeadModel(MoECausalLMMixin, GPT2LMHeadModel):
    config_class = MoEGPT2Config


class MoEGPT2ForSequenceClassification(MoESequenceClassificationMixin, GPT2ForSequenceClassification):
    config_class = MoEGPT2Config


@strict
class MoELlamaConfig(LlamaConfig):
    model_type = "moe_llama"
    moe: dict | None = None
    moe_layers: list[int] | None = None
    upcycling: dict | None = None
    trainable_parameters: list[str] | None = None


class MoELlamaForCausalLM(MoECausalLMMixin, LlamaForCausalLM):
    config_class = MoELlamaConfig


class MoELlamaForSequenceClassification(MoESequenceClassificationMixin, LlamaForSequenceClassification):
    config_class = MoELlamaConfig


@strict
class MoEMistralConfig(MistralConfig):
    model_type = "moe_mistral"
    moe: dict | None = None
    moe_layers: list[int] | None = None
    upcycling: dict | None = None
    trainable_parameters: list[str] | None = None


class MoEMistralForCausalLM(MoECausalLMMixin, MistralForCausalLM):
    config_class = MoEMistralConfig


class MoEMistralForSequenceClassification(MoESequenceClassificationMixin, MistralForSequenceClassification):
    config_class = MoEMistralConfig


@strict
class MoEQwen2Config(Qwen2Config):
    model_type = "moe_qwen2"
    moe: dict | None = None
    moe_layers: list[int] | None = None
    upcycling: dict | None = None
    trainable_parameters: list[str] | None = None


class MoEQwen2ForCausalLM(MoECausalLMMixin, Qwen2ForCausalLM):
    config_class = MoEQwen2Config


class MoEQwen2ForSequenceClassification(MoESequenceClassificationMixin, Qwen2ForSequenceClassification):
    config_class = MoEQwen2Config


@dataclass(frozen=True)
class Family:
    """A supported dense source family and its MoE counterparts."""

    name: str
    source_model_type: str
    expert_type: str  # "mlp" (GPT-2 Conv1D c_fc/c_proj) or "glu" (gate/up/down)
    config_cls: type
    causal_lm_cls: type
    seq_cls_cls: type


FAMILIES: dict[str, Family] = {
    f.source_model_type: f
    for f in (
        Family("gpt2", "gpt2", "mlp", MoEGPT2Config, MoEGPT2LMHeadModel, MoEGPT2ForSequenceClassification),
        Family(
            "llama", "llama", "glu", MoELlamaConfig, MoELlamaForCausalLM, MoELlamaForSequenceClassification
        ),
        Family(
            "mistral",
            "mistral",
            "glu",
            MoEMistralConfig,
            MoEMistralForCausalLM,
            MoEMistralForSequenceClassification,
        ),
        Family(
            "qwen2", "qwen2", "glu", MoEQwen2Config, MoEQwen2ForCausalLM, MoEQwen2ForSequenceClassification
        ),
    )
}
FAMILY_BY_MOE_TYPE = {f.config_cls.model_type: f for f in FAMILIES.values()}


def family_for(model_type: str) -> Family:
    """The family of a dense source or MoE model type; an error lists what is supported."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in FAMILY_BY_MOE_TYPE:
        return FAMILY_BY_MOE_TYPE[model_type]
    supported = ", ".join(sorted(FAMILIES))
    raise ConfigError(
        "model_type", model_type, f"unsupported architecture; supported sources are {supported}"
    )


def register() -> None:
    """Register every MoE model type with the Auto classes (idempotent; done by ``import upcycle``)."""
    for fam in FAMILIES.values():
        mt = fam.config_cls.model_type
        try:
            AutoConfig.register(mt, fam.config_cls)
        except ValueError:
            continue  # already registered
        AutoModelForCausalLM.register(fam.config_cls, fam.causal_lm_cls)
        AutoModelForSequenceClassification.register(fam.config_cls, fam.seq_cls_cls)
        # The heads of Llama-family classifiers build their body with AutoModel.from_config: the body is
        # the dense model's (the MoE layers are installed by the head's mixin afterwards).
        dense_body = MODEL_MAPPING[fam.config_cls.__mro__[1]]
        body = type(f"MoE{dense_body.__name__}Body", (dense_body,), {"config_class": fam.config_cls})
        AutoModel.register(fam.config_cls, body)
