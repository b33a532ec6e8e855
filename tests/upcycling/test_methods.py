"""Initialisation methods: exact properties of naive, drop, granular, noise, scratch and btx."""

from __future__ import annotations

import math

import pytest
import torch

from tests.upcycling.conftest import tiny_gpt2, tiny_llama
from upcycle.upcycling import DenseMLP, Source, UpcycleConfig, upcycle_model


def up(model, **kw):
    opts = UpcycleConfig(model=["in-memory"], **kw)
    return upcycle_model(opts, sources=[Source("in-memory", model.eval(), None)], progress=False)


def logits(model, seed=0, batch=2, length=16):
    ids = torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def dense_mlp(model, layer):
    base = model.base_model
    blocks = base.h if hasattr(base, "h") else base.layers
    return DenseMLP.from_module(blocks[layer].mlp)


# ----------------------------------------------------------------------------- naive


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("top_k,score_order", [(1, "softmax_topk"), (2, "softmax_topk"), (2, "topk_softmax")])
def test_naive_with_renormalised_topk_preserves_the_function(family, top_k, score_order):
    dense = tiny_gpt2() if family == "gpt2" else tiny_llama()
    result = up(dense, method="naive", top_k=top_k, score_order=score_order, renormalize=True, layers="all")
    torch.testing.assert_close(logits(result.model), logits(dense), atol=2e-5, rtol=1e-5)
    assert result.function_preservation["max_abs_logit_diff"] < 2e-5


def test_switch_style_top1_does_not_preserve_and_says_so():
    dense = tiny_gpt2()
    result = up(dense, method="naive", top_k=1, renormalize=False, experts=8)
    assert result.function_preservation["max_abs_logit_diff"] > 1e-3
    assert "Switch-style" in result.report_line()
    # Weight scaling by E/k brings it back close to the dense model (router ≈ uniform at N(0, 0.02)).
    scaled = up(dense, method="naive", top_k=1, renormalize=False, experts=8, weight_scaling=True)
    assert (
        scaled.function_preservation["max_abs_logit_diff"]
        < result.function_preservation["max_abs_logit_diff"] / 5
    )


def test_top1_with_weights_that_sum_to_one_says_the_router_gets_no_lm_gradient():
    dense = tiny_gpt2()
    line = up(dense, method="naive", top_k=1, renormalize=True).report_line()
    assert "no gradient from the LM loss" in line and "\n" not in line
    both = up(dense, method="naive", top_k=1, renormalize=False).report_line()
    assert "Switch-style" in both and "no gradient" not in both
    assert "no gradient" not in up(dense, method="naive", top_k=2).report_line()
    # A frozen router learns nothing anyway: no note.
    assert (
        "no gradient" not in up(dense, method="naive", top_k=1, moe={"router_mode": "frozen"}).report_line()
    )


def test_sequence_routing_warns_that_it_sees_the_future():
    dense = tiny_gpt2()
    result = up(dense, method="naive", top_k=2, moe={"routing_unit": "sequence"})
    assert "depend on later tokens" in result.report_line() and "sequence_prefix" in result.report_line()
    assert result.model.config.upcycling["function_preservation"]["routing_sees_future_tokens"] is True
    prefix = up(dense, method="naive", top_k=2, moe={"routing_unit": "sequence_prefix"})
    assert "later tokens" not in prefix.report_line()
    # Fan et al.'s second softmax sums to one: naive upcycling with sequence units preserves the function.
    assert prefix.function_preservation["max_abs_logit_diff"] < 2e-5


@pytest.mark.parametrize("name", ["drop-upcycling", "drop-upcycling-noise"])
def test_drop_upcycling_presets_use_the_papers_router_init(name):
    from upcycle.upcycling.convert import options_from

    opts = options_from(name, model=["in-memory"])
    assert opts.router_init == "uniform:0.0346"
    result = upcycle_model(opts, sources=[Source("in-memory", tiny_llama().eval(), None)], progress=False)
    w = torch.cat([m.router.weight.detach().flatten() for m in result.model.moe_layers().values()])
    assert float(w.abs().max()) <= 0.0346
    assert abs(float(w.std()) - 0.02) < 0.002  # U(-a, a) has std a/√3 = 0.02
    if name == "drop-upcycling-noise":
        assert (opts.method, opts.noise_mode, opts.noise_std, opts.noise_fraction) == (
            "noise",
            "units",
            0.02,
            0.5,
        )


