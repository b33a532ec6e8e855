"""Hugging Face model types for MoE GPT-2 and MoE Llama-family models, and native-format exporters."""

from upcycle.models.modeling import (
    FAMILIES,
    Family,
    MoECausalLMOutput,
    MoEGPT2Config,
    MoEGPT2ForSequenceClassification,
    MoEGPT2LMHeadModel,
    MoELlamaConfig,
    MoELlamaForCausalLM,
    MoELlamaForSequenceClassification,
    MoEMistralConfig,
    MoEMistralForCausalLM,
    MoEQwen2Config,
    MoEQwen2ForCausalLM,
    MoESequenceClassifierOutput,
    family_for,
    moe_config_of,
    register,
)

register()

__all__ = [
    "FAMILIES",
    "Family",
    "MoECausalLMOutput",
    "MoEGPT2Config",
    "MoEGPT2ForSequenceClassification",
    "MoEGPT2LMHeadModel",
    "MoELlamaConfig",
    "MoELlamaForCausalLM",
    "MoELlamaForSequenceClassification",
    "MoEMistralConfig",
    "MoEMistralForCausalLM",
    "MoEQwen2Config",
    "MoEQwen2ForCausalLM",
    "MoESequenceClassifierOutput",
    "family_for",
    "moe_config_of",
    "register",
]
