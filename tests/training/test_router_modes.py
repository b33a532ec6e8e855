"""Router modes through the user's path: convert → save → from_pretrained → `upcycle pretrain` → load.

A frozen or random router must come out of training byte-identical (Fan et al.'s "Frozen" and "Random"
ablations), a learned one must have moved, and the experts must have trained in every mode.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.training.conftest import tiny_config
from upcycle.training import pretrain
from upcycle.upcycling import UpcycleConfig, convert


def router_and_experts(model) -> tuple[dict, dict]:
    state = model.state_dict()
    router = {k: v.clone() for k, v in state.items() if ".router." in k}
    experts = {k: v.clone() for k, v in state.items() if ".experts." in k}
    return router, experts


@pytest.mark.parametrize(
    "mode,router_type", [("learned", "linear"), ("frozen", "linear"), ("frozen", "mlp"), ("random", "mlp")]
)
def test_router_mode_survives_save_load_and_training(corpus, dense_dir, tmp_path, mode, router_type):
    out = tmp_path / "moe"
    moe = {"router_mode": mode, "router_type": router_type}
    convert(
        UpcycleConfig(
            model=[dense_dir], method="drop", ratio=0.15, experts=4, top_k=2, moe=moe, out=str(out)
        ),
        progress=False,
    )
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trainable_router = [n for n, p in loaded.named_parameters() if ".router." in n and p.requires_grad]
    assert bool(trainable_router) == (mode == "learned")
    router0, experts0 = router_and_experts(loaded)
    assert router0

    result = pretrain(tiny_config(corpus, tmp_path / "run", model=str(out), steps=2, eval_every=0))
    router1, experts1 = router_and_experts(AutoModelForCausalLM.from_pretrained(result.final_dir))
    assert router1.keys() == router0.keys()
    if mode == "learned":
        assert any(not torch.equal(router1[k], router0[k]) for k in router0)
    else:
        for k, v in router0.items():
            assert torch.equal(router1[k], v), k
    assert sum(not torch.equal(experts1[k], v) for k, v in experts0.items()) > len(experts0) // 2


def test_fixed_routing_survives_save_load_and_trains_only_the_labelled_experts(dense_dir, tmp_path):
    out = tmp_path / "moe"
    convert(
        UpcycleConfig(
            model=[dense_dir], method="naive", experts=4, top_k=1, layers="all", moe={"router_mode": "fixed"},
            out=str(out),
        ),
        progress=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(".router." in k for k in model.state_dict())
    _, experts0 = router_and_experts(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)  # zero grad: no step
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])  # each sequence's expert (e.g. its language)
    for _ in range(2):
        model(input_ids=ids, labels=ids, sequence_labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    _, experts1 = router_and_experts(model)
    moved = {
        int(k.split(".experts.")[1].split(".")[0])
        for k in experts0
        if not torch.equal(experts1[k], experts0[k])
    }
    assert moved == {1, 3}
