"""upcycle: turn dense pretrained language models into sparse Mixture-of-Experts models.

``import upcycle`` registers the MoE model types (``moe_gpt2``, ``moe_llama``, ``moe_mistral``,
``moe_qwen2``) with Hugging Face's Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads
a converted checkpoint.
"""

__version__ = "0.1.0"

from upcycle import models as _models  # noqa: E402,F401  (registers the Auto classes)
