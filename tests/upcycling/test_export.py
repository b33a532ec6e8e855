"""Export to native Mixtral / Qwen2-MoE: identical logits in plain transformers (no upcycle import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import upcycle  # noqa: F401
from upcycle.config import UserError
from upcycle.models.export import export
from upcycle.upcycling import UpcycleConfig, convert

CASES = {
    # name: (source, convert options, format)
    "llama_mixtral": ("llama", dict(method="naive", top_k=2, layers="all"), "mixtral"),
    "llama_mixtral_drop_topk_softmax": (
        "llama", dict(method="drop", top_k=2, layers="all", score_order="topk_softmax"), "mixtral"
    ),
    "mistral_mixtral": ("mistral", dict(method="drop", ratio=0.5, layers="all"), "mixtral"),
    "llama_qwen_every_other": ("llama", dict(method="drop", layers="every_other", renormalize=False), "qwen2_moe"),
    "llama_qwen_list_shared": (
        "llama", dict(method="drop", layers="0,3", shared_experts=1, moe={"shared_expert_gate": True}), "qwen2_moe"
    ),
    # A frozen router's buffers export as Mixtral's ordinary gate weight (listed as a dropped setting).
    "llama_mixtral_frozen_router": (
        "llama", dict(method="drop", top_k=2, layers="all", moe={"router_mode": "frozen"}), "mixtral"
    ),
    "qwen2_qwen_two_shared": (
        "qwen2", dict(method="drop", layers="all", shared_experts=2, moe={"shared_expert_gate": True}), "qwen2_moe"
    ),
    # An ungated shared expert: Qwen2-MoE's gate weight 0 (sigmoid = 1/2) and the shared down_proj doubled.
    "llama_qwen_ungated_shared": ("llama", dict(method="naive", shared_experts=1, top_k=1), "qwen2_moe"),
    # Nexus (issue 15): the seed's MLP as the ungated shared expert, the embedding router's effective matrix
    # P(d_i) as the gate; expert sources and the embeddings file are resolved by the fixture.
    "llama_qwen_nexus": (
        "llama", dict(method="nexus", expert=["a=llama_b", "b=llama", "c=llama_b"], domain_embeddings="EMB", top_k=2,
                      layers="every_other", router_init="normal:0.5"), "qwen2_moe"
    ),
}  # fmt: skip


def _resolve(kw: dict, sources: dict, root: Path) -> dict:
    """Expert names of CASES → source folders; 'EMB' → a file of random 7-dimensional domain embeddings."""
    if "expert" not in kw:
        return kw
    experts = [f"{e.split('=')[0]}={sources[e.split('=')[1]]}" for e in kw["expert"]]
    emb = root / "domain-embeddings.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({e.split("=")[0]: torch.randn(7, generator=g) for e in kw["expert"]}, emb)
    return {**kw, "expert": experts, "domain_embeddings": str(emb)}


PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM  # deliberately no `import upcycle`
assert "upcycle" not in sys.modules
out = {}
ids = torch.tensor(json.loads(sys.argv[1]))
for name, path in json.loads(sys.argv[2]).items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[name] = {"type": type(model).__name__, "logits": model(input_ids=ids).logits.tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    ours, paths = {}, {}
    for name, (src, kw, fmt) in CASES.items():
        moe_dir = root / f"{name}-moe"
        kw = _resolve(kw, sources, root)
        convert(UpcycleConfig(model=[sources[src]], out=str(moe_dir), **kw), progress=False)
        model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
        with torch.no_grad():
            ours[name] = model(input_ids=ids).logits
        export(str(moe_dir), fmt, str(root / name))
        paths[name] = str(root / name)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(ids.tolist()), json.dumps(paths)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    return ours, theirs, paths


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_in_plain_transformers(exported, name):
    ours, theirs, _ = exported
    fmt = CASES[name][2]
    assert theirs[name]["type"] == ("MixtralForCausalLM" if fmt == "mixtral" else "Qwen2MoeForCausalLM")
    torch.testing.assert_close(torch.tensor(theirs[name]["logits"]), ours[name], atol=2e-5, rtol=1e-5)


def test_interleaving_maps_onto_qwen2_moe_sparse_step_or_layer_list(exported):
    _, _, paths = exported
    cfg = json.loads(Path(paths["llama_qwen_every_other"], "config.json").read_text())
    assert cfg["decoder_sparse_step"] == 2 and cfg["mlp_only_layers"] == []
    cfg = json.loads(Path(paths["llama_qwen_list_shared"], "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1, 2] and cfg["shared_expert_intermediate_size"] == 64


@pytest.mark.parametrize(
    "src,kw,fmt,messages",
    [
        ("gpt2", dict(method="naive"), "mixtral", ["architecture moe_gpt2"]),
        ("llama", dict(method="naive", layers="every_other", top_k=1, renormalize=False), "mixtral",
         ["moe_layers=[1, 3]", "renormalize=False"]),
        ("llama", dict(method="naive", moe={"routing_unit": "sequence", "capacity_factor": 1.0}), "mixtral",
         ["routing_unit=sequence", "capacity_factor=1.0"]),
        ("llama", dict(method="naive", moe={"routing_unit": "sequence_prefix"}), "mixtral",
         ["routing_unit=sequence_prefix"]),
    ],
)  # fmt: skip
def test_unexpressible_models_name_every_setting(sources, tmp_path, src, kw, fmt, messages):
    moe_dir = tmp_path / "moe"
    convert(UpcycleConfig(model=[sources[src]], out=str(moe_dir), **kw), progress=False)
    with pytest.raises(UserError) as err:
        export(str(moe_dir), fmt, str(tmp_path / "out"))
    for m in messages:
        assert m in str(err.value)
    assert not (tmp_path / "out").exists()


def test_nexus_router_exports_as_its_effective_matrix(exported):
    from safetensors.torch import load_file

    _, _, paths = exported
    ours = AutoModelForCausalLM.from_pretrained(
        Path(paths["llama_qwen_nexus"]).parent / "llama_qwen_nexus-moe"
    )
    theirs = {}
    for f in Path(paths["llama_qwen_nexus"]).glob("*.safetensors"):
        theirs.update(load_file(f))
    for i, moe in ours.moe_layers().items():
        gate = theirs[f"model.layers.{i}.mlp.gate.weight"]
        torch.testing.assert_close(gate, moe.router.effective_weight())
        assert not torch.allclose(gate[0], gate[1])  # one row per domain
        assert torch.equal(theirs[f"model.layers.{i}.mlp.shared_expert_gate.weight"], torch.zeros(1, 32))
        down = moe.shared_experts[0].down_proj.weight
        assert torch.equal(theirs[f"model.layers.{i}.mlp.shared_expert.down_proj.weight"], 2 * down)


def test_frozen_router_is_listed_as_dropped(exported):
    from upcycle.models.export import dropped_training_settings

    _, _, paths = exported
    model = AutoModelForCausalLM.from_pretrained(
        Path(paths["llama_mixtral_frozen_router"]).parent / "llama_mixtral_frozen_router-moe"
    )
    assert list(model.moe_layers()[0].router.parameters()) == []
    assert any("router_mode=frozen" in note for note in dropped_training_settings(model))


def test_exported_load_balancing_coefficient_has_our_strength(exported):
    """HF's load-balancing loss is k times ours (its token fractions sum to k), so the exported
    router_aux_loss_coef is our weight / k: per layer, coef · HF's loss = weight · our loss."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    _, _, paths = exported
    name = "llama_mixtral"  # top-2, MoE in every layer
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    ours = AutoModelForCausalLM.from_pretrained(paths[name] + "-moe").eval()
    theirs = AutoModelForCausalLM.from_pretrained(paths[name]).eval()
    with torch.no_grad():
        mine = ours(input_ids=ids).load_balancing_loss
        logits = theirs(input_ids=ids, output_router_logits=True).router_logits
    cfg = theirs.config
    per_layer = torch.stack(
        [load_balancing_loss_func((g,), cfg.num_local_experts, cfg.num_experts_per_tok) for g in logits]
    )
    weight = ours.config.moe["aux_loss_weight"]
    assert cfg.num_experts_per_tok == 2 and cfg.router_aux_loss_coef == pytest.approx(weight / 2)
    torch.testing.assert_close(
        cfg.router_aux_loss_coef * per_layer.mean(), weight * mine, rtol=1e-5, atol=1e-7
    )
