"""`upcycle evaluate` through the command line: the table equals a hand computation, models are named,
--task lm, and every bad input is one line naming the flag with nothing written."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, CodeGenForCausalLM

from upcycle.cli import main
from upcycle.data.synthetic import write_multilingual_corpus
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.data.xnli import XNLI_LABELS, load_split
from upcycle.evaluation import evaluate_lm
from upcycle.evaluation.results import model_names
from upcycle.models.loading import load_classifier


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def hand_correct(model_dir: str, xnli_dir, lang: str, n: int) -> list[bool]:
    """Premise ids + EOS + hypothesis ids, one example at a time, unpadded; the head's scores at the last
    token; argmax compared with the label (the fine-tuned model keeps XNLI's label order)."""
    tok = gpt2_tokenizer_offline()
    model = load_classifier(model_dir).eval()
    ds = load_split(str(xnli_dir), lang, "test")
    out = []
    for premise, hypothesis, label in list(zip(ds["premise"], ds["hypothesis"], ds["label"]))[:n]:
        ids = tok(premise)["input_ids"] + [tok.eos_token_id] + tok(hypothesis)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
            out.append(int(model.score(hidden[0, -1]).argmax()) == label)
    return out


def test_table_equals_a_hand_computation(classifiers, xnli_dir, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense"], classifiers["moe"], "--data", str(xnli_dir),
            "--languages", "en,th,zh", "--limit", "7", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["dense/best", "moe/best"]  # both folders are called best: parents added
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert rows[0] == ["model", "en", "th", "zh", "average"]
    md = (out / "results.md").read_text()
    for row, (name, key) in zip(rows[1:], [("dense/best", "dense"), ("moe/best", "moe")]):
        r = results[name]
        assert r["path"] == classifiers[key] and list(r["accuracy"]) == ["en", "th", "zh"]
        accuracies = []
        for lang in ("en", "th", "zh"):
            correct = hand_correct(classifiers[key], xnli_dir, lang, 7)
            assert r["n"][lang] == 7 and r["accuracy"][lang] == sum(correct) / 7
            assert r["ci95"][lang] == pytest.approx(wilson(sum(correct), 7), abs=1e-9)
            accuracies.append(sum(correct) / 7)
        assert r["average"] == pytest.approx(sum(accuracies) / 3)
        assert row == [name, *(f"{100 * a:.2f}" for a in accuracies), f"{100 * sum(accuracies) / 3:.2f}"]
        assert f"| {name} | {row[1]}" in md
    paired = results["moe/best"]["paired"]
    assert paired["baseline"] == "dense/best" and set(paired["languages"]) == {"en", "th", "zh"}
    assert "paired" not in results["dense/best"]
    printed = capsys.readouterr().out
    assert "| model | en | th | zh | average |" in printed


def test_xnli_columns_follow_the_report_order_whatever_the_languages_order(classifiers, xnli_dir, tmp_path):
    """Issue 12: columns are the report's languages in its order (en ar … zh), as in its Tables 2 and 3."""
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense"], "--data", str(xnli_dir), "--languages", "zh,fr,en,ar",
            "--limit", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["best"]["accuracy"]) == list(results["best"]["n"]) == ["en", "ar", "fr", "zh"]
    assert (out / "results.csv").read_text().splitlines()[0] == "model,en,ar,fr,zh,average"
    assert "| model | en | ar | fr | zh | average |" in (out / "results.md").read_text()


def test_yaml_config_errors_name_the_file(classifiers, tmp_path, capsys):
    """An unknown or mistyped key of --config is reported as the file's key (issue 11), not as a flag."""
    config = tmp_path / "eval.yaml"
    args = ["evaluate", classifiers["dense"], "--config", str(config), "--out", str(tmp_path / "r")]
    for text, message in (
        ("bach_size: 8\n", "bach_size=8 is invalid: unknown field (did you mean batch_size?)"),
        ("limit: some\n", "limit='some' is invalid: expected an integer"),
    ):
        config.write_text(text)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {config}: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_same_model_twice_is_named_apart_and_never_significant(classifiers, xnli_dir, tmp_path):
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense"], classifiers["dense"], "--data", str(xnli_dir),
            "--languages", "fr", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["best", "best#2"]
    test = results["best#2"]["paired"]["languages"]["fr"]
    assert test["p_value"] == 1.0 and test["only_model"] == test["only_baseline"] == 0
    assert "*" not in (out / "results.md").read_text().split("\n\n")[1]


def test_names_flag_and_model_names():
    assert model_names(["runs/a/best", "runs/b/best", "gpt2"]) == ["a/best", "b/best", "gpt2"]
    assert model_names(["x/final", "y/x/final"]) == ["x/final", "y/x/final"]
    assert model_names(["m", "m"]) == ["m", "m#2"]
    assert model_names(["a", "b"], ["GPT2", "MoE"]) == ["GPT2", "MoE"]


def test_names_and_baseline_flags(classifiers, xnli_dir, tmp_path):
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense"], classifiers["moe"], "--names", "GPT2,MoE", "--baseline", "MoE",
            "--data", str(xnli_dir), "--languages", "en", "--limit", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["GPT2", "MoE"] and results["GPT2"]["paired"]["baseline"] == "MoE"


def test_lm_task_equals_evaluate_lm(classifiers, tmp_path):
    corpus = write_multilingual_corpus(tmp_path / "corpus", languages=("en", "fr"), n_train=4, n_eval=40)
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense_lm"], classifiers["moe_lm"], "--task", "lm",
            "--data", str(corpus["eval"]), "--seq-len", "32", "--batch-size", "4", "--limit", "8", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["dense", "moe"]
    tok = gpt2_tokenizer_offline()
    docs = [json.loads(line)["text"] for line in corpus["eval"].read_text(encoding="utf-8").splitlines()]
    ids = [t for d in docs for t in [*tok(d)["input_ids"], tok.eos_token_id]]
    blocks = torch.tensor(ids[: 8 * 32]).view(2, 4, 32)  # the first 8 blocks of 32 tokens, in order
    direct = evaluate_lm(AutoModelForCausalLM.from_pretrained(classifiers["dense_lm"]), list(blocks))
    r = results["dense"]
    assert r["tokens"] == direct.tokens == 8 * 31
    assert r["loss"] == pytest.approx(direct.loss, rel=1e-6) and r["accuracy"] == pytest.approx(
        direct.accuracy
    )
    assert r["perplexity"] == pytest.approx(math.exp(direct.loss), rel=1e-6)
    assert (out / "results.csv").read_text().startswith("model,loss,perplexity,accuracy,tokens\ndense,")


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def not_a_classifier(tmp_path_factory):
    """A causal LM whose architecture has no sequence-classification class (CodeGen)."""
    path = tmp_path_factory.mktemp("codegen") / "codegen"
    cfg = CodeGenConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=8, vocab_size=50257, n_positions=64)
    CodeGenForCausalLM(cfg).save_pretrained(path)
    return str(path)


