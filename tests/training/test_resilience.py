"""Never lose work (issue 4): SIGKILL + resume is bitwise identical, SIGTERM saves, broken checkpoints
fall back, a crash while saving keeps the previous one, a NaN stops the run (or is skipped)."""

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
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from tests.data.corpus import make_texts, write_jsonl
from tests.training.conftest import tiny_config
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.training import NonFiniteError, pretrain
from upcycle.training import checkpoint as ckpt
from upcycle.training.reporting import read_metrics

REPO = Path(__file__).resolve().parents[2]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k] - b[k]).abs().max()})"


def subprocess_env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO / "src"),
    }


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(corpus, moe_dir, tmp_path):
    """Dropout, router jitter, the shuffle buffer and AdamW all carry state across the kill."""
    cfg = tiny_config(
        corpus, tmp_path / "uninterrupted", model=moe_dir, steps=32, save_every=8, keep_last=0, eval_every=0,
        eval_data="none", log_every=4,
    )  # fmt: skip
    reference = pretrain(cfg)

    killed = dataclasses.replace(cfg, out=str(tmp_path / "killed"))
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed.to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "pretrain", "--config", str(config_file)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = Path(killed.out) / "checkpoints" / "step-8"
    deadline = time.time() + 120
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = ckpt.list_checkpoints(Path(killed.out) / "checkpoints")
    assert before and before[-1][0] < 32

    resumed = pretrain(dataclasses.replace(killed, resume=True))
    start = ckpt.read_trainer_state(resumed.resumed_from)
    assert resumed.resumed_from == before[-1][1] and resumed.step == 32
    assert_bitwise_equal(weights(reference.final_dir), weights(resumed.final_dir))

    # The log continues exactly: same losses after the resume point, one record per logged step.
    ref_log = read_metrics(Path(cfg.out) / "metrics.jsonl", "train")
    new_log = read_metrics(Path(killed.out) / "metrics.jsonl", "train")
    assert [r["step"] for r in new_log] == [r["step"] for r in ref_log]
    assert [r["loss"] for r in new_log] == [r["loss"] for r in ref_log]
    # No document was read twice: the resumed process read exactly those after the checkpoint.
    assert resumed.documents_read == reference.documents_read - start["documents"]
    assert 0 < resumed.documents_read < reference.documents_read


def test_sigterm_saves_at_the_step_boundary_and_resume_matches(corpus, moe_dir, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "ref", model=moe_dir, steps=12, save_every=0, eval_data="none")
    reference = pretrain(cfg)

    def send_sigterm(step, info):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped_cfg = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    stopped = pretrain(stopped_cfg, on_step=send_sigterm)
    # The signal arrived after step 5; step 6 completes, is saved, and the run returns cleanly.
    assert stopped.stopped_by == signal.SIGTERM and stopped.step == 6 and stopped.final_dir is None
    saved = ckpt.list_checkpoints(Path(stopped_cfg.out) / "checkpoints")
    assert [s for s, _ in saved] == [6] and ckpt.verify_checkpoint(saved[0][1]) is None
    assert not (Path(stopped_cfg.out) / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = pretrain(dataclasses.replace(stopped_cfg, resume=True))
    assert resumed.step == 12
    assert_bitwise_equal(weights(reference.final_dir), weights(resumed.final_dir))


def test_corrupted_or_incomplete_checkpoint_falls_back(corpus, dense_dir, tmp_path, capsys):
    cfg = tiny_config(
        corpus, tmp_path / "run", model=dense_dir, steps=6, save_every=2, keep_last=0, eval_data="none"
    )
    pretrain(cfg)
    root = Path(cfg.out) / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 6]
    blob = root / "step-6" / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the weights
    blob.write_bytes(bytes(data))
    (root / "step-4" / ckpt.MANIFEST).unlink()  # as if cut short
    capsys.readouterr()

    resumed = pretrain(dataclasses.replace(cfg, steps=8, resume=True))
    err = capsys.readouterr().err
    assert "step-6 is unusable (corrupted: model.safetensors does not match its checksum)" in err
    assert "step-4 is unusable (incomplete: no manifest.json)" in err
    assert resumed.resumed_from == root / "step-2" and resumed.step == 8
    # The replacements are complete checkpoints again.
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 6, 8]
    assert all(ckpt.verify_checkpoint(p) is None for _, p in ckpt.list_checkpoints(root))


