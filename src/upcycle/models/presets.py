"""Named model presets for training from scratch: ``upcycle pretrain --model debug``.

A preset is a dense Hugging Face config plus, optionally, an MoE layout; :func:`build_model` turns it into
a freshly initialised model of the matching registered class (``GPT2LMHeadModel``, ``MoEGPT2LMHeadModel``,
``LlamaForCausalLM`` …), so a from-scratch run saves the same kind of folder as an upcycled one.

- ``debug`` / ``debug-moe`` / ``debug-llama``: tiny models for tests and smoke runs (torchtitan's
  ``llama3_debugmodel``, OLMo-core's ``smallmoe``), GPT-2's vocabulary so the offline GPT-2 tokenizer fits.
- ``gpt2-mini``: a small GPT-2 (4 layers, 64 hidden, 256 positions): the seed of ``make demo``
  (configs/experiments/demo.yaml), small enough to learn a generated corpus in a minute on 2 CPU cores.
- ``gpt2-small``: GPT-2 small's shape (12 layers, 768 hidden, 12 heads, 1024 positions).
- ``llama-152m``: Drop-Upcycling's dense 152M shape (Nakamura et al. 2025, Table 4: 12 layers, 512
  hidden, 2048 FFN, 8 heads, 8 KV heads, untied embeddings) with GPT-2's vocabulary (50,257 instead of
  their 99,574, the tokenizer available offline), so ≈ 101M parameters.
- ``gpt2-small-moe``: the founding report's layout from scratch: 8 experts, top-1, every other layer,
  Switch-style scoring (no renormalisation), load-balancing weight 0.01, router jitter 0.01.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from upcycle.config import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    """A from-scratch model: family, dense config fields and (for MoE) the expert layout."""

    name: str
    description: str
    family: str
    """Dense source family: 'gpt2' or 'llama'."""
    config: dict
    """Keyword arguments of the dense Hugging Face config (GPT2Config, LlamaConfig)."""
    moe: dict | None = None
    """MoEConfig fields chosen by the preset (num_experts, top_k, …); None for a dense model."""
    moe_layers: str = "every_other"
    """'all', 'every_other' or a comma list of layer indices."""
    tokenizer: str = "gpt2"
    """Tokenizer the preset's vocabulary matches."""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


_GPT2_VOCAB = 50257
_SWITCH_TOP1 = dict(
    num_experts=8,
    top_k=1,
    score_order="softmax_topk",
    renormalize=False,
    router_jitter=0.01,
    aux_loss_weight=0.01,
    z_loss_weight=0.0,
)
_DEBUG_GPT2 = dict(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=_GPT2_VOCAB)
_GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=_GPT2_VOCAB)
_GPT2_MINI = dict(n_layer=4, n_embd=64, n_head=4, n_positions=256, vocab_size=_GPT2_VOCAB)
_LLAMA_152M = dict(
    num_hidden_layers=12,
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    vocab_size=_GPT2_VOCAB,
    bos_token_id=_GPT2_VOCAB - 1,
    eos_token_id=_GPT2_VOCAB - 1,
    tie_word_embeddings=False,
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("debug", "tiny dense GPT-2 (2 layers, 64 hidden) for tests", "gpt2", _DEBUG_GPT2),
        ModelPreset(
            "debug-moe",
            "tiny MoE GPT-2: 4 experts top-1 in layer 1, for tests",
            "gpt2",
            _DEBUG_GPT2,
            moe=dict(_SWITCH_TOP1, num_experts=4, z_loss_weight=0.001),
        ),
        ModelPreset(
            "debug-llama",
            "tiny dense Llama (2 layers, 64 hidden, GPT-2 vocabulary) for tests",
            "llama",
            dict(
                num_hidden_layers=2,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=256,
                vocab_size=_GPT2_VOCAB,
                bos_token_id=_GPT2_VOCAB - 1,
                eos_token_id=_GPT2_VOCAB - 1,
            ),
        ),
        ModelPreset("gpt2-mini", "small GPT-2 (4 layers, 64 hidden): the demo's seed", "gpt2", _GPT2_MINI),
        ModelPreset("gpt2-small", "GPT-2 small shape (124M), random init", "gpt2", _GPT2_SMALL),
        ModelPreset(
            "gpt2-small-moe",
            "GPT-2 small with 8-expert top-1 MoE in every other layer (the founding report's layout)",
            "gpt2",
            _GPT2_SMALL,
            moe=dict(_SWITCH_TOP1),
        ),
        ModelPreset(
            "llama-152m",
            "Drop-Upcycling's dense 152M shape (12 layers, 512 hidden) with GPT-2's vocabulary",
            "llama",
            _LLAMA_152M,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ConfigError("model", name, f"unknown preset; presets are {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def dense_config(preset: ModelPreset):
    """The dense Hugging Face config of a preset."""
    from transformers import GPT2Config, LlamaConfig

    cls = {"gpt2": GPT2Config, "llama": LlamaConfig}[preset.family]
    return cls(**preset.config)


def moe_config_fields(preset: ModelPreset, dense) -> dict:
    """Complete MoEConfig fields: the preset's choices plus what the dense shape decides (as ``convert``)."""
    if preset.family == "gpt2":
        shape = dict(
            hidden_size=dense.n_embd,
            intermediate_size=dense.n_inner or 4 * dense.n_embd,
            expert_type="mlp",
            activation=dense.activation_function,
            expert_bias=True,
            dropout=float(dense.resid_pdrop),
        )
    else:
        shape = dict(
            hidden_size=dense.hidden_size,
            intermediate_size=dense.intermediate_size,
            expert_type="glu",
            activation=dense.hidden_act,
            expert_bias=False,
        )
    from upcycle.moe import MoEConfig

    return MoEConfig(**shape, **(preset.moe or {})).to_dict()


def build_model(name: str, overrides: dict | None = None):
    """A freshly initialised causal LM for preset ``name`` (seed the RNG first for a reproducible init).

    ``overrides`` replaces dense config fields (e.g. ``{"n_positions": 512}``).
    """
    from upcycle.models.modeling import FAMILIES
    from upcycle.upcycling.options import parse_layers

    preset = get_preset(name)
    if overrides:
        preset = dataclasses.replace(preset, config={**preset.config, **overrides})
    dense = dense_config(preset)
    family = FAMILIES[preset.family]
    if not preset.is_moe:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(dense)
    fields = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "architectures", "dtype")}
    layers = parse_layers(preset.moe_layers, dense.num_hidden_layers)
    config = family.config_cls(
        **fields,
        moe=moe_config_fields(preset, dense),
        moe_layers=layers,
        upcycling={"method": "preset", "preset": preset.name},
    )
    return family.causal_lm_cls(config)


__all__ = ["PRESETS", "ModelPreset", "build_model", "dense_config", "get_preset", "moe_config_fields"]
