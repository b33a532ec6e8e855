"""Upcycling: dense Hugging Face models into MoE checkpoints, one file per initialisation method.

    from upcycle.upcycling import ExtendConfig, UpcycleConfig, convert, extend
    result = convert(UpcycleConfig(model=["gpt2"], method="drop", ratio=0.15, out="gpt2-moe"))
    extend(ExtendConfig(model="nexus-moe", expert=["code=code-lm"], domain_data=["code=code.jsonl"],
                        out="nexus-moe-code"))

``moe/`` never imports this package; this package never imports training, evaluation or analysis.
"""

from upcycle._lazy import lazy_exports

#: Public name → the module defining it, imported on first use (upcycle._lazy: keeps `--help` fast).
_EXPORTS = {
    "Source": "upcycle.upcycling.convert",
    "UpcycleError": "upcycle.upcycling.convert",
    "UpcycleResult": "upcycle.upcycling.convert",
    "convert": "upcycle.upcycling.convert",
    "function_preservation": "upcycle.upcycling.convert",
    "load_source": "upcycle.upcycling.convert",
    "options_from": "upcycle.upcycling.convert",
    "save_atomically": "upcycle.upcycling.convert",
    "upcycle_model": "upcycle.upcycling.convert",
    "DenseMLP": "upcycle.upcycling.dense",
    "ExtendResult": "upcycle.upcycling.extend",
    "extend": "upcycle.upcycling.extend",
    "ExtendConfig": "upcycle.upcycling.options",
    "PRESETS": "upcycle.upcycling.options",
    "UpcycleConfig": "upcycle.upcycling.options",
    "parse_layers": "upcycle.upcycling.options",
    "preset": "upcycle.upcycling.options",
    "LayerInit": "upcycle.upcycling.registry",
    "get_method": "upcycle.upcycling.registry",
    "method_names": "upcycle.upcycling.registry",
    "output_scale": "upcycle.upcycling.registry",
    "register": "upcycle.upcycling.registry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DenseMLP",
    "ExtendConfig",
    "ExtendResult",
    "LayerInit",
    "PRESETS",
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
