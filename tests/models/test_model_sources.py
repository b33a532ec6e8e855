"""Model names for every command (issue 11): local folders with `~`, a fast answer when the Hub is
offline or unreachable, one line naming a truncated weights file."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from upcycle.config import ConfigError, UserError
from upcycle.models import loading
from upcycle.models.loading import check_weight_files, load_causal_lm, load_classifier, model_source


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "tiny"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    ).save_pretrained(path)
    return path


def truncated_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (dst / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return dst


def test_a_folder_under_home_is_found(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny.parent))
    assert model_source("~/tiny") == str(tiny)
    assert load_causal_lm("~/tiny").config.n_layer == 1


def test_missing_folders_and_offline_names_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no such model folder"):
        model_source(str(tmp_path / "missing"))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        model_source("dnese")
    assert "no local folder 'dnese', and the hub could not be reached" in err.value.allowed
    assert time.perf_counter() - start < 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        model_source(str(tmp_path / "file"), flag="PATH")


def test_offline_names_in_the_hub_cache_still_load(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--owner--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--owner--cached" / "refs").mkdir()
    (tmp_path / "models--owner--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_source("owner/cached") == "owner/cached"


def test_an_unreachable_hub_is_probed_once_quickly(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored afterwards (the probe switches it on)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(loading, "_hub_answered", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        model_source("dnese")
    assert (
        "no local folder 'dnese', and the hub could not be reached (no answer from http://127.0.0.1:9"
        in str(err.value)
    )
    assert time.perf_counter() - start < loading.HUB_PROBE_TIMEOUT + 2
    assert constants.HF_HUB_OFFLINE  # later loads read the cache instead of retrying


def test_truncated_weights_are_one_line_naming_the_file(tiny, tmp_path):
    bad = truncated_copy(tiny, tmp_path / "bad")
    for load in (check_weight_files, load_causal_lm, load_classifier):
        with pytest.raises(UserError) as err:
            load(str(bad))
        message = str(err.value)
        assert "\n" not in message and str(bad / "model.safetensors") in message and "truncated" in message
