"""Which implementation runs the routed experts: ``auto``, ``loop``, ``bank`` or ``grouped``.

- ``loop``: each expert's module on its rows, one after another (``expert(x)``; host-side row counts).
- ``bank``: on CPU, experts side by side on single-threaded workers (upcycle.moe.bank); the loop where
  that would not compute the same thing (GPU, autocast, hooks, adapters, ``torch.compile``).
- ``grouped``: one grouped GEMM per projection with the row counts kept on the device
  (upcycle.moe.grouped); the loop where that would not compute the same thing (hooks, adapters).
- ``auto`` (default): ``grouped`` on CUDA and while ``torch.compile`` traces (the bank and the loop read
  row counts on the host, a graph break), ``bank`` on CPU (faster there, see README Performance).

Every path computes the same outputs and gradients (tests/moe/test_grouped.py). The choice is made at
run time, not stored in checkpoints: it depends on the machine, not the model. Set it for the process
with :func:`set_expert_path`, for a block with :class:`expert_path_set`, with the environment variable
``UPCYCLE_EXPERT_PATH``, or for one layer with ``moe.expert_path = "loop"``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from upcycle.config import ConfigError

ExpertPath = Literal["auto", "loop", "bank", "grouped"]
EXPERT_PATHS = ("auto", "loop", "bank", "grouped")

_setting: str | None = None


def _check(where: str, value) -> str:
    if value not in EXPERT_PATHS:
        raise ConfigError(where, value, f"allowed values are {', '.join(EXPERT_PATHS)}")
    return value


def set_expert_path(path: ExpertPath | None) -> None:
    """The expert path for this process; None follows ``UPCYCLE_EXPERT_PATH`` (default ``auto``)."""
    global _setting
    _setting = None if path is None else _check("expert_path", path)


def expert_path() -> str:
    """The process-wide expert path in effect now."""
    if _setting is not None:
        return _setting
    raw = os.environ.get("UPCYCLE_EXPERT_PATH", "").strip()
    return _check("UPCYCLE_EXPERT_PATH", raw) if raw else "auto"


class expert_path_set:
    """Context manager: ``with expert_path_set("grouped"): ...`` runs a block with another path."""

    def __init__(self, path: ExpertPath | None):
        self.path = None if path is None else _check("expert_path", path)

    def __enter__(self):
        global _setting
        self.saved = _setting
        _setting = self.path
        return self

    def __exit__(self, *exc):
        global _setting
        _setting = self.saved


def resolve(layer_setting: str | None, device: torch.device) -> str:
    """``loop``, ``bank`` or ``grouped`` for a layer (its own setting, else the process's) on ``device``."""
    path = expert_path() if layer_setting is None else _check("expert_path", layer_setting)
    if path == "auto":
        return "grouped" if device.type == "cuda" or torch.compiler.is_compiling() else "bank"
    return path
