"""Hugging Face model types for MoE GPT-2 and MoE Llama-family models, and native-format exporters.

The model types are registered with the Auto classes by ``import upcycle`` (``upcycle.register_model_types``).
Names resolve on first use (upcycle._lazy), so the light submodules (``presets``, ``loading``) import
without torch.
"""

from upcycle._lazy import lazy_exports

_EXPORTS = {
    name: "upcycle.models.modeling"
    for name in (
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
    )
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
