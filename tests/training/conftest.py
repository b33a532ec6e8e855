"""Fixtures of the training tests: a local corpus, a tiny dense GPT-2 and its drop-upcycled MoE."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.data.corpus import write_corpus
from tests.training.helpers import save_tiny_gpt2, save_tiny_moe
from upcycle.training import PretrainConfig


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: bitwise comparisons with subprocesses (OMP_NUM_THREADS=1) need the same
    reduction order, and two xdist workers on two cores should not oversubscribe them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("models") / "dense")


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, dense_dir):
    # Jitter and z-loss on, so resume must restore the RNG and every loss term.
    return save_tiny_moe(
        tmp_path_factory.mktemp("models") / "moe", dense_dir, jitter=0.01, z_loss_weight=0.001
    )


def tiny_config(corpus, out, **overrides) -> PretrainConfig:
    """A few-second run on the local corpus."""
    base = PretrainConfig(
        model=None,
        data=str(corpus["train"]),
        eval_data=str(corpus["eval"]),
        seq_len=32,
        batch_size=4,
        grad_accum=2,
        steps=20,
        lr=3e-3,
        warmup=2,
        log_every=1,
        eval_every=10,
        eval_batches=2,
        save_every=10,
        shuffle_buffer=16,
        out=str(out),
        tensorboard=False,
        progress="lines",
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def xnli(tmp_path_factory):
    """A generated XNLI-layout folder: en, fr, es (clean labels) and de, 400 training pairs each."""
    from upcycle.data.synthetic import write_synthetic_xnli

    sizes = {"train": 400, "validation": 60, "test": 30}
    return str(write_synthetic_xnli(tmp_path_factory.mktemp("xnli"), ("en", "fr", "es", "de"), sizes, seed=1))


def tiny_finetune_config(xnli, out, **overrides):
    """A few-second fine-tuning run on the generated data (French by default)."""
    from upcycle.training import FinetuneConfig

    base = FinetuneConfig(
        model=None,
        data=xnli,
        train_languages="fr",
        batch_size=16,
        steps=20,
        lr=1e-3,
        warmup=2,
        log_every=5,
        eval_every=10,
        save_every=10,
        out=str(out),
        tensorboard=False,
        progress="lines",
    )
    return dataclasses.replace(base, **overrides)
