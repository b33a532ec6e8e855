"""Lazy package exports: ``from upcycle.moe import MoE`` works as before, but importing a light submodule
(``upcycle.moe.config``, ``upcycle.training.config``) no longer imports torch through the package.

The command line imports the option dataclasses of every command to build its flags; with eager package
``__init__`` files that pulled in torch and transformers, ``upcycle --help`` took about 5 s (issue 11).
Each package lists where its public names live and resolves them on first use (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to its module.

    A name that is also a submodule's name (``upcycle.upcycling.convert``, the function, and
    ``upcycle/upcycling/convert.py``) keeps meaning the export, as it did with the eager imports: the
    import system's binding of the submodule onto the package is undone.
    """
    module = sys.modules[package]
    shadowed = {name for name in exports if importlib.util.find_spec(f"{package}.{name}") is not None}
    if shadowed:
        module.__class__ = _shadowing_module(shadowed)

    def __getattr__(name: str):
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list:
        return sorted(set(module.__dict__) | set(exports))

    return __getattr__, __dir__


def _shadowing_module(names: set[str]) -> type:
    class ShadowingModule(types.ModuleType):
        def __setattr__(self, name: str, value: object) -> None:
            if name in names and isinstance(value, types.ModuleType):
                return  # the submodule of the same name was imported: the name stays the export
            super().__setattr__(name, value)

    return ShadowingModule