def bad_runs(classifiers, xnli_dir, not_a_classifier, tmp_path):
    only_en = tmp_path / "only-en"
    from upcycle.data.synthetic import write_synthetic_xnli

    write_synthetic_xnli(only_en, languages=("en", "fr"), sizes={"test": 3})
    existing = tmp_path / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    base = [classifiers["dense"], "--data", str(xnli_dir)]
    return {
        "language": ([*base, "--languages", "en,xx"], "--languages='xx' is invalid: unknown language; XNLI's "
                     "are en, ar, bg, de, el, es, fr, hi, ru, sw, th, tr, ur, vi, zh"),
        "missing language": ([classifiers["dense"], "--data", str(only_en), "--languages", "en,sw"],
                             "has no folder for language 'sw'; it has en, fr"),
        "fields": ([*base, "--text-fields", "sentence1,sentence2"],
                   "--text-fields='sentence1' is invalid: not a column of"),
        "label field": ([*base, "--label-field", "gold"], "columns are premise, hypothesis, label"),
        "not a classifier": ([not_a_classifier, "--data", str(xnli_dir), "--languages", "en"],
                             "(codegen) cannot be loaded for sequence classification"),
        "no model folder": (["./no/such/model", "--data", str(xnli_dir)], "no such model folder"),
        "task": ([*base, "--task", "nli"], "--task='nli' is invalid: allowed values are xnli, classification, lm"),
        "lm without data": ([classifiers["dense_lm"], "--task", "lm"], "--data=None is invalid: --task lm needs"),
        "names": ([*base, "--names", "a,b"], "--names=['a', 'b'] is invalid: give one name per model"),
        "baseline": ([*base, "--baseline", "moe"], "--baseline='moe' is invalid: not a model name"),
        "exists": ([*base, "--languages", "en"], f"--out='{existing}' is invalid: already exists; pass --overwrite"),
        "device": ([*base, "--device", "gpu"], "--device='gpu' is invalid: allowed values are auto, cpu, cuda"),
    }  # fmt: skip


