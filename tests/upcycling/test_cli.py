"""The `upcycle` command line: presets, YAML configs, flags, inspect and errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

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
