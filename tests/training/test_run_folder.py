"""The run folder, for pretraining and fine-tuning alike (issue 11): a failed start leaves nothing, a
checkpoint the run did not write is never deleted, config.yaml lets --resume work from any directory,
TensorBoard records the resolved options once per run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from tests.training.conftest import tiny_config, tiny_finetune_config
from upcycle.cli import main as cli_main
from upcycle.config import ConfigError, UserError
from upcycle.training import checkpoint as ckpt
from upcycle.training import finetune, pretrain
from upcycle.training.reporting import read_metrics


@pytest.mark.parametrize(
    ("command", "bad", "field"),
    [
        ("pretrain", {"seq_len": 256}, "seq_len"),  # longer than the model's context: fails after validation
        ("pretrain", {"text_field": "body"}, "text_field"),  # bad data: fails at the first batch
        ("pretrain", {"model": "LLAMA"}, None),  # a model without tokenizer files
        ("finetune", {"max_length": 256}, "max_length"),
        ("finetune", {"model": "LLAMA"}, None),
    ],
)
def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(
    corpus, xnli, dense_dir, tmp_path, command, bad, field
):
    if bad.get("model") == "LLAMA":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
        LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
        bad = {"model": str(tmp_path / "llama")}
    out = tmp_path / "runs" / "x"
    if command == "pretrain":
        good, run = tiny_config(corpus, out, model=dense_dir, steps=2, eval_data="none"), pretrain
    else:
        good, run = tiny_finetune_config(xnli, out, model=dense_dir, steps=2, eval_split="none"), finetune
    with pytest.raises((ConfigError, UserError)) as err:
        run(dataclasses.replace(good, tensorboard=True, **bad))
    assert field is None or err.value.field == field
    assert not out.exists() and not out.parent.exists()
    assert run(good).step == 2  # not refused as "holds a previous run"


def test_checkpoints_the_run_did_not_write_are_never_deleted(corpus, dense_dir, tmp_path, capsys):
    """The newest checkpoint lacks its manifest: the run restarts from step 0, says what it skipped and
    why, prunes only its own checkpoints, and sets the foreign one aside when it saves that step."""
    cfg = tiny_config(corpus, tmp_path / "run", model=dense_dir, steps=4, save_every=4, eval_data="none")
    pretrain(cfg)
    root = Path(cfg.out) / "checkpoints"
    (root / "step-4" / ckpt.MANIFEST).unlink()
    original = sorted(p.name for p in (root / "step-4").iterdir())
    capsys.readouterr()
    seen = []
    resumed = pretrain(
        dataclasses.replace(cfg, steps=6, save_every=2, keep_last=1, resume=True),
        on_step=lambda step, info: seen.append(sorted(p.name for p in root.iterdir())),
    )
    err = capsys.readouterr().err
    assert resumed.resumed_from is None and resumed.step == 6
    assert "step-4 is unusable (incomplete: no manifest.json)" in err
    assert f"kept {root / 'step-4'} (incomplete: no manifest.json): this run did not write it" in err
    assert seen[1] == ["step-2", "step-4"]  # pruning after step 2 left the foreign step-4 alone
    assert f"{root / 'step-4'} was not written by this run; moved it to {root / 'step-4.set-aside'}" in err
    assert sorted(p.name for p in (root / "step-4.set-aside").iterdir()) == original
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [6]  # its own, pruned to --keep-last 1


def test_resume_from_another_directory(corpus, dense_dir, tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    shutil.copy(corpus["train"], first / "corpus.jsonl")
    shutil.copytree(dense_dir, first / "dense")
    monkeypatch.chdir(first)
    args = ["pretrain", "--model", "dense", "--data", "corpus.jsonl", "--eval-data", "none", "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--shuffle-buffer", "4", "--no-tensorboard", "--out", "runs/x"]  # fmt: skip
    assert cli_main(args) == 0
    saved = yaml.safe_load((first / "runs/x/config.yaml").read_text())
    assert saved["data"] == str(first / "corpus.jsonl") and saved["model"] == str(first / "dense")
    assert saved["out"] == str(first / "runs/x")
    monkeypatch.chdir(second)
    assert cli_main(["pretrain", "--out", "../a/runs/x", "--resume", "--steps", "4"]) == 0
    assert [r["step"] for r in read_metrics(first / "runs/x/metrics.jsonl", "train")][-1] == 4


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_tensorboard_records_the_resolved_config_once(corpus, xnli, dense_dir, tmp_path, command):
    out = tmp_path / "run"
    if command == "pretrain":
        cfg, run = (
            tiny_config(corpus, out, model=dense_dir, steps=2, save_every=2, tensorboard=True),
            pretrain,
        )
    else:
        cfg, run = (
            tiny_finetune_config(xnli, out, model=dense_dir, steps=2, eval_examples=8, tensorboard=True),
            finetune,
        )
    run(cfg)
    run(dataclasses.replace(cfg, steps=4, resume=True))
    hparams = list((out / "tensorboard").rglob("hparams.yml"))
    assert len(hparams) == 1
    recorded = yaml.safe_load(hparams[0].read_text())
    assert None not in recorded.values() and "None" not in recorded.values()
    assert isinstance(recorded["warmup"], int) and recorded["out"] == str(out.resolve())
