"""upcycle: turn dense pretrained language models into sparse Mixture-of-Experts models.

``import upcycle`` registers the MoE model types (``moe_gpt2``, ``moe_llama``, ``moe_mistral``,
``moe_qwen2``) with Hugging Face's Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads
a converted checkpoint.

The ``upcycle`` command itself registers them only once a sub-command runs: registering imports torch
and transformers (seconds), which ``upcycle --help`` and a mistyped flag should not wait for (issue 11).
"""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"


def register_model_types() -> None:
    """Register the MoE model types with the Auto classes (idempotent)."""
    from upcycle.models.modeling import register

    register()


def _starting_the_command() -> bool:
    """True while the ``upcycle`` command starts: the console script (``upcycle …``) or ``python -m
    upcycle …`` (also what ``accelerate launch -m upcycle`` runs on every rank)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 in ("upcycle", "upcycle.exe", "upcycle-script.py"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return argv0 == "-m" and any(a == "-m" and b == "upcycle" for a, b in zip(orig, orig[1:]))


if not _starting_the_command():
    register_model_types()
