"""`upcycle extend` (Nexus §3, "Efficient adaptation to new domains"): one more routed expert per MoE layer
from a new dense model, every other weight kept, routing to it through the trained projection, the
function-preservation figures stored, and --freeze-existing carried through `from_pretrained` into
`upcycle pretrain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.training.conftest import tiny_config
from tests.upcycling.test_nexus import hand_domain_embedding, mlp_weights
from upcycle.cli import main
from upcycle.training import pretrain
from upcycle.upcycling import UpcycleConfig, convert
from upcycle.upcycling.convert import probe_batch
from upcycle.upcycling.extend import ExtendConfig, extend


@pytest.fixture(scope="module")
def extended(nexus_world, nexus_moe, tmp_path_factory):
    """The prose+code Nexus MoE extended with the math expert through the command line."""
    w = nexus_world
    out = tmp_path_factory.mktemp("extended") / "moe"
    code = main(["extend", nexus_moe, "--expert", f"math={w.experts['math']}", "--domain-data",
                 f"math={w.data['math']}", "--embed-tokens", "500", "--out", str(out)])  # fmt: skip
    assert code == 0
    return str(out)


def test_one_expert_per_moe_layer_and_every_other_weight_byte_identical(nexus_world, nexus_moe, extended):
    old = AutoModelForCausalLM.from_pretrained(nexus_moe)
    new = AutoModelForCausalLM.from_pretrained(extended)
    assert new.config.moe["num_experts"] == 3 and new.config.moe_layers == old.config.moe_layers
    math = GPT2LMHeadModel.from_pretrained(nexus_world.experts["math"])
    for i, moe in new.moe_layers().items():
        assert len(moe.experts) == 3
        for ours, theirs in zip(mlp_weights(moe.experts[2]), mlp_weights(math.transformer.h[i].mlp)):
            assert torch.equal(ours, theirs)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert set(new_state) - set(old_state) == {k for k in new_state if ".experts.2." in k}
    for key, tensor in old_state.items():
        if key.endswith("router.domain_embeddings"):
            assert torch.equal(new_state[key][:2], tensor), key
        else:
            assert torch.equal(new_state[key], tensor), key
    # The new domain's embedding: the recorded embedder (the seed) over its text, as at conversion.
    expected = hand_domain_embedding(nexus_world.seed, nexus_world.data["math"], 500)
    for moe in new.moe_layers().values():
        torch.testing.assert_close(moe.router.domain_embeddings[2], expected, atol=1e-5, rtol=1e-5)
    assert new.config.upcycling["expert_names"] == ["prose", "code", "math"]


def test_the_new_domains_tokens_reach_the_new_expert_through_the_trained_projection(nexus_world, extended):
    model = AutoModelForCausalLM.from_pretrained(extended).eval()
    record = model.config.upcycling["extensions"][-1]["new_expert_routing"]["math"]
    assert record["expert"] == 2 and record["tokens"] == 500
    # By hand: the top-1 choice among x · P(d_i) for the math text's tokens, layer by layer.
    inputs = {}
    for i, moe in model.moe_layers().items():
        moe.register_forward_pre_hook(
            lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].detach())
        )
    from upcycle.data.tokenizers import gpt2_tokenizer_offline

    tok = gpt2_tokenizer_offline()
    ids: list[int] = []
    for line in Path(nexus_world.data["math"]).read_text().splitlines():
        ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        for block in torch.tensor(ids[:500]).split(128):
            model(input_ids=block[None])
    for i, moe in model.moe_layers().items():
        x = torch.cat([t.reshape(-1, 32) for t in inputs[i]])
        e = moe.router.effective_weight()
        share = float(((x @ e.t()).argmax(-1) == 2).float().mean())
        assert share > 0 and share == pytest.approx(record["layers"][str(i)], abs=1e-6)


def test_preservation_figures_are_reported_and_stored(nexus_moe, extended):
    old = AutoModelForCausalLM.from_pretrained(nexus_moe).eval()
    new = AutoModelForCausalLM.from_pretrained(extended).eval()
    fp = new.config.upcycling["extensions"][-1]["function_preservation"]
    assert (
        json.loads(Path(extended, "upcycling.json").read_text())["extensions"][-1]["function_preservation"]
        == fp
    )
    ids = probe_batch(50257, 4, 64)
    with torch.no_grad():
        a, b = old(input_ids=ids).logits, new(input_ids=ids).logits
    kl = (
        F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).mean()
    )
    assert fp["probe"] == "random tokens" and fp["probe_tokens"] == 256
    assert fp["max_abs_logit_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-5)
    assert fp["mean_kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-9)
    # Tokens that now pick the new expert change; Switch-style probabilities shrink for the others.
    assert fp["max_abs_logit_diff"] > 0 and 0 < fp["probe_routed_to_new"] < 1


def test_the_top_level_preservation_is_the_extensions_and_inspect_says_so(nexus_moe, extended, capsys):
    converted = json.loads(Path(nexus_moe, "upcycling.json").read_text())["function_preservation"]
    record = json.loads(Path(extended, "upcycling.json").read_text())
    fp = AutoModelForCausalLM.from_pretrained(extended).config.upcycling["function_preservation"]
    ext = record["extensions"][-1]["function_preservation"]
    # What `convert` writes and `inspect` and the report read: now the extension's figures.
    assert record["function_preservation"] == fp and fp["after_extension"] == 1
    assert {k: fp[k] for k in ext} == ext and fp["max_abs_logit_diff"] != converted["max_abs_logit_diff"]
    assert record["conversion_function_preservation"] == converted
    assert main(["inspect", extended]) == 0
    out = capsys.readouterr().out
    assert (
        f"after extension 1 (vs the MoE before it, on random tokens): max |Δlogits| = {ext['max_abs_logit_diff']:.3g}"
        in out
    )
    assert (
        f"at conversion (vs the dense source): max |Δlogits| = {converted['max_abs_logit_diff']:.3g}" in out
    )
    assert "extension 1: added math (router: projection of the domain embedding)" in out


def test_upcycle_runs_extend_summary_carries_the_preservation(nexus_world, nexus_moe, tmp_path, capsys):
    from upcycle.experiment.execute import execute
    from upcycle.experiment.tasks import Task

    w, out = nexus_world, tmp_path / "extended"
    cfg = ExtendConfig(model=nexus_moe, expert=[f"math={w.experts['math']}"], domain_data=[f"math={w.data['math']}"],
                       embed_tokens=200, out=str(out))  # fmt: skip
    summary = execute(Task("extend", "nexus", "extend", cfg, out=out), resume=False)
    record = json.loads((out / "upcycling.json").read_text())["extensions"][-1]
    assert summary["function_preservation"] == record["function_preservation"]
    assert summary["new_expert_routing"] == {"math": record["new_expert_routing"]["math"]["mean"]}
    assert "function preservation on the old domains" in capsys.readouterr().out


@pytest.fixture(scope="module")
def btx_moe(nexus_world, tmp_path_factory):
    w = nexus_world
    moe_dir = tmp_path_factory.mktemp("btx") / "moe"
    convert(UpcycleConfig(model=[w.experts["prose"], w.experts["code"]], method="btx", experts=2, top_k=1,
                          out=str(moe_dir)), progress=False)  # fmt: skip
    return moe_dir


@pytest.mark.parametrize("router_init", ["mean", "zeros", "normal:0.5"])
def test_linear_router_gets_the_naive_baseline_row(nexus_world, btx_moe, router_init):
    w, moe_dir = nexus_world, btx_moe
    cfg = ExtendConfig(model=str(moe_dir), expert=[f"math={w.experts['math']}"], router_init=router_init,
                       domain_data=[f"math={w.data['math']}"], embed_tokens=200, out=None)  # fmt: skip
    result = extend(cfg)
    old = AutoModelForCausalLM.from_pretrained(moe_dir)
    for i, moe in result.model.moe_layers().items():
        rows, before = moe.router.weight, old.moe_layers()[i].router.weight
        assert torch.equal(rows[:2], before)
        if router_init == "mean":
            torch.testing.assert_close(rows[2], before.mean(0))
        elif router_init == "zeros":
            assert not rows[2].any()
        else:
            assert 0.2 < float(rows[2].std()) < 0.8
    assert result.new_expert_routing["math"]["tokens"] == 200
    assert result.model.config.upcycling["extensions"][-1]["router"] == router_init


def test_merge_average_follows_the_papers_lambda(nexus_world, nexus_moe):
    w = nexus_world
    cfg = ExtendConfig(model=nexus_moe, expert=[f"math={w.experts['math']}"], domain_data=[f"math={w.data['math']}"],
                       embed_tokens=200, merge="average", out=None)  # fmt: skip
    new = extend(cfg).model.state_dict()
    old = AutoModelForCausalLM.from_pretrained(nexus_moe).state_dict()
    math = GPT2LMHeadModel.from_pretrained(w.experts["math"]).state_dict()
    for key in ("transformer.wte.weight", "transformer.h.1.attn.c_attn.bias", "transformer.ln_f.weight"):
        # φ = (1 − λ)·φ_moe + λ·φ_new, λ = 1/(n + 1), n = 2 experts
        torch.testing.assert_close(new[key], old[key] * 2 / 3 + math[key] / 3)
    for key in (
        "transformer.h.0.mlp.shared_experts.0.up_proj.weight",
        "transformer.h.1.mlp.experts.1.down_proj.bias",
    ):
        assert torch.equal(new[key], old[key])


def test_freeze_existing_trains_only_the_new_expert_and_the_router_projection(
    nexus_world, nexus_moe, tmp_path
):
    w = nexus_world
    out = tmp_path / "frozen"
    cfg = ExtendConfig(model=nexus_moe, expert=[f"math={w.experts['math']}"], domain_data=[f"math={w.data['math']}"],
                       embed_tokens=200, freeze_existing=True, out=str(out))  # fmt: skip
    extend(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    expected = {n for n, _ in loaded.named_parameters() if ".experts.2." in n or ".router.projection_" in n}
    assert trainable == expected and expected
    before = loaded.state_dict()
    corpus = {"train": w.data["math"], "eval": w.data["prose"]}
    result = pretrain(tiny_config(corpus, tmp_path / "run", model=str(out), steps=2, eval_every=0))
    after = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    for key, tensor in before.items():  # buffers (domain embeddings) included
        assert torch.equal(after[key], tensor) == (key not in expected), key


def test_a_conversion_from_relative_paths_extends_from_another_folder(nexus_world, tmp_path, monkeypatch):
    w = nexus_world
    monkeypatch.chdir(w.root)  # the seed, the experts and the text given relative to the nexus folder
    rel = {d: str(Path(w.experts[d]).relative_to(w.root)) for d in ("prose", "code")}
    moe_dir = tmp_path / "moe"
    convert(UpcycleConfig(model=["seed"], method="nexus", expert=[f"{d}={p}" for d, p in rel.items()],
                          domain_data=["prose=prose.jsonl", "code=code.jsonl"], embed_tokens=100,
                          out=str(moe_dir)), progress=False)  # fmt: skip
    nexus = json.loads((moe_dir / "upcycling.json").read_text())["nexus"]
    domains = nexus["domain_embeddings"]["domains"]
    recorded = [nexus["shared_expert"], domains["prose"]["model"], domains["code"]["model"]]
    assert all(Path(p).is_absolute() and Path(p).resolve() == Path(w.seed).resolve() for p in recorded)
    assert Path(domains["code"]["source"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded embedder (the seed) is found from here too
    result = extend(ExtendConfig(model=str(moe_dir), expert=[f"math={w.experts['math']}"],
                                 domain_data=[f"math={w.data['math']}"], embed_tokens=100, out=None))  # fmt: skip
    expected = hand_domain_embedding(w.seed, w.data["math"], 100)
    for moe in result.model.moe_layers().values():
        torch.testing.assert_close(moe.router.domain_embeddings[2], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--expert", "prose=M", "--domain-data", "prose=DM"], "already has an expert named 'prose'"),
        (["--expert", "math=WIDE", "--domain-data", "math=DM"], "the MoE's experts are"),
        (["--expert", "math=M"], "domain 'math' has no --domain-data and no --domain-embeddings entry"),
        (["--expert", "math=M", "--domain-embeddings", "EMB7"], "the router's domain embeddings have size 32"),
        (["--expert", "math=M", "--expert", "math=M"], "the name 'math' is given twice"),
        (["--expert", "math=MOE"], "is already an MoE checkpoint"),
        (["--expert", "math=M", "--domain-data", "math=DM", "--router-init", "mean"],
         "--router-init='mean' is invalid: applies to linear and mlp routers only"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_line_errors(nexus_world, nexus_moe, tmp_path, capsys, flags, message):
    w = nexus_world
    wide = tmp_path / "wide"
    if "math=WIDE" in flags:
        GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_inner=64, n_head=2, vocab_size=50257)
        ).save_pretrained(wide)
    torch.save({"math": torch.randn(7)}, tmp_path / "emb7.pt")
    names = {"M": w.experts["math"], "DM": w.data["math"], "WIDE": str(wide), "MOE": nexus_moe,
             "EMB7": str(tmp_path / "emb7.pt")}  # fmt: skip
    flags = [f.split("=")[0] + "=" + names[f.split("=")[1]] if "=" in f else names.get(f, f) for f in flags]
    out = tmp_path / "out"
    code = main(["extend", nexus_moe, *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_dense_model_is_not_extended(nexus_world, tmp_path, capsys):
    code = main(
        [
            "extend",
            nexus_world.seed,
            "--expert",
            f"math={nexus_world.experts['math']}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "is not an upcycle MoE checkpoint" in capsys.readouterr().err


def test_yaml_config_takes_a_mapping_of_experts_and_flags_win(tmp_path):
    from upcycle.upcycling.extend_cli import options_from_args

    file = tmp_path / "extend.yaml"
    file.write_text(
        "model: moe\nexpert:\n  math: math-lm\n  code: code-lm\nfreeze-existing: true\nmerge: average\n"
    )
    cfg = options_from_args({"config": str(file), "model": None, "merge": "keep", "expert": None})
    assert (cfg.model, cfg.expert, cfg.freeze_existing, cfg.merge) == (
        "moe", ["math=math-lm", "code=code-lm"], True, "keep"
    )  # fmt: skip