def test_non_mlp_weights_are_copied_unchanged():
    dense = tiny_llama()
    moe = up(dense, method="drop", ratio=0.5, layers="every_other").model
    moe_state = moe.state_dict()
    for name, t in dense.state_dict().items():
        if ".mlp." in name and int(name.split(".")[2]) in (1, 3):
            continue
        assert torch.equal(moe_state[name], t), name
    assert list(moe.moe_layers()) == [1, 3]


# ----------------------------------------------------------------------------- drop


def wide_gpt2():
    return tiny_gpt2(n_embd=64, n_inner=512, n_layer=2)


def changed_units(expert_w_FD, dense_w_FD):
    return set(torch.nonzero((expert_w_FD != dense_w_FD).any(1)).flatten().tolist())


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_drop_reinitialises_exactly_floor_r_dff_shared_units(ratio):
    dense = wide_gpt2()
    F_ = 512
    n = math.floor(ratio * F_)
    result = up(dense, method="drop", ratio=ratio, layers="all", experts=4, top_k=1)
    d = dense_mlp(dense, 0)
    sets = []
    for e, expert in enumerate(result.model.moe_layers()[0].experts):
        recorded = result.layer_info[0]["dropped"][e]
        S = set(recorded["up"].tolist())
        assert len(S) == n
        assert changed_units(expert.up_proj.weight, d.up) == S
        # 'expert' index sharing: the output projection's dropped columns are the same units.
        assert changed_units(expert.down_proj.weight.t(), d.down.t()) == S
        assert set(recorded["down"].tolist()) == S
        # Untouched units are byte-identical to the dense MLP (weights, c_fc bias, c_proj bias).
        keep = torch.tensor(sorted(set(range(F_)) - S))
        assert torch.equal(expert.up_proj.weight[keep], d.up[keep])
        assert torch.equal(expert.up_proj.bias[keep], d.up_bias[keep])
        assert torch.equal(expert.down_proj.weight[:, keep], d.down[:, keep])
        assert torch.equal(expert.down_proj.bias, d.down_bias)
        sets.append(S)
    assert all(sets[i] != sets[j] for i in range(4) for j in range(i + 1, 4)), (
        "experts must drop different units"
    )


def heterogeneous_llama(seed: int = 0):
    """A tiny Llama whose MLP units have very different scales and means, as trained ones do: the
    statistics of a dropped subset then differ from those of the whole matrix."""
    dense = tiny_llama(intermediate_size=256)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dense.model.layers:
            mlp = layer.mlp
            F_ = mlp.up_proj.weight.shape[0]
            scale = torch.exp(torch.randn(F_, generator=g) * 1.5)  # log-normal unit scales
            shift = torch.randn(F_, generator=g) * 0.01
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                w.mul_(scale.view(-1, 1)).add_(shift.view(-1, 1))
            mlp.down_proj.weight.mul_(scale.view(1, -1)).add_(shift.view(1, -1))
    return dense


def test_drop_reinitialised_values_follow_the_dropped_weights_statistics():
    """Redrawn weights follow N(mean, std) of the dropped weights of each matrix (gate, up and down), not
    of the whole matrix; unit scales differ, so the two are told apart."""
    dense = heterogeneous_llama()
    result = up(dense, method="drop", ratio=0.5, layers="all", experts=4, top_k=1, index_sharing="matrix")
    d = dense_mlp(dense, 1)
    told_apart = 0
    for e, expert in enumerate(result.model.moe_layers()[1].experts):
        expert.requires_grad_(False)
        sets = result.layer_info[1]["dropped"][e]
        pairs = {
            "gate": (expert.gate_proj.weight[sets["gate"]], d.gate[sets["gate"]], d.gate),
            "up": (expert.up_proj.weight[sets["up"]], d.up[sets["up"]], d.up),
            "down": (expert.down_proj.weight[:, sets["down"]], d.down[:, sets["down"]], d.down),
        }
        for name, (new, old, whole) in pairs.items():
            std, mean = torch.std_mean(old.float())
            whole_std, whole_mean = torch.std_mean(whole.float())
            got_std, got_mean = torch.std_mean(new.float())
            n = new.numel()
            assert abs(float(got_mean - mean)) < 5 * float(std) / math.sqrt(n), (e, name)
            assert abs(float(got_std / std) - 1) < 0.05, (e, name)
            if abs(float(std / whole_std) - 1) > 0.15:
                told_apart += 1
                assert abs(float(got_std / whole_std) - 1) > 0.08, (e, name)
    assert told_apart >= 3, "the test model does not tell dropped-weight statistics from whole-matrix ones"


