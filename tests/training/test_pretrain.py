"""`upcycle pretrain` end to end on tiny models: training, logging, the run folder, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from tests.training.conftest import tiny_config
from upcycle.cli import main as cli_main
from upcycle.config import ConfigError
from upcycle.models.modeling import MoEGPT2LMHeadModel
from upcycle.training import pretrain
from upcycle.training.checkpoint import list_checkpoints, verify_checkpoint
from upcycle.training.reporting import read_metrics


def mean(xs):
    return sum(xs) / len(xs)


def test_moe_trains_and_logs_expert_fractions(corpus, moe_dir, tmp_path):
    out = tmp_path / "run"
    result = pretrain(tiny_config(corpus, out, model=moe_dir, steps=30, keep_last=2, tensorboard=True))
    assert result.step == 30 and result.stopped_by is None

    train = read_metrics(out / "metrics.jsonl", "train")
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [r["step"] for r in train] == list(range(1, 31))
    losses = [r["loss"] for r in train]
    assert mean(losses[-5:]) < mean(losses[:5]) - 1.0  # loss falls
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0
    assert math.isclose(evals[-1]["perplexity"], math.exp(evals[-1]["loss"]), rel_tol=1e-9)
    assert evals[-1]["accuracy"] > evals[0]["accuracy"]

    # Every logged step: LM, aux and z losses, and per MoE layer the expert fractions of that interval.
    moe_layers = AutoModelForCausalLM.from_pretrained(moe_dir).config.moe_layers
    for r in train:
        for key in ("lm_loss", "aux_loss", "z_loss", "load_balancing_loss", "accuracy", "lr", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["tokens_per_s"] > 0
        assert math.isclose(r["loss"], r["lm_loss"] + r["aux_loss"], rel_tol=1e-5)
        assert sorted(r["routing"]) == [str(i) for i in moe_layers]
        for layer in r["routing"].values():
            assert len(layer["fraction"]) == 4 and math.isclose(sum(layer["fraction"]), 1.0, abs_tol=1e-4)
            assert 0.0 <= layer["balance"] <= 1.0
            # The interval's own tokens: 1 step × batch 4 × accum 2 × 32 tokens (stats reset after logging).
            assert layer["tokens"] == 4 * 2 * 32 == sum(layer["tokens_per_expert"])
    # Eval routing covers only the eval batches.
    assert evals[0]["routing"][str(moe_layers[0])]["tokens"] == 2 * 4 * 32

    # Run folder: resolved config, TensorBoard, checkpoints pruned to 2, a loadable final model.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 30 and saved["min_lr"] == pytest.approx(3e-4)
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [20, 30]
    assert all(verify_checkpoint(p) is None for _, p in list_checkpoints(out / "checkpoints"))
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert isinstance(final, MoEGPT2LMHeadModel)
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-30")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), ckpt.state_dict().values()))
    assert json.loads((result.final_dir / "training.json").read_text())["step"] == 30


def test_dense_baseline_trains(corpus, dense_dir, tmp_path):
    out = tmp_path / "dense"
    result = pretrain(tiny_config(corpus, out, model=dense_dir, steps=20, eval_every=0))
    train = read_metrics(out / "metrics.jsonl", "train")
    assert mean([r["loss"] for r in train[-5:]]) < mean([r["loss"] for r in train[:5]]) - 1.0
    assert all("routing" not in r and "aux_loss" not in r for r in train)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "eval")] == [0, 20]
    assert type(AutoModelForCausalLM.from_pretrained(result.final_dir)) is GPT2LMHeadModel


def test_cli_yaml_and_flags_preset_from_scratch(corpus, tmp_path):
    """defaults < YAML < flags; a preset trains from scratch; the resolved config lands in the run."""
    out = tmp_path / "cli"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "debug-moe",
                "data": str(corpus["train"]),
                "eval-data": "none",
                "seq_len": 32,
                "batch-size": 2,
                "steps": 50,  # overridden by the flag
                "lr": 0.002,
                "log_every": 2,
                "shuffle_buffer": 4,
                "tensorboard": False,
            }
        )
    )
    rc = cli_main(["pretrain", "--config", str(config), "--steps", "4", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 4 and saved["lr"] == 0.002 and saved["model"] == "debug-moe"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [2, 4]
    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "final"), MoEGPT2LMHeadModel)

    # A second start into the same folder without --resume is refused, naming the flag.
    rc = cli_main(["pretrain", "--config", str(config), "--out", str(out)])
    assert rc == 2


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"warmup": 30, "steps": 20}, "warmup"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"precision": "fp8"}, "precision"),
        ({"beta2": 1.0}, "beta2"),
        ({"resume": True, "overwrite": True}, "overwrite"),
    ],
)
def test_config_errors_name_the_field(corpus, tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        tiny_config(corpus, tmp_path, model="debug", **overrides)
    assert err.value.field == field


def test_runtime_config_errors(corpus, dense_dir, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:  # longer than the model's 128 positions
        pretrain(tiny_config(corpus, tmp_path / "a", model=dense_dir, seq_len=256))
    assert err.value.field == "seq_len"
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(corpus, tmp_path / "b", model=dense_dir, text_field="body"))
    assert err.value.field == "text_field" and "columns are text, id" in err.value.allowed
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(corpus, tmp_path / "c", model=str(tmp_path / "nope")))
    assert err.value.field == "model"
    rc = cli_main(
        [
            "pretrain",
            "--model",
            "debug",
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert rc == 2 and "--data=" in capsys.readouterr().err