def test_crash_while_saving_keeps_the_previous_checkpoint(corpus, dense_dir, tmp_path, monkeypatch):
    cfg = tiny_config(corpus, tmp_path / "run", model=dense_dir, steps=6, save_every=2, eval_data="none")
    real = ckpt.write_manifest

    def failing(folder, step):
        if step == 4:
            raise OSError("No space left on device")
        real(folder, step)

    monkeypatch.setattr(ckpt, "write_manifest", failing)
    with pytest.raises(OSError, match="No space left"):
        pretrain(cfg)
    monkeypatch.setattr(ckpt, "write_manifest", real)
    root = Path(cfg.out) / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert ckpt.verify_checkpoint(root / "step-2") is None
    assert [p.name for p in root.iterdir()] == ["step-2"]  # the temporary folder is gone too

    resumed = pretrain(dataclasses.replace(cfg, resume=True))
    assert resumed.resumed_from == root / "step-2" and resumed.step == 6


def test_keep_last_prunes_after_the_new_checkpoint(corpus, dense_dir, tmp_path):
    cfg = tiny_config(
        corpus, tmp_path / "run", model=dense_dir, steps=8, save_every=2, keep_last=2, eval_data="none"
    )
    seen = []

    def record(step, info):
        seen.append([s for s, _ in ckpt.list_checkpoints(Path(cfg.out) / "checkpoints")])

    pretrain(cfg, on_step=record)
    # Right after each save the folder holds the new checkpoint and the one before it, never fewer.
    assert seen[3] == [2, 4] and seen[5] == [4, 6] and seen[7] == [6, 8]


@pytest.fixture(scope="module")
def nan_setup(tmp_path_factory):
    """A model whose input embedding of one rare token is NaN (untied, so only inputs containing it are
    affected), and a corpus where that token appears in a single late document."""
    root = tmp_path_factory.mktemp("nan")
    tok = gpt2_tokenizer_offline()
    (trigger,) = tok(" elephant")["input_ids"]
    texts = make_texts(300, seed=5)
    texts[120] += " An elephant walks by."
    assert all(trigger not in ids for i, ids in enumerate(tok(texts)["input_ids"]) if i != 120)
    data = write_jsonl(root / "train.jsonl", texts)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=128, tie_word_embeddings=False
        )
    )
    with torch.no_grad():
        model.transformer.wte.weight[trigger] = float("nan")
    model.save_pretrained(root / "model")
    return {"train": data, "eval": data}, str(root / "model"), trigger


def test_nonfinite_loss_stops_with_the_step_and_keeps_checkpoints(nan_setup, tmp_path):
    corpus, model_dir, _ = nan_setup
    cfg = tiny_config(
        corpus, tmp_path / "run", model=model_dir, steps=40, save_every=5, keep_last=0, eval_data="none"
    )
    with pytest.raises(NonFiniteError) as err:
        pretrain(cfg)
    step = err.value.step
    last = err.value.last_checkpoint
    assert f"non-finite loss (nan) at step {step};" in str(err.value) and str(last) in str(err.value)
    saved = [s for s, _ in ckpt.list_checkpoints(Path(cfg.out) / "checkpoints")]
    assert saved and saved[-1] < step and last.name == f"step-{saved[-1]}"
    assert ckpt.verify_checkpoint(last) is None
    assert read_metrics(Path(cfg.out) / "metrics.jsonl", "train")[-1]["step"] == step - 1
    assert not (Path(cfg.out) / "final").exists()


def test_skip_nonfinite_skips_and_counts(nan_setup, tmp_path):
    corpus, model_dir, trigger = nan_setup
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        model=model_dir,
        steps=40,
        save_every=0,
        eval_data="none",
        skip_nonfinite=True,
    )
    result = pretrain(cfg)
    assert result.step == 40 and result.skipped_nonfinite >= 1
    log = read_metrics(Path(cfg.out) / "metrics.jsonl", "train")
    assert log[-1]["skipped_nonfinite"] == result.skipped_nonfinite
    bad_steps = [r["step"] for r in log if r["loss"] == "nan"]
    assert len(bad_steps) == result.skipped_nonfinite
    final = weights(result.final_dir)
    wte = final.pop("transformer.wte.weight")
    assert (
        torch.isnan(wte[trigger]).all()
        and torch.isfinite(torch.cat([wte[:trigger], wte[trigger + 1 :]])).all()
    )
    assert all(torch.isfinite(t).all() for t in final.values())
    assert json.loads((result.final_dir / "training.json").read_text())["skipped_nonfinite"] >= 1
