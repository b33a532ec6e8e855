"""`upcycle convert --method nexus` (Gritsch et al. 2024): the seed's MLP as the shared expert, each domain
model's MLP as a routed expert, the router x · P(d_i) over domain embeddings, through the user's path
(convert → save → from_pretrained → pretrain / export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.training.conftest import tiny_config
from upcycle.cli import main
from upcycle.config import ConfigError
from upcycle.data.tokenizers import gpt2_tokenizer_offline
from upcycle.training import pretrain
from upcycle.upcycling import DenseMLP, UpcycleConfig, upcycle_model


def hand_domain_embedding(seed_dir: str, data_path: str, tokens: int, block: int = 128) -> torch.Tensor:
    """The default embedder written out: the seed's last hidden state averaged over the first ``tokens``
    tokens of the domain's documents (EOS after each), in blocks of the seed's context (128), unit length."""
    tok = gpt2_tokenizer_offline()
    ids: list[int] = []
    for line in Path(data_path).read_text().splitlines():
        ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
    ids_t = torch.tensor(ids[:tokens])
    seed = GPT2LMHeadModel.from_pretrained(seed_dir).eval()
    with torch.no_grad():
        hidden = torch.cat(
            [seed.transformer(input_ids=b[None]).last_hidden_state[0] for b in ids_t.split(block)]
        )
    return F.normalize(hidden.mean(0), dim=0)


def mlp_weights(module) -> list[torch.Tensor]:
    d = DenseMLP.from_module(module) if hasattr(module, "c_fc") else None
    if d is not None:
        return [d.up, d.up_bias, d.down, d.down_bias]
    return [module.up_proj.weight, module.up_proj.bias, module.down_proj.weight, module.down_proj.bias]


def test_conversion_loads_with_from_pretrained_and_follows_the_paper(nexus_world, nexus_moe):
    w = nexus_world
    model = AutoModelForCausalLM.from_pretrained(nexus_moe)
    m = model.config.moe
    assert type(model).__name__ == "MoEGPT2LMHeadModel"
    assert (m["router_type"], m["num_experts"], m["num_shared_experts"], m["top_k"], m["renormalize"]) == (
        "embedding", 2, 1, 1, False
    )  # fmt: skip
    assert m["domain_embedding_size"] == 32 and not m["shared_expert_gate"]
    seed, prose, code = (
        GPT2LMHeadModel.from_pretrained(p) for p in (w.seed, w.experts["prose"], w.experts["code"])
    )
    for i, moe in model.moe_layers().items():
        for expert, dense in ((moe.experts[0], prose), (moe.experts[1], code), (moe.shared_experts[0], seed)):
            for ours, theirs in zip(mlp_weights(expert), mlp_weights(dense.transformer.h[i].mlp)):
                assert torch.equal(ours, theirs)
    # --merge mean: non-MLP weights are the mean over the seed and the domain models.
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"):
        mean = torch.stack([s.state_dict()[name] for s in (seed, prose, code)]).mean(0)
        torch.testing.assert_close(model.state_dict()[name], mean, atol=0, rtol=0)

    up = model.config.upcycling
    assert up["method"] == "nexus" and up["expert_names"] == ["prose", "code"]
    record = up["nexus"]["domain_embeddings"]["domains"]["code"]
    assert (record["source"], record["tokens"], record["model"]) == (w.data["code"], 600, w.seed)
    assert json.loads(Path(nexus_moe, "upcycling.json").read_text())["nexus"] == up["nexus"]


def test_domain_embeddings_are_the_seeds_mean_last_hidden_state(nexus_world, nexus_moe):
    model = AutoModelForCausalLM.from_pretrained(nexus_moe)
    expected = torch.stack(
        [hand_domain_embedding(nexus_world.seed, nexus_world.data[d], 600) for d in ("prose", "code")]
    )
    for moe in model.moe_layers().values():
        torch.testing.assert_close(moe.router.domain_embeddings, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)


def test_router_logits_are_x_dot_projected_domain_embeddings_and_the_shared_expert_sees_every_token(
    nexus_moe,
):
    model = AutoModelForCausalLM.from_pretrained(nexus_moe).eval()
    inputs, shared_rows, routed_rows = {}, {}, {}
    for i, moe in model.moe_layers().items():
        moe.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        moe.shared_experts[0].register_forward_hook(
            lambda mod, args, out, i=i: shared_rows.__setitem__(i, shared_rows.get(i, 0) + args[0].shape[0])
        )
        for e in moe.experts:
            e.register_forward_hook(
                lambda mod, args, out, i=i: routed_rows.__setitem__(
                    i, routed_rows.get(i, 0) + args[0].shape[0]
                )
            )
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    state = model.state_dict()
    for i, moe in model.moe_layers().items():
        p = f"transformer.h.{i}.mlp.router."
        W1, W2, d = (
            state[p + "projection_in.weight"],
            state[p + "projection_out.weight"],
            state[p + "domain_embeddings"],
        )
        H = W2.shape[1]
        e = torch.stack([W2 @ (F.silu(W1[:H] @ di) * (W1[H:] @ di)) for di in d])  # Nexus §3, per domain
        x = inputs[i].reshape(-1, 32)
        torch.testing.assert_close(moe.last_routing.logits_UE, x @ e.t(), atol=1e-5, rtol=1e-5)
        assert shared_rows[i] == ids.numel() and routed_rows[i] == ids.numel()  # top-1 routed + shared


@pytest.mark.parametrize("merge,parts", [("experts", ("prose", "code")), ("seed", ("seed",))])
def test_merge_choices_for_non_mlp_weights(nexus_world, tmp_path, merge, parts):
    w = nexus_world
    file = tmp_path / "emb.pt"
    torch.save({"prose": torch.randn(12), "code": torch.randn(12)}, file)
    opts = UpcycleConfig(model=[w.seed], method="nexus", expert=[f"{d}={w.experts[d]}" for d in ("prose", "code")],
                         domain_embeddings=str(file), merge=merge, out=None)  # fmt: skip
    model = upcycle_model(opts, progress=False).model
    paths = {"seed": w.seed, **w.experts}
    states = [GPT2LMHeadModel.from_pretrained(paths[p]).state_dict() for p in parts]
    for name in ("transformer.wpe.weight", "transformer.h.1.ln_2.weight", "transformer.h.1.attn.c_proj.bias"):
        torch.testing.assert_close(model.state_dict()[name], torch.stack([s[name] for s in states]).mean(0))
    assert model.config.moe["domain_embedding_size"] == 12


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_domain_embeddings_from_a_file_or_text_per_domain(nexus_world, tmp_path, suffix):
    from safetensors.torch import save_file

    w = nexus_world
    vectors = {"code": torch.randn(32) * 7, "math": torch.randn(32), "unused": torch.randn(32)}
    file = tmp_path / f"emb{suffix}"
    save_file(vectors, file) if suffix == ".safetensors" else torch.save(vectors, file)
    opts = UpcycleConfig(model=[w.seed], method="nexus", expert=[f"{d}={w.experts[d]}" for d in ("prose", "code", "math")],
                         domain_data=[f"prose={w.data['prose']}"], domain_embeddings=str(file), embed_tokens=200,
                         out=None)  # fmt: skip
    model = upcycle_model(opts, progress=False).model
    d = model.moe_layers()[0].router.domain_embeddings
    torch.testing.assert_close(
        d[0], hand_domain_embedding(w.seed, w.data["prose"], 200), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(d[1:], F.normalize(torch.stack([vectors["code"], vectors["math"]]), dim=-1))
    records = model.config.upcycling["nexus"]["domain_embeddings"]["domains"]
    assert records["code"] == {"file": str(file)} and records["prose"]["tokens"] == 200


def test_linear_router_is_the_papers_baseline_with_the_same_experts(nexus_world):
    w = nexus_world
    experts = [f"{d}={w.experts[d]}" for d in ("prose", "code")]
    opts = UpcycleConfig(
        model=[w.seed], method="nexus", expert=experts, moe={"router_type": "linear"}, out=None
    )
    moe = upcycle_model(opts, progress=False).model.moe_layers()[0]
    assert moe.router.weight.shape == (2, 32) and moe.config.num_shared_experts == 1
    with pytest.raises(ConfigError, match="router_type=embedding"):
        UpcycleConfig(model=[w.seed], method="nexus", expert=experts, moe={"router_type": "linear"},
                      domain_data=[f"prose={w.data['prose']}"])  # fmt: skip


def test_training_moves_the_projection_and_not_the_domain_embeddings(nexus_world, nexus_moe, tmp_path):
    corpus = {"train": nexus_world.data["prose"], "eval": nexus_world.data["code"]}
    before = AutoModelForCausalLM.from_pretrained(nexus_moe).state_dict()
    result = pretrain(tiny_config(corpus, tmp_path / "run", model=nexus_moe, steps=2, eval_every=0))
    after = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    for key in before:
        if key.endswith("router.domain_embeddings"):
            assert torch.equal(after[key], before[key]), key
        elif ".router.projection_" in key:
            assert not torch.equal(after[key], before[key]), key


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--expert", "prose=P", "--expert", "prose=C"], "the name 'prose' is given twice"),
        (["--expert", "prose=P", "code=C", "--domain-data", "prose=DP"], "expert 'code' has no --domain-data"),
        (["--expert", "prose=P", "--domain-data", "prose=DP", "math=DM"], "--domain-data='math' is invalid"),
        (["--expert", "prose=P", "code=WIDE", "--domain-data", "prose=DP", "code=DC"], "nexus sources differ in shape"),
        (["--expert", "prose=P", "code=LLAMA", "--domain-data", "prose=DP", "code=DC"], "must share an architecture"),
        (["--expert", "prose=P", "code=C", "--domain-data", "prose=DP", "--domain-embeddings", "EMB"],
         "domain 'code' has no --domain-data and no --domain-embeddings entry"),
        (["--expert", "P"], "expected NAME=VALUE"),
        (["--method", "drop", "--expert", "prose=P"], "applies to method 'nexus' only"),
        (["--expert", "prose=P", "--domain-data", "prose=DP", "--experts", "3"], "nexus builds 1"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_line_errors(nexus_world, sources, tmp_path, capsys, flags, message):
    w = nexus_world
    wide = tmp_path / "wide"
    if "code=WIDE" in flags:
        GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=128)
        ).save_pretrained(wide)
    torch.save({"prose": torch.randn(32)}, tmp_path / "emb.pt")
    names = {"P": w.experts["prose"], "C": w.experts["code"], "DP": w.data["prose"], "DC": w.data["code"],
             "DM": w.data["math"], "WIDE": str(wide), "LLAMA": sources["llama"], "EMB": str(tmp_path / "emb.pt")}  # fmt: skip
    flags = [
        f.split("=")[0] + "=" + names.get(f.split("=")[1], f.split("=")[1]) if "=" in f else names.get(f, f)
        for f in flags
    ]
    out = tmp_path / "out"
    capsys.readouterr()  # what writing the test's own models printed
    code = main(["convert", "--method", "nexus", "--model", w.seed, *flags, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_converts_with_repeated_flags(nexus_world, tmp_path, capsys):
    w = nexus_world
    out = tmp_path / "moe"
    code = main(["convert", "--method", "nexus", "--model", w.seed, "--expert", f"code={w.experts['code']}",
                 "--expert", f"math={w.experts['math']}", "--domain-data", f"code={w.data['code']}",
                 "--domain-data", f"math={w.data['math']}", "--embed-tokens", "300", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "nexus" in printed and "vs the seed" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.upcycling["expert_names"] == ["code", "math"]


def test_inspect_losses_and_routing_statistics_work_unchanged(nexus_moe, capsys):
    assert main(["inspect", nexus_moe]) == 0
    printed = capsys.readouterr().out
    assert "router: embedding/learned" in printed and "nexus experts prose, code" in printed
    model = AutoModelForCausalLM.from_pretrained(nexus_moe)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    model.reset_routing_stats()
    out = model(input_ids=ids, labels=ids)
    assert out.load_balancing_loss > 0 and torch.isclose(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    assert model.moe_layers()[0].router.projection_in.weight.grad.abs().sum() > 0
    for stats in model.routing_stats().values():
        assert stats["tokens"] == 32 and sum(stats["tokens_per_expert"]) == 32
