"""Bad input to `upcycle finetune` (issue 12): a one-line error naming the flag and what is allowed,
exit status 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import ViTConfig, ViTModel

from tests.training.conftest import tiny_config
from upcycle.cli import main as cli_main
from upcycle.training import pretrain

LANGS = "en, ar, bg, de, el, es, fr, hi, ru, sw, th, tr, ur, vi, zh"


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = cli_main(["finetune", *args])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def base(xnli, dense_dir, tmp_path):
    return ["--model", dense_dir, "--data", xnli, "--steps", "2", "--batch-size", "8", "--eval-examples", "8",
            "--no-tensorboard", "--progress", "lines", "--out", str(tmp_path / "run")]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data", "facebook/xnli", "--train-languages", "fr,xx"],
         f"--train-languages='xx' is invalid: unknown language; XNLI's are {LANGS} (or 'all')"),
        (["--train-languages", "fr,ru"], "--train-languages='ru' is invalid: {xnli} has no folder for it; it has en, de, es, fr"),
        (["--train-languages", "fr,xx"],
         f"--train-languages='xx' is invalid: unknown language; XNLI's are {LANGS}; {{xnli}} has no folder for it; it has en, de, es, fr"),
        (["--text-fields", "sentence1,sentence2"],
         "--text-fields='sentence1' is invalid: not a column of {xnli} (fr); columns are premise, hypothesis, label"),
        (["--label-field", "gold"], "--label-field='gold' is invalid: not a column of {xnli} (fr); columns are premise, hypothesis, label"),
        (["--max-length", "512"], "--max-length=512 is invalid: must be ≤ the model's context length (128)"),
        (["--freeze", "router"], "--freeze='router' is invalid: the model has no MoE layers; only 'none' applies to a dense model"),
        (["--label-names", "yes,no"], "--label-names='yes,no' is invalid: {xnli} (fr) has label id 2, beyond these"),
    ],
    ids=["unknown-language", "missing-language", "unknown-language-local", "text-fields", "label-field", "max-length", "freeze-dense", "label-names"],
)  # fmt: skip
def test_bad_data_options(base, xnli, tmp_path, capsys, extra, expected):
    rc, err = run_cli([*base, "--train-languages", "fr", *extra], capsys)
    assert rc == 2 and err == ["error: " + expected.format(xnli=xnli)]
    assert not (tmp_path / "run").exists()


def test_models_that_cannot_classify(base, tmp_path, capsys):
    vit = tmp_path / "vit"
    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(vit)
    rc, err = run_cli([*base, "--model", str(vit)], capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(
        f"error: --model='{vit}' is invalid: '{vit}' (vit) cannot be loaded for sequence classification"
    )
    (tmp_path / "empty").mkdir()
    rc, err = run_cli([*base, "--model", str(tmp_path / "empty")], capsys)
    assert rc == 2 and err == [
        f"error: --model='{tmp_path / 'empty'}' is invalid: the folder has no config.json (not a Hugging Face model folder)"
    ]
    assert not (tmp_path / "run").exists()


def test_resume_of_missing_or_incompatible_runs(base, corpus, dense_dir, tmp_path, capsys):
    nope = tmp_path / "nope"
    rc, err = run_cli(["--out", str(nope), "--resume"], capsys)
    assert rc == 2 and err == [
        f"error: --out='{nope}' is invalid: no run to resume: the folder does not exist; start one with --model"
    ]
    assert not nope.exists()

    assert run_cli([*base, "--train-languages", "fr"], capsys)[0] == 0
    run = tmp_path / "run"
    before = listing(run)
    rc, err = run_cli(["--out", str(run), "--resume", "--max-length", "64"], capsys)
    assert rc == 2 and err == [
        "error: --max-length=64 is invalid: cannot change when resuming; the run in --out used 128"
    ]
    rc, err = run_cli(["--out", str(run), "--resume", "--train-languages", "es"], capsys)
    assert rc == 2 and err == [
        "error: --train-languages='es' is invalid: cannot change when resuming; the run in --out used 'fr'"
    ]
    rc, err = run_cli([*base, "--train-languages", "fr"], capsys)
    assert rc == 2 and err == [
        f"error: --out='{run}' is invalid: holds a previous run; pass --resume to continue it or --overwrite"
    ]
    assert listing(run) == before  # nothing half-written

    pre = pretrain(tiny_config(corpus, tmp_path / "pre", model=dense_dir, steps=2, eval_data="none"))
    rc, err = run_cli(["--out", str(pre.run_dir), "--resume"], capsys)
    assert rc == 2 and err == [
        f"error: --out='{pre.run_dir}' is invalid: holds an 'upcycle pretrain' run; resume it with upcycle pretrain --resume"
    ]
    assert json.loads((pre.run_dir / "run.json").read_text())["command"] == "pretrain"