CASES = ["language", "missing language", "fields", "label field", "not a classifier", "no model folder",
         "task", "lm without data", "names", "baseline", "exists", "device"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_flag_and_nothing_is_written(
    case, classifiers, xnli_dir, not_a_classifier, tmp_path, capsys
):
    args, message = bad_runs(classifiers, xnli_dir, not_a_classifier, tmp_path)[case]
    out = tmp_path / ("existing" if case == "exists" else "results")
    assert main(["evaluate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]  # no temporary leftovers


def test_a_failure_after_the_first_model_writes_nothing(classifiers, xnli_dir, not_a_classifier, tmp_path):
    out = tmp_path / "results"
    args = ["evaluate", classifiers["dense"], not_a_classifier, "--data", str(xnli_dir), "--languages", "en",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    assert not out.exists() and not list(tmp_path.iterdir())


def test_overwrite_replaces_a_results_folder(classifiers, xnli_dir, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["evaluate", classifiers["dense"], "--data", str(xnli_dir), "--languages", "en", "--limit", "3",
            "--out", str(out), "--overwrite"]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_untrained_head_is_warned_about(classifiers, xnli_dir, tmp_path, capsys):
    args = ["evaluate", classifiers["dense_lm"], "--data", str(xnli_dir), "--languages", "en", "--limit", "3",
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 0
    assert "its classification head is untrained" in capsys.readouterr().err


def test_label_names_stay_those_of_the_fine_tuned_model(classifiers):
    model = load_classifier(classifiers["moe"])
    assert [model.config.id2label[i] for i in range(3)] == list(XNLI_LABELS)


def test_classification_task_on_a_single_text_dataset_without_configurations(tiny_lms, tmp_path):
    """Any labelled set: one text column, string labels, no configurations (--languages none)."""
    from upcycle.data.synthetic import write_jsonl

    data = tmp_path / "reviews"
    texts = ["great film", "awful plot", "a fine day", "bad acting <|endoftext|>", "good", "terrible"]
    labels = ["positive", "negative", "positive", "negative", "positive", "negative"]
    write_jsonl(data / "test.jsonl", [{"sentence": t, "label": y} for t, y in zip(texts, labels)])
    model_dir = tmp_path / "clf"
    load_classifier(tiny_lms["dense_lm"], label_names=["negative", "positive"]).save_pretrained(model_dir)
    out = tmp_path / "results"
    args = ["evaluate", str(model_dir), "--task", "classification", "--data", str(data), "--languages", "none",
            "--text-fields", "sentence", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())["clf"]
    tok = gpt2_tokenizer_offline()
    model = load_classifier(str(model_dir)).eval()
    hits = 0
    for text, label in zip(texts, labels):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        hits += ["negative", "positive"][int(model.score(hidden[0, -1]).argmax())] == label
    assert r["n"] == {"all": 6} and r["accuracy"]["all"] == hits / 6
