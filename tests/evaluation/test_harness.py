"""The lm-evaluation-harness bridge end to end, offline: lm-eval's xnli prompts on a local XNLI-layout
folder, scored by our (MoE) model objects, equal a hand computation of the same log-likelihoods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from upcycle.cli import main
from upcycle.config import ConfigError
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.data.xnli import load_split
from upcycle.evaluation.config import EvaluateConfig
from upcycle.evaluation.harness import lm_eval_models, lm_eval_xnli_dir, write_local_xnli_tasks
from upcycle.evaluation.tasks import load_causal_lm

pytest.importorskip("lm_eval")

#: lm-eval's xnli prompt (lm_eval/tasks/xnli/utils.py), written out: "premise, WORD? LABEL, hypothesis".
PROMPTS = {"en": ("right", ("Yes", "Also", "No")), "fr": ("correct", ("Oui", "Aussi", "Non"))}


def hand_correct(model_dir: str, xnli_dir, lang: str, n: int) -> list[bool]:
    """lm-eval's multiple-choice accuracy by hand: each choice's summed token log-likelihood after the
    EOS prefix (an empty context), target delimiter ' ', the highest wins."""
    tok = gpt2_tokenizer_offline()
    model = load_causal_lm(model_dir).eval()
    word, labels = PROMPTS[lang]
    ds = load_split(str(xnli_dir), lang, "validation")
    out = []
    for premise, hypothesis, label in list(zip(ds["premise"], ds["hypothesis"], ds["label"]))[:n]:
        scores = []
        for answer in labels:
            cont = tok(" " + f"{premise}, {word}? {answer}, {hypothesis}")["input_ids"]
            ids = torch.tensor([[tok.eos_token_id, *cont]])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        out.append(max(range(3), key=scores.__getitem__) == label)
    return out


def test_generated_tasks_keep_lm_evals_prompts(xnli_dir, tmp_path):
    names = write_local_xnli_tasks(str(xnli_dir), ["en", "zh"], tmp_path)
    assert names == ["xnli_en", "xnli_zh"]
    for lang in ("en", "zh"):
        ours = yaml.safe_load((tmp_path / f"xnli_{lang}.yaml").read_text(encoding="utf-8"))
        theirs = yaml.safe_load((lm_eval_xnli_dir() / f"xnli_{lang}.yaml").read_text(encoding="utf-8"))
        # Every key of lm-eval's definition unchanged but the dataset's...
        assert {k: ours[k] for k in theirs if k != "dataset_name"} == {
            k: v for k, v in theirs.items() if k != "dataset_name"
        }
        files = ours["dataset_kwargs"]["data_files"]  # ...plus the local files instead of the hub
        assert ours["dataset_path"] == "parquet" and set(files) == {"train", "validation"}
        assert all(Path(f).parent == Path(xnli_dir) / lang for fs in files.values() for f in fs)


@pytest.mark.parametrize("kind", ["dense_lm", "moe_lm"])
def test_zero_shot_xnli_equals_a_hand_computation(tiny_lms, xnli_dir, tmp_path, kind):
    cfg = EvaluateConfig(
        models=[tiny_lms[kind]], task="lm-eval:xnli", data=str(xnli_dir), languages="fr,en", limit=6,
        batch_size=4, out=str(tmp_path / "r"), progress=False,
    )  # fmt: skip
    results, correct = lm_eval_models(cfg, ["m"])
    assert list(results["m"]["accuracy"]) == ["en", "fr"]  # the report's order, not the order given
    assert results["m"]["metric"] == "acc"
    for lang in ("en", "fr"):
        expected = hand_correct(tiny_lms[kind], xnli_dir, lang, 6)
        assert correct["m"][lang].tolist() == expected
        assert results["m"]["accuracy"][lang] == sum(expected) / 6 and results["m"]["n"][lang] == 6
        assert results["m"]["lm_eval"][lang]["value"] == pytest.approx(sum(expected) / 6)  # lm-eval's own


def write_user_tasks(root: Path, xnli_dir) -> Path:
    """What a user writes for lm-eval's --include_path: a group of two tasks with the xnli prompt reading
    the local folder's Parquet files. (Not ``dataset_path: FOLDER, dataset_name: LANG``: datasets caches
    a folder loaded through its README under the folder's name alone and would serve another run's
    data generated into a folder of the same name, as datasets issue #2956 describes.)"""
    root.mkdir(parents=True, exist_ok=True)
    for lang, (word, (yes, also, no)) in PROMPTS.items():
        choice = (
            f'{{{{[premise+", {word}? {yes}, "+hypothesis,premise+", {word}? {also}, "+hypothesis,'
            f'premise+", {word}? {no}, "+hypothesis]}}}}'
        )
        task = {
            "task": f"tiny_xnli_{lang}", "dataset_path": "parquet",
            "dataset_kwargs": {"data_files": {"validation": str(Path(xnli_dir) / lang / "validation-*.parquet")}},
            "output_type": "multiple_choice", "validation_split": "validation", "doc_to_text": "",
            "doc_to_target": "label", "doc_to_choice": choice, "metric_list": [{"metric": "acc"}],
        }  # fmt: skip
        (root / f"tiny_xnli_{lang}.yaml").write_text(
            yaml.safe_dump(task, allow_unicode=True), encoding="utf-8"
        )
    group = {"group": "tiny_xnli", "task": ["tiny_xnli_en", "tiny_xnli_fr"]}
    (root / "_tiny_xnli.yaml").write_text(yaml.safe_dump(group), encoding="utf-8")
    return root


