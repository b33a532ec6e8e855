"""`upcycle pretrain` as a newcomer meets it (issue 11): every mistake is one line naming the flag, the
YAML key or the file, and leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.clitools import enter_workdir, refused
from upcycle.cli import main
from upcycle.training.cli import config_from_args


@pytest.fixture
def here(tmp_path, monkeypatch, corpus):
    enter_workdir(tmp_path, monkeypatch)
    shutil.copy(corpus["train"], "train.jsonl")
    return tmp_path


@pytest.mark.parametrize(
    "yaml_text,needles",
    [
        ("learning_rate: 0.001\n", ["run.yaml", "learning_rate", "did you mean lr?"]),
        ("step: 3\n", ["run.yaml", "step=3", "did you mean steps?"]),
        ("steps: ten\n", ["run.yaml", "steps='ten'", "expected an integer"]),
        ("lr: fast\n", ["run.yaml", "lr='fast'", "expected a number"]),
        ("precision: fp8\n", ["run.yaml", "precision='fp8'", "allowed values are"]),
        ("experts: 8\n", ["run.yaml", "experts", "unknown field"]),
    ],
)
def test_yaml_mistakes(here, capsys, yaml_text, needles):
    Path("run.yaml").write_text(yaml_text)
    refused(capsys, here, ["pretrain", "--config", "run.yaml", "--model", "debug", "--data", "train.jsonl",
                           "--out", "run"], *needles)  # fmt: skip


def test_resume_of_a_run_that_does_not_exist_says_so(here, capsys):
    line = refused(
        capsys, here, ["pretrain", "--out", "runs/nope", "--resume"], "--out='runs/nope'", "no run to resume"
    )
    assert "--model" not in line.split("is invalid")[0]  # it does not blame --model


def test_truncated_model_weights_name_the_file(here, capsys, dense_dir):
    shutil.copytree(dense_dir, "bad")
    weights = Path("bad/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(capsys, here, ["pretrain", "--model", "bad", "--data", "train.jsonl", "--out", "run"],
            "bad/model.safetensors", "truncated")  # fmt: skip


def test_empty_data_file_has_no_documents(here, capsys):
    Path("empty.jsonl").write_text("")
    refused(capsys, here, ["pretrain", "--model", "debug", "--data", "empty.jsonl", "--out", "run"],
            "--data='empty.jsonl'", "the file has no documents")  # fmt: skip
    refused(capsys, here, ["pretrain", "--model", "debug", "--data", "train.jsonl", "--eval-data", "empty.jsonl",
                           "--out", "run"], "--eval-data='empty.jsonl'", "no documents")  # fmt: skip


def test_mistyped_names_fail_fast(here, capsys):
    refused(capsys, here, ["pretrain", "--model", "dnese", "--data", "train.jsonl", "--out", "run"],
            "--model='dnese'", "no local folder 'dnese', and the hub could not be reached")  # fmt: skip
    refused(capsys, here, ["pretrain", "--model", "debug", "--data", "trian.jsonl", "--out", "run"],
            "--data='trian.jsonl'", "no such file")  # fmt: skip
    refused(capsys, here, ["pretrain", "--model", "debug", "--tokenizer", "./tok", "--data", "train.jsonl",
                           "--out", "run"], "--tokenizer='./tok'")  # fmt: skip
    refused(capsys, here, ["pretrain", "--model", "debug", "--out", "run"], "--data='allenai/c4'",
            "the hub could not be reached")  # fmt: skip
    Path("afile").write_text("x")
    refused(capsys, here, ["pretrain", "--model", "debug", "--data", "train.jsonl", "--out", "afile"],
            "--out='afile'", "not a folder")  # fmt: skip


def test_home_is_expanded_in_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("data: ~/train.jsonl\n")
    cfg = config_from_args({"config": "~/c.yaml", "model": "~/m", "out": "~/run", "eval_data": "~/e.jsonl"})
    assert (cfg.model, cfg.data, cfg.eval_data, cfg.out) == tuple(
        str(tmp_path / n) for n in ("m", "train.jsonl", "e.jsonl", "run")
    )


def test_a_run_under_home_saves_a_tokenizer_that_pads_like_the_model(here, monkeypatch, moe_dir):
    monkeypatch.setenv("HOME", str(here))
    args = ["pretrain", "--model", moe_dir, "--data", "~/train.jsonl", "--eval-data", "none", "--out", "~/run",
            "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--save-every", "0", "--no-tensorboard",
            "--progress", "lines"]  # fmt: skip
    assert main(args) == 0
    assert (here / "run" / "final").is_dir() and not (here / "~").exists()
    config = AutoConfig.from_pretrained(here / "run" / "final")
    tok = AutoTokenizer.from_pretrained(here / "run" / "final")
    assert config.pad_token_id is not None and tok.pad_token_id == config.pad_token_id
    assert tok(["a", "a b c"], padding=True)["attention_mask"][0][-1] == 0
