"""`convert`: output folders, Hugging Face round trips, generation, losses, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
)

import upcycle  # noqa: F401
from upcycle.config import ConfigError, UserError
from upcycle.upcycling import UpcycleConfig, convert


def ids(vocab=256, batch=2, length=12, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_round_trip_gives_identical_logits(sources, tmp_path, family):
    out = tmp_path / "moe"
    result = convert(
        UpcycleConfig(model=[sources[family]], method="drop", ratio=0.3, out=str(out)), progress=False
    )
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == type(result.model).__name__
    saved, built = loaded.state_dict(), result.model.state_dict()
    assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved)
    x = ids()
    with torch.no_grad():
        # Weights are bitwise equal; logits may differ in the last bit because MKL picks kernels by memory
        # alignment, and safetensors memory-maps tensors at other alignments than fresh allocations.
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, result.model.eval()(input_ids=x).logits,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
    # Function-preservation figures are stored with the checkpoint.
    cfg = AutoConfig.from_pretrained(out)
    assert "max_abs_logit_diff" in cfg.upcycling["function_preservation"]
    assert json.loads((out / "upcycling.json").read_text())["method"] == "drop"


def test_checkpoint_works_as_a_hugging_face_model(sources, tmp_path):
    out = tmp_path / "moe"
    convert(UpcycleConfig(model=[sources["gpt2"]], method="naive", top_k=1, renormalize=False, out=str(out)),
            progress=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids()
    gen = model.generate(
        x[:, :4], max_new_tokens=6, do_sample=False, attention_mask=torch.ones(2, 4, dtype=torch.long)
    )
    assert gen.shape == (2, 10)

    # Loss = LM loss + weighted aux losses, each reported separately.
    model.train()
    out_lm = model(input_ids=x, labels=x)
    assert out_lm.lm_loss is not None and out_lm.aux_loss is not None
    torch.testing.assert_close(out_lm.loss, out_lm.lm_loss + out_lm.aux_loss)
    torch.testing.assert_close(out_lm.aux_loss, 0.01 * out_lm.load_balancing_loss)
    per_layer = [m.aux_losses["load_balancing"] for m in model.moe_layers().values()]
    torch.testing.assert_close(out_lm.load_balancing_loss, torch.stack(per_layer).mean())
    out_lm.loss.backward()
    assert model.moe_layers()[0].router.weight.grad is not None

    # Sequence classification head on the same checkpoint, batched (pad token set at conversion).
    clf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    res = clf(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 2]))
    assert res.logits.shape == (2, 3)
    torch.testing.assert_close(res.loss, res.task_loss + res.aux_loss)


def test_padding_mask_reaches_the_moe_layers(sources, tmp_path):
    out = tmp_path / "moe"
    convert(UpcycleConfig(model=[sources["llama"]], method="drop", out=str(out)), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids(length=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    model.reset_routing_stats()
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    stats = model.routing_stats()
    assert all(s["tokens"] == 10 for s in stats.values())


def test_same_seed_gives_identical_checkpoint_files(sources, tmp_path):
    files = []
    for name in ("a", "b"):
        out = tmp_path / name
        convert(
            UpcycleConfig(model=[sources["gpt2"]], method="drop", ratio=0.5, seed=11, out=str(out)),
            progress=False,
        )
        files.append(sorted(out.glob("*.safetensors")))
    for fa, fb in zip(*files):
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(method="magic"), "method"),
        (dict(ratio=1.5), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(top_k=9, experts=8), "top_k"),
        (dict(layers="0,9"), "layers"),
        (dict(layers="x"), "layers"),
        (dict(method="granular", granularity=3, experts=6, top_k=3), "granularity"),
        (dict(method="granular", granularity=2, experts=6, top_k=3), "top_k"),
        (dict(method="naive", moe={"router_jitter": 0.1}), "moe.router_jitter"),
        (dict(method="naive", moe={"topk": 2}), "moe.topk"),
    ],
)
def test_invalid_options_name_the_field(sources, tmp_path, kw, field):
    with pytest.raises(ConfigError) as err:
        convert(UpcycleConfig(model=[sources["gpt2"]], out=str(tmp_path / "o"), **kw), progress=False)
    assert err.value.field == field
    assert not (tmp_path / "o").exists()


def test_btx_sources_must_match(sources, tmp_path):
    with pytest.raises(ConfigError, match="differ in shape"):
        convert(UpcycleConfig(model=[sources["gpt2"], sources["gpt2_wide"]], method="btx", out=str(tmp_path / "o")),
                progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="share an architecture"):
        convert(UpcycleConfig(model=[sources["gpt2"], sources["llama"]], method="btx", out=str(tmp_path / "o")),
                progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="exactly one source"):
        UpcycleConfig(model=[sources["gpt2"], sources["gpt2_b"]], method="drop")


def test_existing_output_needs_overwrite(sources, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        convert(UpcycleConfig(model=[sources["gpt2"]], out=str(out)), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(UpcycleConfig(model=[sources["gpt2"]], out=str(out), overwrite=True), progress=False)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_unreadable_and_unsupported_sources(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        convert(UpcycleConfig(model=[str(tmp_path / "missing")], out=str(tmp_path / "o")), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read model config"):
        convert(UpcycleConfig(model=[str(broken)], out=str(tmp_path / "o")), progress=False)
    opt = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64, word_embed_proj_dim=16)).save_pretrained(opt)  # fmt: skip
    with pytest.raises(ConfigError, match="supported sources are gpt2, llama, mistral, qwen2"):
        convert(UpcycleConfig(model=[str(opt)], out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()


def test_failure_while_saving_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *a, **k):
        Path(a[0], "partial.safetensors").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(UpcycleConfig(model=[sources["gpt2"]], out=str(tmp_path / "o")), progress=False)
    assert os.listdir(tmp_path) == []


def test_tokenizer_is_copied_only_when_usable(sources, tmp_path):
    from upcycle.data.tokenizers import gpt2_tokenizer_offline

    # A weights-only folder: transformers builds an empty tokenizer from it; it must not be copied.
    out = tmp_path / "no-tok"
    convert(UpcycleConfig(model=[sources["gpt2"]], method="naive", out=str(out)), progress=False)
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    # A folder with a real tokenizer: copied, and it tokenises as the source's does.
    src = tmp_path / "with-tok"
    from tests.upcycling.conftest import tiny_gpt2

    tiny_gpt2(vocab_size=50257).save_pretrained(src)
    gpt2_tokenizer_offline().save_pretrained(src)
    out = tmp_path / "tok"
    convert(UpcycleConfig(model=[str(src)], method="naive", out=str(out)), progress=False)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("Hello world").input_ids == [15496, 995]
