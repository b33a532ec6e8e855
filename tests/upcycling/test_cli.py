"""The `upcycle` command line: presets, YAML configs, flags, inspect and errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from tests.clitools import enter_workdir, refused
from upcycle.analysis.accounting import account
from upcycle.cli import main


def test_report_preset_gives_the_founding_report_setting(sources, tmp_path, capsys):
    out = tmp_path / "moe"
    assert (
        main(["convert", "--preset", "report-gpt2", "--model", sources["gpt2"], "--out", str(out), "--quiet"])
        == 0
    )
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "moe_gpt2" and cfg.moe_layers == [1, 3]
    m = cfg.moe
    assert (m["num_experts"], m["top_k"], m["renormalize"], m["router_jitter"], m["aux_loss_weight"]) == (
        8, 1, False, 0.01, 0.01
    )  # fmt: skip
    assert cfg.upcycling["method"] == "drop" and cfg.upcycling["options"]["ratio"] == 0.15
    printed = capsys.readouterr().out
    assert "function preservation" in printed and "Switch-style" in printed


def test_yaml_config_then_flags_win(sources, tmp_path):
    cfg_file = tmp_path / "convert.yaml"
    cfg_file.write_text(
        f"model: [{sources['llama']}]\nmethod: naive\nexperts: 4\ntop-k: 2\nrouter_type: mlp\n"
        "moe:\n  router_hidden_size: 16\n"
    )
    out = tmp_path / "moe"
    assert main(["convert", "--config", str(cfg_file), "--top-k", "1", "--out", str(out), "--quiet"]) == 0
    m = AutoConfig.from_pretrained(out).moe
    assert (m["num_experts"], m["top_k"], m["router_type"], m["router_hidden_size"]) == (4, 1, "mlp", 16)
    assert AutoConfig.from_pretrained(out).upcycling["method"] == "naive"


def test_moe_fields_have_their_own_flags(sources, tmp_path):
    out = tmp_path / "moe"
    args = ["convert", "--model", sources["gpt2"], "--out", str(out), "--quiet", "--routing-unit", "sequence",
            "--capacity-factor", "1.5", "--no-renormalize", "--router-init", "uniform:0.0346", "--jitter", "0.02"]  # fmt: skip
    assert main(args) == 0
    m = AutoConfig.from_pretrained(out).moe
    assert (m["routing_unit"], m["capacity_factor"], m["renormalize"]) == ("sequence", 1.5, False)
    assert (m["router_init"], m["router_jitter"]) == ("uniform:0.0346", 0.02)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--top-k", "9"], "--top-k=9 is invalid"),
        (["--ratio", "2"], "--ratio=2.0 is invalid: must be in [0, 1]"),
        (["--router-init", "normal"], "--router-init='normal' is invalid"),
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--layers", "0,7"], "--layers='0,7' is invalid"),
    ],
)
def test_bad_flags_are_one_line_errors(sources, tmp_path, capsys, extra, message):
    code = main(["convert", "--model", sources["gpt2"], "--out", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_out_and_unknown_command(sources, capsys):
    assert main(["convert", "--model", sources["gpt2"]]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_inspect_reports_layout_parameters_and_flops(sources, tmp_path, capsys):
    out = tmp_path / "moe"
    main(["convert", "--model", sources["llama"], "--experts", "4", "--top-k", "1", "--layers", "every_other",
          "--out", str(out), "--quiet"])  # fmt: skip
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--seq-len", "16"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in model.moe_layers()[1].experts[0].parameters())
    assert info["parameters"]["total"] == total
    assert info["parameters"]["active"] == total - 2 * (4 - 1) * per_expert
    assert info["moe"]["layers"] == [1, 3] and info["moe"]["num_experts"] == 4
    # Top-1 of full-size experts: the same forward FLOPs as the dense source (router omitted, Table 3).
    assert info["flops_per_token"]["forward"] == pytest.approx(info["flops_per_token"]["dense_equivalent"])
    assert "function_preservation" in info["upcycling"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MoE layers: 2 of 4" in text and "active" in text
    # Top-1 renormalised (the default): the router learns from the auxiliary losses only; said so.
    assert "no gradient from the LM loss" in text


def test_inspect_gives_the_load_balancing_weight_in_other_conventions(sources, tmp_path, capsys):
    out = tmp_path / "moe"
    main(["convert", "--model", sources["llama"], "--experts", "4", "--top-k", "2", "--aux-loss-weight", "0.02",
          "--out", str(out), "--quiet"])  # fmt: skip
    capsys.readouterr()
    main(["inspect", str(out), "--json"])
    conv = json.loads(capsys.readouterr().out)["aux_loss_conventions"]
    # 4 MoE layers, mean over layers: 0.02 here = 0.005 per layer summed = 0.01 as HF's coef (k = 2).
    assert conv == {
        "routed_layers": 4,
        "per_layer_sum": pytest.approx(0.005),
        "hugging_face": pytest.approx(0.01),
    }
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "0.005 per layer, summed (Switch, Megatron-LM)" in text and "router_aux_loss_coef 0.01" in text


def test_inspect_names_sequence_scoring_and_warns_of_the_future(sources, tmp_path, capsys):
    out = tmp_path / "moe"
    main(["convert", "--model", sources["gpt2"], "--method", "naive", "--routing-unit", "sequence",
          "--out", str(out), "--quiet"])  # fmt: skip
    assert "depend on later tokens" in capsys.readouterr().out  # convert warns
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "Fan et al. eq. 2" in text and "depend on later tokens" in text


def test_flops_follow_drop_upcycling_table_3():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=10)  # fmt: skip
    s, d_h, d_f, v, n_h, n_kv, d_k = 4, 8, 16, 10, 2, 1, 4
    per_layer = (4 * s * d_h * d_k * n_kv + 2 * s * d_h * d_k * n_h + 4 * s * s * d_k * n_h + 2 * s * d_k * n_h * d_h
                 + 6 * s * d_h * d_f)  # fmt: skip
    expected = (2 * s * v * d_h + 2 * per_layer + 2 * s * d_h * v) / s
    assert account(cfg, 0, seq_len=s).flops_per_token == pytest.approx(expected)


def test_inspect_rejects_a_folder_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_export_via_cli(sources, tmp_path, capsys):
    moe = tmp_path / "moe"
    main(["convert", "--model", sources["llama"], "--method", "naive", "--out", str(moe), "--quiet",
          "--z-loss-weight", "0.001"])  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(moe), "--format", "mixtral", "--out", str(tmp_path / "mx")]) == 0
    printed = capsys.readouterr().out
    assert "z_loss_weight=0.001" in printed  # training-only settings that were dropped are listed
    assert AutoConfig.from_pretrained(tmp_path / "mx").model_type == "mixtral"


# --------------------------------------------------------------------------- issue 11: a newcomer's mistakes


@pytest.mark.parametrize(
    "yaml_text,needles",
    [
        ("expertz: 3\n", ["cfg.yaml", "expertz=3", "did you mean expert or experts?"]),
        ("top_kk: 1\n", ["cfg.yaml", "top_kk", "did you mean top_k?"]),
        ("num_experts: 4\n", ["cfg.yaml", "num_experts", "did you mean experts?"]),
        ("experts: eight\n", ["cfg.yaml", "experts='eight'", "expected an integer"]),
        ("ratio: '0.5'\n", ["cfg.yaml", "ratio='0.5'", "expected a number"]),
        ("renormalize: 'no'\n", ["cfg.yaml", "renormalize='no'", "true or false"]),
        ("moe:\n  router_typ: mlp\n", ["cfg.yaml", "moe.router_typ", "did you mean moe.router_type?"]),
        ("moe:\n  num_experts: 4\n", ["cfg.yaml", "moe.num_experts", "top-level 'experts'"]),
        ("method: dorp\n", ["cfg.yaml", "method='dorp'", "did you mean 'drop'?"]),
        ("experts: [\n", ["--config", "cfg.yaml", "not valid YAML"]),
    ],
)
def test_convert_yaml_mistakes_are_one_line(sources, tmp_path, monkeypatch, capsys, yaml_text, needles):
    enter_workdir(tmp_path, monkeypatch)
    Path("cfg.yaml").write_text(yaml_text)
    refused(
        capsys,
        tmp_path,
        ["convert", "--model", sources["gpt2"], "--config", "cfg.yaml", "--out", "o"],
        *needles,
    )


def test_convert_names_a_truncated_weights_file(sources, tmp_path, monkeypatch, capsys):
    enter_workdir(tmp_path, monkeypatch)
    bad = Path("bad")
    bad.mkdir()
    for f in Path(sources["gpt2"]).iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    refused(
        capsys, tmp_path, ["convert", "--model", "bad", "--out", "o"], "bad/model.safetensors", "truncated"
    )


def test_convert_mistyped_local_name_fails_fast(tmp_path, monkeypatch, capsys):
    enter_workdir(tmp_path, monkeypatch)
    refused(capsys, tmp_path, ["convert", "--model", "dnese", "--out", "o"],
            "--model='dnese'", "no local folder 'dnese', and the hub could not be reached")  # fmt: skip
    refused(
        capsys,
        tmp_path,
        ["convert", "--model", "./dnese", "--out", "o"],
        "--model='./dnese'",
        "no such model folder",
    )


def test_a_method_option_that_does_not_apply_is_refused_or_not_recorded(
    sources, tmp_path, monkeypatch, capsys
):
    enter_workdir(tmp_path, monkeypatch)
    refused(capsys, tmp_path, ["convert", "--model", sources["gpt2"], "--method", "naive", "--ratio", "0.3", "--out", "o"],
            "--ratio=0.3", "method 'drop' only", "'naive'")  # fmt: skip
    refused(capsys, tmp_path, ["convert", "--model", sources["gpt2"], "--noise-std", "0.1", "--out", "o"],
            "--noise-std=0.1", "method 'noise' only")  # fmt: skip
    # From a preset or YAML (shared by several methods) it is accepted, but only what was used is recorded.
    Path("base.yaml").write_text("ratio: 0.3\nnoise_std: 0.2\n")
    args = ["convert", "--model", sources["gpt2"], "--config", "base.yaml", "--quiet", "--method"]
    assert main([*args, "naive", "--out", "naive"]) == 0
    options = json.loads(Path("naive/upcycling.json").read_text())["options"]
    assert not {"ratio", "index_sharing", "noise_std", "noise_fraction", "granularity"} & set(options)
    assert options["weight_scaling"] is False and options["experts"] == 8
    assert main([*args, "drop", "--out", "drop"]) == 0
    options = json.loads(Path("drop/upcycling.json").read_text())["options"]
    assert options["ratio"] == 0.3 and options["index_sharing"] == "expert" and "noise_std" not in options


def test_convert_expands_home_and_records_absolute_sources(sources, tmp_path, monkeypatch, capsys):
    enter_workdir(tmp_path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(sources["gpt2"], tmp_path / "dense")
    assert main(["convert", "--model", "~/dense", "--out", "~/moe", "--quiet"]) == 0
    record = json.loads((tmp_path / "moe" / "upcycling.json").read_text())
    assert record["sources"] == [str(tmp_path / "dense")] and record["sources_as_given"] == ["~/dense"]
    assert not Path("~").exists()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the record works from any folder
    assert main(["convert", "--model", "../dense", "--out", "moe2", "--quiet"]) == 0
    assert json.loads(Path("moe2/upcycling.json").read_text())["sources"] == [str(tmp_path / "dense")]


def test_converted_tokenizer_pads_with_the_models_pad_token(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from upcycle.data.tokenizers import gpt2_tokenizer_offline

    enter_workdir(tmp_path, monkeypatch)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32)).save_pretrained("dense")
    gpt2_tokenizer_offline().save_pretrained("dense")
    assert AutoTokenizer.from_pretrained("dense").pad_token is None  # GPT-2 has none
    assert (
        main(["convert", "--model", "dense", "--out", "moe", "--experts", "2", "--top-k", "1", "--quiet"])
        == 0
    )
    config, tok = AutoConfig.from_pretrained("moe"), AutoTokenizer.from_pretrained("moe")
    assert config.pad_token_id == config.eos_token_id == tok.pad_token_id == 50256
    batch = tok(["Hello", "Hello wide world"], padding=True)
    assert batch["input_ids"][0][-1] == config.pad_token_id and batch["attention_mask"][0][-1] == 0


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_converted_folder_is_readable_by_the_group_under_umask_022(sources, tmp_path, monkeypatch):
    enter_workdir(tmp_path, monkeypatch)
    old = os.umask(0o022)
    try:
        assert main(["convert", "--model", sources["gpt2"], "--out", "moe", "--quiet"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path("moe").stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in Path("moe").iterdir()} == {0o644}


@pytest.mark.parametrize("fmt,layers,extra", [("mixtral", "all", []),
                                              ("qwen2_moe", "0,3", ["--shared-experts", "1", "--shared-expert-gate"])])  # fmt: skip
def test_inspect_reads_a_native_export_like_its_source(sources, tmp_path, capsys, fmt, layers, extra):
    moe, native = tmp_path / "moe", tmp_path / fmt
    assert main(["convert", "--model", sources["llama"], "--method", "naive", "--experts", "4", "--top-k", "2",
                 "--layers", layers, "--out", moe, "--quiet", *extra]) == 0  # fmt: skip
    assert main(["export", moe, "--format", fmt, "--out", native]) == 0
    capsys.readouterr()
    infos = []
    for path in (moe, native):
        assert main(["inspect", path, "--json", "--seq-len", "16"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    ours, theirs = infos
    assert theirs["model_type"] == fmt and "moe" in theirs
    for key in ("layers", "num_experts", "top_k", "intermediate_size", "num_shared_experts", "renormalize"):
        assert theirs["moe"][key] == ours["moe"][key], key
    assert theirs["moe"]["aux_loss_weight"] == pytest.approx(ours["moe"]["aux_loss_weight"])
    assert theirs["parameters"] == ours["parameters"]  # total and active: the same model
    assert theirs["parameters"]["active"] < theirs["parameters"]["total"]
    assert theirs["flops_per_token"] == pytest.approx(ours["flops_per_token"])
    assert main(["inspect", native]) == 0
    assert f"MoE layers: {len(ours['moe']['layers'])} of 4" in capsys.readouterr().out


def test_inspect_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    enter_workdir(tmp_path, monkeypatch)
    refused(capsys, tmp_path, ["inspect", "x", "--seq-len", "abc"], "--seq-len", "'abc'", "integer")
    refused(capsys, tmp_path, ["inspect", "./missing"], "PATH='./missing'", "no such model folder")
    refused(capsys, tmp_path, ["inspect", "dnese"], "no local folder 'dnese'")