def test_drop_redraws_dropped_gpt2_biases():
    dense = wide_gpt2()
    result = up(dense, method="drop", ratio=0.5, layers="all", experts=2, top_k=1)
    d = dense_mlp(dense, 1)
    for e, expert in enumerate(result.model.moe_layers()[1].experts):
        S = result.layer_info[1]["dropped"][e]["up"]
        # Dropped c_fc biases are redrawn from the dropped biases' statistics too.
        assert not torch.equal(expert.up_proj.bias[S], d.up_bias[S])


def test_drop_matrix_sharing_samples_each_matrix_separately():
    dense = tiny_llama(intermediate_size=256)
    result = up(dense, method="drop", ratio=0.25, index_sharing="matrix", layers="all", experts=2)
    d = dense_mlp(dense, 0)
    expert = result.model.moe_layers()[0].experts[0]
    gate = changed_units(expert.gate_proj.weight, d.gate)
    upu = changed_units(expert.up_proj.weight, d.up)
    down = changed_units(expert.down_proj.weight.t(), d.down.t())
    assert len(gate) == len(upu) == len(down) == 64
    assert gate != upu and upu != down


def test_drop_ratio_zero_equals_naive_and_one_redraws_every_unit():
    dense = tiny_llama()
    naive = up(dense, method="naive", seed=3)
    zero = up(dense, method="drop", ratio=0.0, seed=3)
    for (n1, p1), (n2, p2) in zip(naive.model.state_dict().items(), zero.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    full = up(dense, method="drop", ratio=1.0)
    d = dense_mlp(dense, 2)
    for expert in full.model.moe_layers()[2].experts:
        assert changed_units(expert.gate_proj.weight, d.gate) == set(range(64))
        assert changed_units(expert.down_proj.weight.t(), d.down.t()) == set(range(64))


def test_same_seed_same_checkpoint_different_seed_different():
    dense = tiny_gpt2()
    a = up(dense, method="drop", ratio=0.3, seed=7).model.state_dict()
    b = up(dense, method="drop", ratio=0.3, seed=7).model.state_dict()
    c = up(dense, method="drop", ratio=0.3, seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- granular


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_granular_initial_output_matches_dense(family, G):
    dense = tiny_gpt2() if family == "gpt2" else tiny_llama()
    E, k = 4 * G, 2 * G
    # Renormalised scores: the scaled virtual groups reproduce the dense MLP exactly (float precision).
    exact = up(dense, method="granular", granularity=G, experts=E, top_k=k, renormalize=True)
    torch.testing.assert_close(logits(exact.model), logits(dense), atol=5e-5, rtol=1e-5)
    moe = exact.model.moe_layers()[0]
    assert moe.config.intermediate_size == dense_mlp(dense, 0).intermediate_size // G
    # Router rows are repeated within each virtual group of G experts.
    w = moe.router.weight
    for g in range(E // G):
        assert all(torch.equal(w[g * G], w[g * G + s]) for s in range(G))
    # Raw softmax probabilities: the scale assumes a uniform router, so the match is approximate;
    # documented tolerance: mean KL below 1e-3 with the default N(0, 0.02) router.
    approx = up(dense, method="granular", granularity=G, experts=E, top_k=k, renormalize=False)
    assert approx.function_preservation["mean_kl"] < 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_granular_with_an_mlp_router_keeps_virtual_groups(family):
    dense = tiny_gpt2() if family == "gpt2" else tiny_llama()
    result = up(dense, method="granular", granularity=2, experts=8, top_k=4, moe={"router_type": "mlp"})
    router = result.model.moe_layers()[0].router
    assert router.hidden is not None
    for g in range(4):
        assert torch.equal(router.weight[2 * g], router.weight[2 * g + 1])
    torch.testing.assert_close(logits(result.model), logits(dense), atol=5e-5, rtol=1e-5)
    assert result.function_preservation["max_abs_logit_diff"] < 1e-4


def test_granular_rejects_non_dividing_granularity():
    from upcycle.config import ConfigError

    with pytest.raises(ConfigError, match="granularity"):
        up(tiny_gpt2(), method="granular", granularity=3, experts=6, top_k=3)  # d_ff = 128


# ----------------------------------------------------------------------------- noise, scratch, btx


def test_noise_units_perturbs_whole_units_per_matrix_as_the_drop_upcycling_baseline():
    dense = tiny_llama(intermediate_size=256)
    result = up(dense, method="noise", noise_mode="units", noise_std=0.02, noise_fraction=0.5, experts=2)
    d = dense_mlp(dense, 0)
    for e, expert in enumerate(result.model.moe_layers()[0].experts):
        sets = result.layer_info[0]["perturbed_units"][e]
        changed = {
            "gate": changed_units(expert.gate_proj.weight, d.gate),
            "up": changed_units(expert.up_proj.weight, d.up),
            "down": changed_units(expert.down_proj.weight.t(), d.down.t()),
        }
        for name, units in changed.items():
            assert units == set(sets[name].tolist()) and len(units) == 128, name
        assert changed["gate"] != changed["up"] != changed["down"]  # sampled per matrix
        # Every entry of a perturbed unit moved, by N(0, 0.02).
        S = sets["up"]
        diff = expert.up_proj.weight[S] - d.up[S]
        assert bool((diff != 0).all())
        assert abs(float(diff.std()) - 0.02) < 0.002 and abs(float(diff.mean())) < 0.002
    assert result.model.config.upcycling["options"]["noise_mode"] == "units"


def test_noise_perturbs_the_requested_fraction():
    dense = tiny_llama(intermediate_size=256)
    result = up(dense, method="noise", noise_std=0.01, noise_fraction=0.3, experts=2)
    d = dense_mlp(dense, 0)
    expert = result.model.moe_layers()[0].experts[1]
    changed = (expert.up_proj.weight != d.up).float().mean()
    assert abs(float(changed) - 0.3) < 0.03
    diff = (expert.up_proj.weight - d.up)[expert.up_proj.weight != d.up]
    assert abs(float(diff.std()) - 0.01) < 0.002


def test_scratch_experts_are_random_with_the_init_std():
    dense = tiny_gpt2(n_embd=64, n_inner=256)
    moe = up(dense, method="scratch").model.moe_layers()[0]
    w = torch.cat([e.up_proj.weight.flatten() for e in moe.experts])
    assert abs(float(w.std()) - dense.config.initializer_range) < 0.002
    assert all(float(e.down_proj.bias.abs().max()) == 0 for e in moe.experts)


def test_btx_takes_experts_round_robin_and_averages_the_rest():
    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    opts = UpcycleConfig(model=["a", "b"], method="btx", experts=4, top_k=2)
    result = upcycle_model(opts, sources=[Source("a", a, None), Source("b", b, None)], progress=False)
    moe_model = result.model
    da, db = dense_mlp(a, 0), dense_mlp(b, 0)
    experts = moe_model.moe_layers()[0].experts
    assert torch.equal(experts[0].up_proj.weight, da.up) and torch.equal(experts[2].up_proj.weight, da.up)
    assert torch.equal(experts[1].up_proj.weight, db.up) and torch.equal(experts[3].up_proj.weight, db.up)
    avg = (a.transformer.h[0].attn.c_attn.weight + b.transformer.h[0].attn.c_attn.weight) / 2
    torch.testing.assert_close(moe_model.transformer.h[0].attn.c_attn.weight, avg)
    torch.testing.assert_close(
        moe_model.transformer.wte.weight, (a.transformer.wte.weight + b.transformer.wte.weight) / 2
    )


def test_shared_experts_start_as_dense_copies():
    dense = tiny_llama()
    moe = up(dense, method="drop", shared_experts=1, moe={"shared_expert_gate": True}).model.moe_layers()[0]
    d = dense_mlp(dense, 0)
    assert torch.equal(moe.shared_experts[0].gate_proj.weight, d.gate)
    assert torch.equal(moe.shared_experts[0].down_proj.weight, d.down)
