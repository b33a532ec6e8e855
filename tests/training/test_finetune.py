"""`upcycle finetune` end to end on tiny models and generated XNLI-layout data: learning, validation
records, the best checkpoint, saved folders, MoE options and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.training.conftest import tiny_finetune_config
from tests.training.helpers import save_tiny_moe
from upcycle.cli import main as cli_main
from upcycle.config import ConfigError
from upcycle.training import finetune
from upcycle.training.checkpoint import list_checkpoints
from upcycle.training.reporting import read_metrics

XNLI_NAMES = {0: "entailment", 1: "neutral", 2: "contradiction"}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize(
    ("kind", "languages"),
    [("dense", "fr"), ("moe", "fr"), ("moe", "en,fr,es")],
    ids=["dense-fr", "moe-fr", "moe-en,fr,es"],
)
def test_finetuning_beats_chance_and_keeps_the_best(xnli, dense_dir, moe_dir, tmp_path, kind, languages):
    model = dense_dir if kind == "dense" else moe_dir
    cfg = tiny_finetune_config(
        xnli, tmp_path / "run", model=model, train_languages=languages, steps=100, lr=2e-3, warmup=5, eval_every=20,
        save_every=0, keep_last=1, log_every=10,
    )  # fmt: skip
    result = finetune(cfg)
    out = Path(cfg.out)
    langs = languages.split(",")
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [0, 20, 40, 60, 80, 100]
    for r in evals:
        assert list(r["languages"]) == langs and all(v["n"] == 60 for v in r["languages"].values())
        assert r["accuracy"] == pytest.approx(
            sum(v["accuracy"] for v in r["languages"].values()) / len(langs)
        )
        assert r["split"] == "validation" and (bool(r["routing"]) == (kind == "moe"))
    # Chance is 1/3 (σ ≈ 0.06 on 60 examples, 0.035 on 180); the generated labels are learnable.
    best = max(evals[1:], key=lambda r: r["accuracy"])  # earliest of ties: only a strict gain replaces best/
    assert best["accuracy"] >= 0.55 and evals[0]["accuracy"] < 0.5
    assert result.best == {"step": best["step"], "value": best["accuracy"]}

    # best/ is the model of that step; its checkpoint outlives --keep-last 1; final/ is the last step.
    summary = json.loads((out / "best" / "training.json").read_text())
    assert summary["step"] == best["step"] and summary["eval"]["languages"] == best["languages"]
    kept = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert kept == sorted({best["step"], 100})
    best_w, ckpt_w = weights(out / "best"), weights(out / "checkpoints" / f"step-{best['step']}")
    assert all(torch.equal(best_w[k], ckpt_w[k]) for k in best_w)
    assert json.loads((result.final_dir / "training.json").read_text())["best"]["step"] == best["step"]

    # The saved folders are classifiers any script loads, with the label names and a padding tokenizer.
    for folder in (out / "best", result.final_dir):
        clf = AutoModelForSequenceClassification.from_pretrained(folder)
        assert clf.config.id2label == XNLI_NAMES and clf.config.pad_token_id == 50256
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.pad_token_id == 50256
        assert tok(["a b c", "d"], padding=True)["attention_mask"] == [[1, 1, 1], [1, 0, 0]]

    train = read_metrics(out / "metrics.jsonl", "train")
    assert train[-1]["examples"] == 100 * 16 and train[-1]["epoch"] == pytest.approx(
        1600 / (400 * len(langs)), abs=0.05
    )
    for r in train:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_s"] > 0
        if kind == "moe":
            assert math.isclose(r["loss"], r["task_loss"] + r["aux_loss"], rel_tol=1e-5)
            assert sum(r["routing"]["1"]["tokens_per_expert"]) == r["routing"]["1"]["tokens"]
        else:
            assert "task_loss" not in r and "routing" not in r


def test_command_line_run_folder(xnli, dense_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["finetune", "--model", dense_dir, "--data", xnli, "--train-languages", "en,es", "--steps", "4",
            "--batch-size", "8", "--eval-examples", "10", "--log-every", "2", "--no-tensorboard", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "400 en + 400 es = 800 examples" in printed and "validation: en (10), es (10)" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train_languages"] == "en,es" and saved["steps"] == 4 and saved["lr"] == 5e-5
    assert saved["model"] == str(Path(dense_dir).resolve()) and saved["out"] == str(out.resolve())
    assert json.loads((out / "run.json").read_text())["command"] == "finetune"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [2, 4]
    assert (out / "best").is_dir() and (out / "final").is_dir()
    # Defaults are run_xnli.py's.
    assert (saved["max_length"], saved["batch_size"], saved["epochs"], saved["schedule"]) == (
        128,
        8,
        2.0,
        "linear",
    )


def moe_groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups = {"router": {}, "experts": {}, "head": {}, "other": {}}
    for k, v in state.items():
        group = (
            "router"
            if ".mlp.router." in k
            else "experts"
            if ".mlp.experts." in k
            else "head"
            if k.startswith("score")
            else "other"
        )
        groups[group][k] = v
    return groups


@pytest.mark.parametrize(
    ("freeze", "fixed"),
    [
        ("router", {"router"}),
        ("experts", {"experts"}),
        ("moe", {"router", "experts"}),
        ("non-moe", {"other"}),
    ],
)
def test_freeze(xnli, moe_dir, tmp_path, freeze, fixed):
    cfg = tiny_finetune_config(
        xnli, tmp_path / "run", model=moe_dir, steps=3, eval_split="none", freeze=freeze
    )
    result = finetune(cfg)
    from upcycle.models.loading import load_classifier

    start = moe_groups(load_classifier(moe_dir).state_dict())
    end = moe_groups(weights(result.final_dir))
    for group in ("router", "experts", "other"):
        same = all(torch.equal(start[group][k], end[group][k]) for k in start[group])
        assert same == (group in fixed), group
    assert not (Path(cfg.out) / "best").exists()  # no validation, no best/


def test_aux_loss_weights_and_freeze_needs_moe(xnli, dense_dir, moe_dir, tmp_path):
    off = finetune(tiny_finetune_config(xnli, tmp_path / "off", model=moe_dir, steps=2, log_every=1,
                                        aux_loss_weight=0.0, z_loss_weight=0.0, eval_split="none"))  # fmt: skip
    for r in read_metrics(Path(off.run_dir) / "metrics.jsonl", "train"):
        assert r["aux_loss"] == 0.0 and r["loss"] == r["task_loss"] and r["load_balancing_loss"] > 0.5
    strong = finetune(tiny_finetune_config(xnli, tmp_path / "on", model=moe_dir, steps=2, log_every=1,
                                           aux_loss_weight=0.5, eval_split="none"))  # fmt: skip
    moe_cfg = json.loads((strong.final_dir / "config.json").read_text())["moe"]
    assert (
        moe_cfg["aux_loss_weight"] == 0.5 and moe_cfg["z_loss_weight"] == 0.001
    )  # the fixture's z weight kept
    for r in read_metrics(Path(strong.run_dir) / "metrics.jsonl", "train"):
        expected = 0.5 * r["load_balancing_loss"] + 0.001 * r["z_loss"]
        assert r["aux_loss"] == pytest.approx(expected, rel=1e-5) and r["loss"] == pytest.approx(
            r["task_loss"] + expected, rel=1e-5
        )
    with pytest.raises(ConfigError) as err:
        finetune(tiny_finetune_config(xnli, tmp_path / "dense", model=dense_dir, freeze="router"))
    assert err.value.field == "freeze" and "no MoE layers" in err.value.allowed
    assert not (tmp_path / "dense").exists()  # failed before training: nothing written


def test_validation_is_deterministic_under_router_jitter(xnli, dense_dir, tmp_path):
    """Jitter applies in training only: two validations of the same weights agree exactly, while two
    training-mode forwards of the same batch differ; the model is back in training mode afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from upcycle.models.pooling import sequence_logits
    from upcycle.training.finetuning import FinetuneTask

    jittery = save_tiny_moe(tmp_path / "jitter", dense_dir, jitter=0.5)
    task = FinetuneTask(tiny_finetune_config(xnli, tmp_path / "run", model=jittery, train_languages="fr,de"))
    try:
        acc = Accelerator(cpu=True)
        task.check_sources()
        model, tok = task.load(None)
        task.prepare_data(acc, tok, model)
        model.train()
        first, second = task.evaluate(acc, model, 0), task.evaluate(acc, model, 0)
        assert first == second and model.training
        real_tokens = sum(int(s.lengths.sum()) for s in task.eval_sets)
        assert first["routing"]["1"]["tokens"] == real_tokens  # padding is not routed into the counts
        batch = task.eval_sets[0].batch(list(range(8)), task.pad_id)
        with torch.no_grad():
            a, _ = sequence_logits(model, batch["input_ids"], batch["attention_mask"])
            b, _ = sequence_logits(model, batch["input_ids"], batch["attention_mask"])
        assert not torch.equal(a, b)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_epochs_set_the_length_and_the_validation_cadence(xnli, dense_dir, tmp_path):
    cfg = tiny_finetune_config(xnli, tmp_path / "run", model=dense_dir, steps=None, epochs=1.5, batch_size=32,
                               eval_every=None, eval_examples=8, group_by_length=False)  # fmt: skip
    result = finetune(cfg)
    # 400 French pairs / 32 = 12 steps per epoch (the remainder waits for the next epoch): 18 steps.
    assert result.step == 18
    assert [r["step"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl", "eval")] == [0, 12, 18]
    with pytest.raises(ConfigError) as err:
        finetune(dataclasses.replace(cfg, out=str(tmp_path / "w"), warmup=30))
    assert err.value.field == "warmup" and "18 steps" in err.value.allowed


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_native_moe_exports_finetune_and_freeze_their_routers(xnli, tmp_path, fmt):
    """A native Mixtral / Qwen2-MoE export (no upcycle model type) fine-tunes like any classifier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upcycle.models.export import export
    from upcycle.upcycling import UpcycleConfig, convert

    torch.manual_seed(0)
    llama = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=50257, max_position_embeddings=128,
                        bos_token_id=50256, eos_token_id=50256)  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    convert(UpcycleConfig(model=[str(tmp_path / "llama")], method="naive", top_k=2, layers="all",
                          out=str(tmp_path / "moe")), progress=False)  # fmt: skip
    export(str(tmp_path / "moe"), fmt, str(tmp_path / "native"))
    cfg = tiny_finetune_config(xnli, tmp_path / "run", model=str(tmp_path / "native"), tokenizer="gpt2-offline",
                               steps=3, eval_examples=8, freeze="router")  # fmt: skip
    result = finetune(cfg)
    clf = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert type(clf).__name__ == {"mixtral": "MixtralForSequenceClassification",
                                  "qwen2_moe": "Qwen2MoeForSequenceClassification"}[fmt]  # fmt: skip
    start = weights(tmp_path / "native")
    end = weights(result.final_dir)
    gates = [k for k in end if k.endswith(".gate.weight") and k in start]  # routers (not shared_expert_gate)
    experts = [k for k in end if ".experts." in k and k in start]
    assert gates and experts
    assert all(torch.equal(start[k], end[k]) for k in gates)
    assert not all(torch.equal(start[k], end[k]) for k in experts)
    assert clf.config.id2label == XNLI_NAMES
