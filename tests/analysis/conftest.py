"""Fixtures of the analysis tests: tiny saved MoE models (causal LM and sequence classifier), an
XNLI-layout folder and text domains, all written by the tests (the Hub is not reachable in CI)."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from upcycle.data.synthetic import domain_documents, write_jsonl, write_synthetic_xnli


@pytest.fixture(autouse=True)
def one_thread():
    """Two xdist workers on two cores: one intra-op thread each."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("analysis-models") / "dense")


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, dense_dir):
    """Top-2 of 4 experts in every layer, token routing; a router init wide enough that routing varies."""
    return save_tiny_moe(
        tmp_path_factory.mktemp("analysis-models") / "moe",
        dense_dir,
        top_k=2,
        layers="all",
        router_init="normal:0.5",
    )


@pytest.fixture(scope="session")
def seq_moe_dir(tmp_path_factory, dense_dir):
    """Top-1 sequence-level routing with global routing (the second layer follows the first)."""
    return save_tiny_moe(
        tmp_path_factory.mktemp("analysis-models") / "seq-moe",
        dense_dir,
        top_k=1,
        layers="all",
        router_init="normal:0.5",
        moe={"routing_unit": "sequence", "global_routing": True},
    )


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, moe_dir):
    """The MoE with a fresh 3-label head, saved as a sequence classifier (what fine-tuning writes)."""
    from upcycle.data.xnli import XNLI_LABELS
    from upcycle.models.loading import load_classifier

    path = tmp_path_factory.mktemp("analysis-models") / "classifier"
    load_classifier(moe_dir, label_names=list(XNLI_LABELS)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def xnli_dir(tmp_path_factory):
    return str(
        write_synthetic_xnli(
            tmp_path_factory.mktemp("xnli"),
            ["en", "fr", "th"],
            sizes={"train": 4, "validation": 4, "test": 30},
            file_format="jsonl",
        )
    )


@pytest.fixture(scope="session")
def domain_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    return {
        d: str(write_jsonl(root / f"{d}.jsonl", domain_documents(d, 12, seed=1)))
        for d in ("prose", "code", "math")
    }
