"""``upcycle analyze training`` on runs produced in the test (``upcycle.training.pretrain`` on tiny models)
and on a hand-written fine-tuning metrics.jsonl in the format of CONTRACTS.md."""

from __future__ import annotations

import json

import pytest

from tests.data.corpus import write_corpus
from tests.training.conftest import tiny_config
from upcycle.analysis.training import read_run
from upcycle.cli import main
from upcycle.training import pretrain
from upcycle.training.reporting import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory, moe_dir, dense_dir):
    """An MoE run and its equal dense baseline: 8 steps, held-out loss every 4."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus", n_docs=60)
    out = {}
    for name, model in (("moe", moe_dir), ("dense", dense_dir)):
        cfg = tiny_config(
            corpus, root / name, model=model, steps=8, eval_every=4, save_every=0, eval_batches=1
        )
        pretrain(cfg)
        out[name] = str(root / name)
    return out


def write_finetune_run(folder, E=4):
    """A fine-tuning run as CONTRACTS.md describes it: task_loss, per-language validation accuracy, and
    expert 3 of layer 1 collapsing from step 6 (share 0.01 < 0.1 × 1/4) until the end."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"id": "ft", "created": "2025-01-01", "command": "finetune"}))
    lines = []
    for step in range(1, 11):
        collapsed = step >= 6
        frac = [0.3, 0.3, 0.39, 0.01] if collapsed else [0.25] * E
        lines.append(
            {"kind": "train", "step": step, "loss": 1.2 - 0.05 * step, "task_loss": 1.1 - 0.05 * step, "aux_loss": 0.1,
             "accuracy": 0.4 + 0.02 * step, "lr": 1e-4,
             "routing": {"1": {"tokens": 100, "tokens_per_expert": [int(100 * f) for f in frac], "fraction": frac,
                               "balance": 0.9, "max_violation": 0.1, "dropped": 0, "dropped_fraction": 0.0}}}
        )  # fmt: skip
        if step % 5 == 0:
            langs = {
                "fr": {"accuracy": 0.5 + step / 100, "loss": 1.0, "n": 50},
                "es": {"accuracy": 0.4 + step / 100, "loss": 1.1, "n": 50},
            }
            mean = sum(v["accuracy"] for v in langs.values()) / 2
            lines.append(
                {
                    "kind": "eval",
                    "step": step,
                    "split": "validation",
                    "loss": 1.05 - step / 100,
                    "accuracy": mean,
                    "languages": langs,
                }
            )
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st'
    )
    return str(folder)


def test_pretrain_and_finetune_runs(runs, tmp_path):
    ft = write_finetune_run(tmp_path / "ft")
    out = tmp_path / "analysis"
    rc = main(
        [
            "analyze",
            "training",
            runs["moe"],
            runs["dense"],
            ft,
            "--names",
            "moe",
            "dense",
            "ft",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "training.json").read_text())
    assert doc["format"] == "upcycle-training/1" and list(doc["runs"]) == ["moe", "dense", "ft"]

    for name in ("moe", "dense"):
        train = read_metrics(f"{runs[name]}/metrics.jsonl", "train")
        evals = read_metrics(f"{runs[name]}/metrics.jsonl", "eval")
        s = doc["runs"][name]
        key = "lm_loss" if name == "moe" else "loss"  # the MoE's curve leaves its auxiliary loss out
        assert s["loss_key"] == key and s["final_train_loss"] == train[-1][key] and s["steps"] == 8
        assert s["final_eval_loss"] == evals[-1]["loss"]
        assert s["best_eval_loss"] == min(r["loss"] for r in evals)
    assert doc["runs"]["moe"]["moe_layers"] == [0, 1] and doc["runs"]["dense"]["moe_layers"] == []

    ft_summary = doc["runs"]["ft"]
    assert ft_summary["command"] == "finetune" and ft_summary["loss_key"] == "task_loss"
    assert ft_summary["collapses"] == [
        {"layer": "1", "expert": 3, "from_step": 6, "to_step": 10, "records": 5, "min_share": 0.01}
    ]
    assert ft_summary["final_accuracy"] == pytest.approx(0.55) and ft_summary[
        "best_accuracy"
    ] == pytest.approx(0.55)
    assert ft_summary["steps"] == 10  # the line cut short at the end is skipped

    files = {p.name for p in out.iterdir()}
    assert {
        "loss.png",
        "loss.svg",
        "experts-moe.png",
        "experts-ft.svg",
        "accuracy.png",
        "training.md",
    } <= files
    assert "experts-dense.png" not in files
    md = (out / "training.md").read_text()
    assert "| ft | finetune | 10 |" in md and "L1/E3" in md and "– (dense)" in md


def test_read_run_curves_match_metrics(runs):
    run = read_run(runs["moe"], "moe")
    train = read_metrics(f"{runs['moe']}/metrics.jsonl", "train")
    assert run.train_steps == [r["step"] for r in train]
    steps, fractions = run.routing["1"]
    assert steps == run.train_steps and fractions == [r["routing"]["1"]["fraction"] for r in train]
    assert run.eval_steps == [0, 4, 8]


def test_collapse_needs_enough_consecutive_records(tmp_path):
    ft = write_finetune_run(tmp_path / "ft")
    out = tmp_path / "a"
    assert main(["analyze", "training", ft, "--collapse-records", "6", "--out", str(out)]) == 0
    assert json.loads((out / "training.json").read_text())["runs"]["ft"]["collapses"] == []


def test_bad_runs(runs, tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    out = tmp_path / "o"
    for args, needle in (
        ([str(tmp_path / "empty-run")], "has no metrics.jsonl"),
        ([runs["moe"], str(tmp_path / "missing")], "no such run folder"),
        ([runs["moe"], "--max-tokens", "5"], "applies to 'upcycle analyze routing' only"),
        ([runs["moe"], "--collapse-share", "1.5"], "must be in (0, 1)"),
    ):
        assert main(["analyze", "training", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
