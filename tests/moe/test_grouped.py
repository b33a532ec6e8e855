"""The grouped expert path (upcycle.moe.grouped) and the stacked weight layout (ExpertList): the same
outputs and gradients as the module loop on every routing variant, no host synchronisation, and a layout
that survives conversions, loading, saving, copying and adapters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.moe.test_bank import EXPERTS, LoRALinear, pair
from tests.moe.test_routing import VARIANTS, check_against_reference, make
from upcycle.config import ConfigError
from upcycle.models.modeling import MoEGPT2Config, MoEGPT2LMHeadModel
from upcycle.moe import MoE, MoEConfig, MoEContext, bank, grouped, paths
from upcycle.moe.experts import ExpertList
from upcycle.moe.paths import expert_path_set, set_expert_path


@pytest.fixture
def taken(monkeypatch):
    """Which paths ran: 'grouped' per grouped call, 'bank' per parallel bank call."""
    calls = []
    run, parallel = grouped.run, bank.run_parallel
    monkeypatch.setattr(grouped, "run", lambda *a: calls.append("grouped") or run(*a))
    monkeypatch.setattr(bank, "MAX_IMBALANCE", float("inf"))
    monkeypatch.setattr(bank, "run_parallel", lambda *a: calls.append("bank") or parallel(*a))
    return calls


def run_path(moe, x, path, mask=None, workers=2):
    """Output, input gradient, parameter gradients and statistics of one forward+backward on ``path``."""
    moe.zero_grad(set_to_none=True)
    moe.stats.reset()
    x = x.clone().requires_grad_(True)
    with expert_path_set(path), bank.cpu_expert_workers_set(workers):
        y = moe(x, attention_mask=mask)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in moe.named_parameters()}
    return y.detach(), x.grad, grads, moe.stats.summary()


def assert_same(got, want, atol=1e-5):
    y, dx, grads, stats = got
    y0, dx0, grads0, stats0 = want
    torch.testing.assert_close(y, y0, atol=atol, rtol=1e-5)
    torch.testing.assert_close(dx, dx0, atol=atol, rtol=1e-5)
    assert grads.keys() == grads0.keys()
    for name in grads0:
        if grads0[name] is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grads0[name], atol=atol, rtol=1e-4, msg=name)
    assert stats == stats0


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_grouped_path_matches_dense_reference_on_every_variant(kw, taken):
    with expert_path_set("grouped"):
        check_against_reference(make(**kw))
    assert "grouped" in taken


@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_grouped_path_with_padding_fixed_and_frozen_routing(unit, taken):
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with expert_path_set("grouped"):
        check_against_reference(make(top_k=2, routing_unit=unit), mask=mask)
        check_against_reference(make(top_k=1, router_mode="fixed"), labels=torch.tensor([2, 0, 3]))
        check_against_reference(make(top_k=2, routing_unit=unit, router_mode="frozen"), mask=mask)
    assert taken == ["grouped"] * 3


@pytest.mark.parametrize("kw", EXPERTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity", [None, 0.6])
def test_every_path_computes_what_the_loop_computes(kw, top_k, capacity, taken):
    moe, x = pair(top_k=top_k, capacity_factor=capacity, num_shared_experts=1, **kw)
    mask = torch.ones(2, 150)
    mask[1, 100:] = 0
    want = run_path(moe, x, "loop", mask)
    assert not taken
    assert_same(run_path(moe, x, "grouped", mask), want)
    assert_same(run_path(moe, x, "bank", mask), want)
    assert taken == ["grouped", "bank"]


def test_global_routing_followers_on_the_grouped_path(taken):
    torch.manual_seed(0)

    def stack(path):
        torch.manual_seed(0)
        ctx = MoEContext()
        cfg = MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, top_k=2, global_routing=True)
        layers = [MoE(cfg, context=ctx) for _ in range(3)]
        x = torch.randn(2, 5, 16, requires_grad=True)
        with ctx.scope(), expert_path_set(path):
            h = x
            for layer in layers:
                h = h + layer(h)
        h.pow(2).sum().backward()
        return h.detach(), x.grad, [p.grad for layer in layers for p in layer.parameters()]

    h0, dx0, g0 = stack("loop")
    h1, dx1, g1 = stack("grouped")
    assert taken == ["grouped"] * 3
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx1, dx0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unused_experts_get_zero_gradients_and_frozen_ones_none(taken):
    moe, x = pair(top_k=1, num_experts=4)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = torch.tensor([50.0, -50.0])  # only experts 0 and 1 get tokens
    frozen = {"experts.0.up_proj.weight", "experts.1.down_proj.bias"}
    for name, p in moe.named_parameters():
        p.requires_grad_(name not in frozen)
    _, _, want, _ = run_path(moe, x, "loop")
    _, _, got, _ = run_path(moe, x, "grouped")
    assert taken == ["grouped"]
    for name, g in got.items():
        if name in frozen:
            assert g is None, name
        elif name.startswith(("experts.2.", "experts.3.")):
            assert g is not None and torch.count_nonzero(g) == 0, name  # DDP needs them, as zeros
        else:
            torch.testing.assert_close(g, want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_experts_in_its_dtype_and_the_router_in_float32(dtype, taken):
    moe, x = pair(top_k=2, expert_type="glu", expert_bias=True)
    results = {}
    for path in ("loop", "grouped"):
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        with expert_path_set(path), torch.autocast("cpu", dtype=dtype):
            y = moe(xx)
            assert y.dtype == dtype
            assert moe.last_routing.logits_UE.dtype == torch.float32
            assert all(v.dtype == torch.float32 for v in moe.aux_losses.values())
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[path] = (y.float(), xx.grad, {n: p.grad for n, p in moe.named_parameters()})
    assert taken == ["grouped"]
    (y0, dx0, g0), (y1, dx1, g1) = results["loop"], results["grouped"]
    torch.testing.assert_close(y1, y0, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(dx1, dx0, atol=3e-2, rtol=3e-2)
    for name in g0:
        assert g1[name].dtype == torch.float32, name
        torch.testing.assert_close(g1[name], g0[name], atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("path", ["loop", "bank", "grouped"])
def test_empty_batch_no_grad_inference_and_checkpointing(path, taken):
    moe, x = pair(top_k=2, expert_type="glu")
    empty = torch.zeros(0, 32, requires_grad=True)
    with expert_path_set(path), bank.cpu_expert_workers_set(2):
        moe(empty).sum().backward()  # every expert still gets a (zero) gradient
        assert all(p.grad is not None and not p.grad.any() for p in moe.experts.parameters())
        with torch.no_grad():
            y_ng = moe(x)
        with torch.inference_mode():
            y_inf = moe(x)
    want = run_path(moe, x, "loop")
    torch.testing.assert_close(y_ng, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_inf, want[0], atol=1e-5, rtol=1e-5)
    for reentrant in (False, True):
        moe.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        with expert_path_set(path), bank.cpu_expert_workers_set(2):
            y = torch.utils.checkpoint.checkpoint(moe, xr, use_reentrant=reentrant)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        torch.testing.assert_close(xr.grad, want[1], atol=1e-5, rtol=1e-5)
        for name, p in moe.named_parameters():
            torch.testing.assert_close(p.grad, want[2][name], atol=1e-5, rtol=1e-4, msg=name)
    if path != "loop":
        assert path in taken


# ------------------------------------------------------------------------------------- synchronisation
class HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (item, bool, nonzero, ...)."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_grouped_forward_and_backward_never_read_values_on_the_host(capacity, monkeypatch, taken):
    moe, x = pair(top_k=2, expert_type="glu", capacity_factor=capacity)
    mask = torch.ones(2, 150)
    mask[0, 120:] = 0
    tolist = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist.append(t.shape) or real_tolist(t))
    x = x.requires_grad_(True)
    with expert_path_set("grouped"), HostReads() as reads:
        y = moe(x, attention_mask=mask)
        (y * y).sum().backward()
    assert taken == ["grouped"]
    assert reads.seen == [] and tolist == []
    with expert_path_set("loop"), HostReads() as reads:
        moe(x, attention_mask=mask)
    assert tolist or reads.seen  # the check sees the loop's host reads


# ------------------------------------------------------------------------------------------- selection
def test_auto_keeps_the_bank_on_cpu_and_picks_grouped_on_cuda(taken, monkeypatch):
    moe, x = pair(top_k=1)
    with bank.cpu_expert_workers_set(2):
        moe(x)
    assert taken == ["bank"]
    assert paths.resolve(None, torch.device("cuda")) == "grouped"
    assert paths.resolve(None, torch.device("cpu")) == "bank"
    moe.expert_path = "grouped"  # a layer's own setting wins
    moe(x)
    assert taken == ["bank", "grouped"]
    monkeypatch.setenv("UPCYCLE_EXPERT_PATH", "loop")
    assert paths.expert_path() == "loop"
    monkeypatch.setenv("UPCYCLE_EXPERT_PATH", "fast")
    with pytest.raises(ConfigError, match="UPCYCLE_EXPERT_PATH.*auto, loop, bank, grouped"):
        paths.expert_path()
    with pytest.raises(ConfigError, match="expert_path"):
        set_expert_path("gpu")


def test_hooks_adapters_and_mixed_dtypes_keep_the_module_loop(taken):
    moe, x = pair(top_k=1)
    seen = []
    handle = moe.experts[1].up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with expert_path_set("grouped"):
        moe(x)
    handle.remove()
    assert seen and not taken

    with expert_path_set("grouped"):
        want = moe(x)
    assert taken == ["grouped"]
    old = moe.experts[0].up_proj
    moe.experts[0].up_proj = LoRALinear(old.in_features, old.out_features)
    moe.experts[0].up_proj.load_state_dict(old.state_dict())
    with expert_path_set("grouped"):
        got = moe(x)
    assert taken == ["grouped"] and not torch.allclose(got, want)  # the adapter's forward ran
    with expert_path_set("grouped"), pytest.raises(RuntimeError):
        pair(top_k=1)[0](x.double())  # PyTorch's own dtype error, as on the loop


# ---------------------------------------------------------------------------------------------- layout
def is_tied(experts: ExpertList) -> bool:
    return bool(experts.stacks) and experts.is_tied()


def test_expert_parameters_are_views_into_one_stack_per_projection():
    moe, _ = pair(top_k=1, expert_type="glu", expert_bias=True, num_experts=3)
    assert is_tied(moe.experts)
    gate_up, down = moe.experts.stacks
    assert gate_up.weight.shape == (3, 96, 32) and gate_up.bias.shape == (3, 96)
    assert down.weight.shape == (3, 32, 48)
    with torch.no_grad():
        moe.experts[2].up_proj.weight.fill_(7.0)  # an optimizer step or an initialiser writes in place
    assert (gate_up.weight[2, 48:] == 7.0).all() and not (gate_up.weight[2, :48] == 7.0).any()
    torch.testing.assert_close(down.bias[1], moe.experts[1].down_proj.bias)
    # Checkpoint keys stay per expert; the stacks are not parameters or buffers.
    keys = set(moe.state_dict())
    assert "experts.1.gate_proj.weight" in keys and not any("stack" in k for k in keys)
    assert sum(p.numel() for p in moe.experts.parameters()) == 3 * (2 * 48 * 33 + 32 * 49)


def test_conversions_deepcopy_and_assign_loading_re_tie_once(taken):
    moe, x = pair(top_k=2)
    clone = copy.deepcopy(moe)
    assert is_tied(clone.experts)
    with torch.no_grad():
        clone.experts[0].up_proj.weight.zero_()
    assert moe.experts[0].up_proj.weight.abs().sum() > 0  # independent storage
    moe = moe.to(torch.float64)
    assert is_tied(moe.experts) and moe.experts.stacks[0].weight.dtype == torch.float64
    moe = moe.float()
    assert is_tied(moe.experts) and moe.experts.stacks[0].weight.dtype == torch.float32
    assert_same(run_path(moe, x, "grouped"), run_path(moe, x, "loop"))
    fresh = pair(top_k=2, seed=5)[0]
    fresh.load_state_dict(moe.state_dict(), assign=True)  # replaces the parameters
    assert is_tied(fresh.experts)
    torch.testing.assert_close(run_path(fresh, x, "grouped")[0], run_path(moe, x, "loop")[0])


def test_replaced_parameters_are_re_tied_and_a_storage_rebinding_wrapper_is_left_alone(taken):
    moe, x = pair(top_k=1)
    want = run_path(moe, x, "loop")
    w = moe.experts[3].down_proj.weight
    moe.experts[3].down_proj.weight = nn.Parameter(w.detach().clone())  # as a loader would
    assert_same(run_path(moe, x, "grouped"), want)  # the new parameter gets its gradient
    assert is_tied(moe.experts) and taken == ["grouped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_path(moe, x, "grouped")  # tied: no warning
    with pytest.warns(UserWarning, match="one after another"):
        for _ in range(3):  # something rebinds a parameter's storage before every forward
            p = moe.experts[0].up_proj.weight
            p.data = p.data.clone()
            got = run_path(moe, x, "grouped")
    assert_same(got, want)
    assert taken == ["grouped"] * 3  # one re-tie, then the loop
    moe.experts.tie()
    run_path(moe, x, "grouped")
    assert taken == ["grouped"] * 4


def test_state_dict_copies_save_with_safetensors_and_keep_every_expert(tmp_path):
    from accelerate.utils.other import clean_state_dict_for_safetensors

    moe, _ = pair(top_k=1)
    state = moe.state_dict()
    save_file(state, tmp_path / "moe.safetensors")  # raises on tensors sharing storage
    kept = clean_state_dict_for_safetensors(dict(state))  # drops all but one tensor per storage
    assert kept.keys() == state.keys()
    assert isinstance(moe.state_dict(keep_vars=True)["experts.0.up_proj.weight"], nn.Parameter)


def tiny_moe_model(seed=0, **moe):
    torch.manual_seed(seed)
    cfg = MoEGPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, moe_layers=[1],
        moe=dict(intermediate_size=48, num_experts=4, top_k=2, **moe),
    )  # fmt: skip
    return MoEGPT2LMHeadModel(cfg)


def test_checkpoint_round_trip_keeps_per_expert_keys_and_is_tied_before_any_forward(tmp_path, taken):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = tiny_moe_model().eval()
    ids = torch.randint(0, 64, (2, 12))
    with expert_path_set("loop"):
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The same per-expert keys as checkpoints written before the stacked layout: older versions load it.
    assert {f"transformer.h.1.mlp.experts.{e}.up_proj.weight" for e in range(4)} <= keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert is_tied(loaded.transformer.h[1].mlp.experts)  # from_pretrained's eval() re-tied it
    with expert_path_set("grouped"):
        got = loaded(ids).logits
    assert taken == ["grouped"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_pretrained_writes_the_experts_without_copying_them_and_ties_them_again(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    model = tiny_moe_model().eval()
    experts = model.transformer.h[1].mlp.experts
    written = {}

    def recording_save(tensors, filename, metadata=None):
        # Each saved expert tensor must be the parameter's own storage at that moment, not a copy.
        own = {p.data_ptr() for p in experts.parameters()}
        written.update({k: t.data_ptr() in own for k, t in tensors.items() if ".experts." in k})
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mu, "safe_save_file", recording_save)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert len(written) == 4 * 4 and all(written.values())  # 4 experts × (2 weights + 2 biases)
    assert is_tied(experts)  # stacked again after the save
    assert experts.grouped_parameters() is not None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------ in-place modification
@pytest.mark.parametrize("path", ["loop", "bank", "grouped"])
def test_in_place_weight_change_between_forward_and_backward_raises(path, taken):
    moe, x = pair(top_k=2)
    with expert_path_set(path), bank.cpu_expert_workers_set(2):
        y = moe(x.requires_grad_(True))
    assert taken == ([] if path == "loop" else [path])
    with torch.no_grad():
        moe.experts[1].down_proj.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ------------------------------------------------------------------------------ padding and capacity
@pytest.mark.parametrize("path", ["loop", "bank", "grouped"])
def test_padding_never_takes_capacity_from_real_tokens(path, taken):
    """Issue 10: with a capacity factor, padding is masked out of dispatch, not only out of statistics:
    real tokens' outputs equal those of the unpadded batch."""
    torch.manual_seed(0)
    moe = make(top_k=2, capacity_factor=0.5)
    real = torch.randn(1, 10, 16)
    with expert_path_set(path), bank.cpu_expert_workers_set(2):
        want = moe(real)
        want_stats = moe.stats.summary()
        moe.stats.reset()
        # Left padding: by position it would come first in every expert's queue.
        padded = torch.cat([torch.randn(1, 6, 16), real], 1)
        mask = torch.tensor([[0] * 6 + [1] * 10])
        got = moe(padded, attention_mask=mask)
    torch.testing.assert_close(got[:, 6:], want, atol=1e-6, rtol=1e-6)
    assert moe.stats.summary() == want_stats
    assert want_stats["dropped"] > 0  # the capacity binds


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
    reason="needs an sm90/sm100 GPU (PyTorch's grouped bf16 kernel; elsewhere grouped_mm synchronises)",
)
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_cuda_bf16_grouped_path_never_synchronises_and_matches_the_loop(capacity, taken):
    moe, x = pair(top_k=2, expert_type="glu", capacity_factor=capacity, num_shared_experts=1)
    moe, x = moe.cuda(), x.cuda()
    mask = torch.ones(2, 150, device="cuda")
    mask[1, 120:] = 0
    results = {}
    for path in ("loop", "auto"):
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        torch.cuda.synchronize()
        if path == "auto":
            torch.cuda.set_sync_debug_mode("error")  # a device-to-host copy or sync raises
        try:
            with expert_path_set(path), torch.autocast("cuda", dtype=torch.bfloat16):
                y = moe(xx, attention_mask=mask)
            (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results[path] = (y.float(), xx.grad, {n: p.grad for n, p in moe.named_parameters()})
    assert taken == ["grouped"]
    (y0, dx0, g0), (y1, dx1, g1) = results["loop"], results["auto"]
    torch.testing.assert_close(y1, y0, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(dx1, dx0, atol=3e-2, rtol=3e-2)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=5e-2, rtol=5e-2, msg=name)
