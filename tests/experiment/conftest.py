"""Fixtures of the experiment tests: the demo experiment at the smallest size (tiny models, a few steps,
a few examples per language), written from configs/experiments/demo.yaml so the tests follow the demo."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "configs" / "experiments"

#: The demo's sections at the smallest size: same stages, models, settings and analyses.
SMALL = {
    "data": {
        "xnli": {"languages": "all", "train": 12, "validation": 4, "test": 6},
        "corpus": {"languages": "en,fr,es", "train": 40, "eval": 8},
    },
    "seed": {"model": "debug", "seq_len": 16, "batch_size": 2, "steps": 2, "eval_every": 2, "eval_batches": 1,
             "save_every": 2, "log_every": 1, "shuffle_buffer": 8, "warmup": 0},
    "convert": {"experts": 4},
    "pretrain": {"seq_len": 16, "batch_size": 2, "steps": 6, "eval_every": 3, "eval_batches": 1, "save_every": 2,
                 "log_every": 1, "shuffle_buffer": 8, "warmup": 1},
    "finetune": {"steps": 3, "batch_size": 4, "max_length": 32, "eval_every": 3, "eval_examples": 4, "log_every": 1,
                 "warmup": 0},
    "evaluate.xnli": {"max_length": 32, "bootstrap": 20},
    "analyze.routing.language": {"max_tokens": 120, "max_length": 32},
    "analyze.routing.label": {"max_tokens": 120, "max_length": 32},
}  # fmt: skip


def small_demo(sweep: list | None = None, drop: tuple[str, ...] = ()) -> dict:
    """demo.yaml with every section shrunk (SMALL), a ``sweep`` of convert.ratio, sections dropped."""
    doc = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc.pop("out", None)
    for path, values in SMALL.items():
        node = doc
        for part in path.split("."):
            node = node[part]
        node.update(values)
    if sweep:
        doc["sweep"] = {"ratio": sweep}
    for name in drop:
        doc.pop(name, None)
    return doc


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): equal results bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