def test_cli_with_a_user_task_folder_gives_the_same_table(tiny_lms, xnli_dir, tmp_path, capsys):
    include = write_user_tasks(tmp_path / "tasks", xnli_dir)
    out = tmp_path / "results"
    args = ["evaluate", tiny_lms["dense_lm"], tiny_lms["moe_lm"], "--names", "GPT2,MoE",
            "--task", "lm-eval:tiny_xnli", "--lm-eval-include", str(include), "--limit", "6",
            "--batch-size", "8", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["GPT2", "MoE"]
    for name, key in (("GPT2", "dense_lm"), ("MoE", "moe_lm")):
        r = results[name]
        assert list(r["accuracy"]) == ["en", "fr"] and r["task"] == "lm-eval:tiny_xnli"
        for lang in ("en", "fr"):
            assert r["accuracy"][lang] == sum(hand_correct(tiny_lms[key], xnli_dir, lang, 6)) / 6
        assert len(r["ci95"]["en"]) == 2 and r["average"] == pytest.approx(sum(r["accuracy"].values()) / 2)
    assert set(results["MoE"]["paired"]["languages"]) == {"en", "fr"}
    assert (out / "results.md").read_text().startswith("# lm-evaluation-harness tiny_xnli, zero-shot")
    assert (out / "results.csv").read_text().splitlines()[0] == "model,en,fr,average"


@pytest.mark.slow  # indexing lm-eval's thousands of built-in task files takes ~15 s on 2 busy cores
def test_unknown_lm_eval_task_suggests_close_names(tiny_lms, xnli_dir, tmp_path, capsys):
    include = write_user_tasks(tmp_path / "tasks", xnli_dir)
    args = ["evaluate", tiny_lms["dense_lm"], "--task", "lm-eval:tiny_xnl", "--lm-eval-include", str(include),
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "--task='lm-eval:tiny_xnl' is invalid: lm-eval has no task or group 'tiny_xnl'; did you mean" in err
    )
    assert "tiny_xnli" in err and not (tmp_path / "r").exists()


def test_bad_lm_eval_input(tiny_lms, xnli_dir, tmp_path, capsys):
    base = ["evaluate", tiny_lms["dense_lm"], "--out", str(tmp_path / "r")]
    assert main([*base, "--task", "lm-eval:hellaswag", "--data", str(xnli_dir)]) == 2
    assert "only a local XNLI-layout folder for lm-eval:xnli" in capsys.readouterr().err
    assert main([*base, "--task", "lm-eval:xnli", "--data", str(xnli_dir), "--languages", "en,xx"]) == 2
    assert "--languages='xx' is invalid: unknown language" in capsys.readouterr().err
    assert main([*base, "--task", "lm-eval:"]) == 2
    assert "name an lm-eval task after the colon" in capsys.readouterr().err
    # lm-eval's tasks name their own split: a --split is refused rather than silently ignored.
    assert main([*base, "--task", "lm-eval:xnli", "--data", str(xnli_dir), "--split", "test"]) == 2
    assert "--split='test' is invalid: lm-eval tasks score the split their definition names" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


def test_the_hub_id_of_xnli_as_data_is_lm_evals_own_xnli(tmp_path, monkeypatch):
    """`--task lm-eval:xnli --data facebook/xnli` (the xnli task's default data) runs lm-eval's built-in
    xnli tasks, which read that hub repository themselves; another hub id is still refused."""
    import lm_eval.tasks

    from upcycle.evaluation.harness import task_plan

    built = []

    class RecordingTaskManager:  # lm-eval's real index of built-in tasks takes ~15 s to build
        def __init__(self, include_path=None, include_defaults=True):
            built.append((include_path, include_defaults))

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", RecordingTaskManager)
    cfg = EvaluateConfig(models=["m"], task="lm-eval:xnli", data="facebook/xnli", languages="fr,en", out="o")
    manager, tasks = task_plan(cfg, tmp_path)
    assert tasks == ["xnli_fr", "xnli_en"] and built == [(None, True)] and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError) as err:
        task_plan(EvaluateConfig(models=["m"], task="lm-eval:xnli", data="other/xnli", out="o"), tmp_path)
    assert err.value.field == "data"
