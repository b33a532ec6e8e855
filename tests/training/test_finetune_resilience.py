"""Never lose work when fine-tuning: SIGKILL + resume is bitwise identical (best/ included), SIGTERM
saves and resumes exactly, a non-finite loss is named (the engine is pretraining's: test_resilience.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2ForSequenceClassification

from tests.training.conftest import tiny_finetune_config
from tests.training.test_resilience import assert_bitwise_equal, subprocess_env, weights
from upcycle.training import NonFiniteError, finetune
from upcycle.training import checkpoint as ckpt
from upcycle.training.reporting import read_metrics


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(path)]


@pytest.mark.slow
def test_finetune_resume_after_sigkill_is_bitwise_identical(xnli, moe_dir, tmp_path):
    """Dropout, router jitter, the example order, AdamW and the best-so-far all carry across the kill."""
    cfg = tiny_finetune_config(
        xnli, tmp_path / "uninterrupted", model=moe_dir, train_languages="fr,es", steps=30, save_every=6,
        keep_last=0, eval_every=7, eval_examples=20, log_every=3,
    )  # fmt: skip
    reference = finetune(cfg)

    killed = dataclasses.replace(cfg, out=str(tmp_path / "killed"))
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed.to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "finetune", "--config", str(config_file)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = Path(killed.out) / "checkpoints" / "step-12"
    deadline = time.time() + 180
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = ckpt.list_checkpoints(Path(killed.out) / "checkpoints")
    assert before and before[-1][0] < 30

    resumed = finetune(dataclasses.replace(killed, resume=True))
    assert resumed.resumed_from == before[-1][1] and resumed.step == 30
    assert_bitwise_equal(weights(reference.final_dir), weights(resumed.final_dir))
    assert_bitwise_equal(weights(Path(cfg.out) / "best"), weights(Path(killed.out) / "best"))
    assert resumed.best == reference.best
    assert comparable(Path(killed.out) / "metrics.jsonl") == comparable(Path(cfg.out) / "metrics.jsonl")


def test_finetune_sigterm_saves_and_resume_matches(xnli, moe_dir, tmp_path):
    cfg = tiny_finetune_config(xnli, tmp_path / "ref", model=moe_dir, steps=12, save_every=0, eval_every=4,
                               eval_examples=20)  # fmt: skip
    reference = finetune(cfg)

    def send_sigterm(step, info):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped_cfg = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    stopped = finetune(stopped_cfg, on_step=send_sigterm)
    assert stopped.stopped_by == signal.SIGTERM and stopped.step == 6 and stopped.final_dir is None
    saved = [s for s, _ in ckpt.list_checkpoints(Path(stopped_cfg.out) / "checkpoints")]
    assert 6 in saved and ckpt.verify_checkpoint(Path(stopped_cfg.out) / "checkpoints" / "step-6") is None
    resumed = finetune(dataclasses.replace(stopped_cfg, resume=True))
    assert resumed.step == 12 and resumed.best == reference.best
    assert_bitwise_equal(weights(reference.final_dir), weights(resumed.final_dir))
    best = json.loads((Path(stopped_cfg.out) / "best" / "training.json").read_text())
    assert best["step"] == reference.best["step"]


def test_nonfinite_loss_is_named_and_a_fresh_run_leaves_nothing(xnli, tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=128, num_labels=3, pad_token_id=50256
    )
    model = GPT2ForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight[1, 3] = float("nan")
    model.save_pretrained(tmp_path / "nan-head")
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss \(nan\) at step 1; .*no checkpoint was written"
    ):
        finetune(tiny_finetune_config(xnli, run, model=str(tmp_path / "nan-head"), eval_split="none"))
    assert not run.exists()  # failed before completing a step: the corrected command may reuse --out
