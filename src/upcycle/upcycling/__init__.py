"""Upcycling: dense Hugging Face models into MoE checkpoints, one file per initialisation method.

    from upcycle.upcycling import ExtendConfig, UpcycleConfig, convert, extend
    result = convert(UpcycleConfig(model=["gpt2"], method="drop", ratio=0.15, out="gpt2-moe"))
    extend(ExtendConfig(model="nexus-moe", expert=["code=code-lm"], domain_data=["code=code.jsonl"],
                        out="nexus-moe-code"))

``moe/`` never imports this package; this package never imports training, evaluation or analysis.
"""

from upcycle.upcycling.convert import (
    Source,
    UpcycleError,
    UpcycleResult,
    convert,
    function_preservation,
    load_source,
    options_from,
    save_atomically,
    upcycle_model,
)
from upcycle.upcycling.dense import DenseMLP
from upcycle.upcycling.extend import ExtendResult, extend
from upcycle.upcycling.options import PRESETS, ExtendConfig, UpcycleConfig, parse_layers, preset
from upcycle.upcycling.registry import LayerInit, get_method, method_names, output_scale, register

__all__ = [
    "PRESETS",
    "DenseMLP",
    "ExtendConfig",
    "ExtendResult",
    "LayerInit",
    "Source",
    "UpcycleConfig",
    "UpcycleError",
    "UpcycleResult",
    "convert",
    "extend",
    "function_preservation",
    "get_method",
    "load_source",
    "method_names",
    "options_from",
    "output_scale",
    "parse_layers",
    "preset",
    "register",
    "save_atomically",
    "upcycle_model",
]
