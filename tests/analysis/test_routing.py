"""``upcycle analyze routing`` through the user's path: saved checkpoints, XNLI-layout folders and text
domains on disk, the command line, routing.json, routing.md and the figures; and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from upcycle.analysis.config import RoutingAnalysisConfig
from upcycle.cli import main
from upcycle.config import ConfigError
from upcycle.data.synthetic import write_jsonl
from upcycle.data.tokenizers import load_tokenizer
from upcycle.data.xnli import XNLI_LABELS, PairFormat, encode_examples, load_split


def pair_tokens(xnli_dir, lang, label=None):
    """Tokens of every test example of ``lang`` as the fine-tuning input has them (optionally one label)."""
    tok = load_tokenizer("gpt2")
    ds = load_split(xnli_dir, lang, "test")
    rows = [r for r in ds if label is None or r["label"] == label]
    ids = encode_examples(
        tok, [[r["premise"] for r in rows], [r["hypothesis"] for r in rows]], PairFormat.for_tokenizer(tok)
    )
    return sum(len(r) for r in ids)


def check_counts(record, groups_tokens):
    K = record["top_k"]
    assert record["tokens"] == groups_tokens
    for entry in record["layers"].values():
        assert [sum(row) for row in entry["top1"]] == groups_tokens
        assert [sum(row) for row in entry["topk"]] == [K * n for n in groups_tokens]
        for choice in ("topk", "top1"):
            m = entry["metrics"][choice]
            assert 0 <= m["balance"] <= 1 and m["max_over_mean"] >= 1 and 0 <= m["specialisation"] <= 1


def test_languages_two_models_side_by_side(moe_dir, seq_moe_dir, xnli_dir, tmp_path):
    out = tmp_path / "routing"
    rc = main(
        ["analyze", "routing", moe_dir, seq_moe_dir, "--data", xnli_dir, "--languages", "en,fr,th",
         "--max-tokens", "600", "--batch-size", "8", "--names", "token-top2", "seq-top1", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((out / "routing.json").read_text())
    assert result["format"] == "upcycle-routing/1"
    assert result["groups"] == ["en", "fr", "th"] and result["group_by"] == "language"
    assert list(result["models"]) == ["token-top2", "seq-top1"]
    # en and fr hold fewer than 600 tokens in 30 examples, Thai more: cut to exactly 600.
    want = [min(600, pair_tokens(xnli_dir, lang)) for lang in ("en", "fr", "th")]
    assert want[2] == 600 and want[0] < 600
    token, seq = result["models"]["token-top2"], result["models"]["seq-top1"]
    assert (token["top_k"], token["routing_unit"], seq["routing_unit"], seq["global_routing"]) == (
        2,
        "token",
        "sequence",
        True,
    )
    assert token["head"] == "causal_lm" and sorted(token["layers"], key=int) == ["0", "1"]
    check_counts(token, want)
    check_counts(seq, want)
    # Global routing: the follower layer counted the leader's choices.
    assert seq["layers"]["0"]["topk"] == seq["layers"]["1"]["topk"]

    md = (out / "routing.md").read_text()
    assert "| token-top2 | 0 |" in md and "| seq-top1 | 1 |" in md
    files = {p.name for p in out.iterdir()}
    for stem in (
        "expert_shares-token-top2",
        "expert_shares-seq-top1",
        "heatmap-token-top2",
        "group_fractions",
    ):
        assert {f"{stem}.png", f"{stem}.svg"} <= files


def test_labels_on_a_finetuned_classifier(classifier_dir, xnli_dir, tmp_path):
    out = tmp_path / "labels"
    rc = main(
        ["analyze", "routing", classifier_dir, "--data", xnli_dir, "--languages", "en,fr", "--group-by", "label",
         "--max-tokens", "100000", "--choice", "top1", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((out / "routing.json").read_text())
    assert result["groups"] == list(XNLI_LABELS)
    [record] = result["models"].values()
    assert record["head"] == "sequence_classification"
    want = [pair_tokens(xnli_dir, "en", y) + pair_tokens(xnli_dir, "fr", y) for y in range(3)]
    check_counts(record, want)


def test_domains_cut_into_pieces(moe_dir, domain_files, tmp_path):
    out = tmp_path / "domains"
    args = ["analyze", "routing", moe_dir, "--max-length", "16", "--max-tokens", "150", "--out", str(out)]
    for name, path in domain_files.items():
        args += ["--domain", f"{name}={path}"]
    assert main(args) == 0
    result = json.loads((out / "routing.json").read_text())
    assert result["group_by"] == "domain" and result["groups"] == ["prose", "code", "math"]
    assert result["data"]["domains"]["code"]["source"] == domain_files["code"]
    [record] = result["models"].values()
    tok = load_tokenizer("gpt2")
    totals = [
        sum(
            len(t)
            for t in tok([json.loads(line)["text"] for line in Path(p).read_text().splitlines()])["input_ids"]
        )
        for p in domain_files.values()
    ]
    check_counts(record, [min(150, n) for n in totals])
    assert record["max_length"] == 16


def run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "case,needle",
    [
        ("dense", "has no MoE layers"),
        ("group", "invalid choice"),
        ("missing-domain", "no such file or folder"),
        ("empty-domain", "no non-empty documents"),
        ("empty-label", "group 'neutral' has no tokens"),
        ("language", "has no folder for language 'xx'"),
        ("label-field", "not a column"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case, needle, moe_dir, dense_dir, xnli_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    base = ["analyze", "routing", moe_dir, "--out", str(out)]
    if case == "dense":
        args = [
            "analyze",
            "routing",
            moe_dir,
            dense_dir,
            "--data",
            xnli_dir,
            "--languages",
            "en",
            "--out",
            str(out),
        ]
    elif case == "group":
        args = [*base, "--group-by", "topic"]
    elif case == "missing-domain":
        args = [*base, "--domain", f"web={tmp_path / 'nope.jsonl'}"]
    elif case == "empty-domain":
        empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}])
        args = [*base, "--domain", f"empty={empty}"]
    elif case == "empty-label":
        # Labels 0 and 2 only: three XNLI classes by id, but nothing is 'neutral'.
        for lang in ("en",):
            write_jsonl(
                tmp_path / "nli" / lang / "test.jsonl",
                [{"premise": "a b", "hypothesis": "c", "label": y} for y in (0, 2, 0)],
            )
        args = [*base, "--data", str(tmp_path / "nli"), "--languages", "en", "--group-by", "label"]
    elif case == "language":
        args = [*base, "--data", xnli_dir, "--languages", "en,xx"]
    else:
        write_jsonl(tmp_path / "nli" / "en" / "test.jsonl", [{"premise": "a", "hyp": "b", "label": 0}])
        args = [*base, "--data", str(tmp_path / "nli"), "--languages", "en"]
    rc, err = run_cli(args, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_dense_model_error_points_to_fertility(dense_dir, tmp_path, capsys):
    rc, err = run_cli(["analyze", "routing", dense_dir, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "upcycle fertility" in err


@pytest.fixture(scope="module")
def llama_moe_dir(tmp_path_factory):
    """A tiny upcycled Llama: the kind `upcycle export` writes as Mixtral or Qwen2-MoE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    llama = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    args = ["convert", "--model", str(root / "llama"), "--method", "naive", "--layers", "all", "--out"]
    assert main([*args, str(root / "moe")]) == 0
    return str(root / "moe")


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_native_moe_export_is_named_as_such(fmt, llama_moe_dir, tmp_path, capsys):
    """A native Mixtral / Qwen2-MoE export (what `upcycle export` writes and finetune trains) has MoE
    layers; the error says why its routing is not read and what can be analysed instead."""
    native = tmp_path / "native"
    assert main(["export", llama_moe_dir, "--format", fmt, "--out", str(native)]) == 0
    capsys.readouterr()
    rc, err = run_cli(["analyze", "routing", str(native), "--out", str(tmp_path / "o")], capsys)
    name = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}[fmt]
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"is a native {name} checkpoint, whose routing this command cannot read" in err
    assert "analyse the upcycle checkpoint it was exported from" in err and "no MoE layers" not in err
    assert not (tmp_path / "o").exists()


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError) as err:
        RoutingAnalysisConfig(models=["m"], group_by="topic", out="o")
    assert err.value.field == "group_by"
    with pytest.raises(ConfigError) as err:
        RoutingAnalysisConfig(models=["m"], group_by="label", domain=["a=b"], out="o")
    assert err.value.field == "group_by"
    with pytest.raises(ConfigError) as err:
        RoutingAnalysisConfig(models=["m"], group_by="domain", out="o")
    assert err.value.field == "domain"
    with pytest.raises(ConfigError) as err:
        RoutingAnalysisConfig(models=["m", "n"], names=["a"], out="o")
    assert err.value.field == "names"
    assert RoutingAnalysisConfig(models=["m"], domain=["a=b"], out="o").group_by == "domain"


def test_training_flags_are_refused_for_routing(moe_dir, tmp_path, capsys):
    rc, err = run_cli(
        ["analyze", "routing", moe_dir, "--collapse-share", "0.2", "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and "--collapse-share" in err and "training" in err
