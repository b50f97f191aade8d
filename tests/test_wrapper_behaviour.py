"""The wrapper's own promises beyond the clip: torch's optimizer hooks around state dicts, and
the error of ``nonfinite="raise"`` naming exactly the parameters at fault."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer, SpikeSkip


def _params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))]


def _backward(params):
    sum((p * (i + 1)).pow(2).sum() for i, p in enumerate(params)).backward()


# -- state dict hooks -------------------------------------------------------------------------------
def _hooked(opt, calls):
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save-pre", o)))

    def save_post(o, sd):
        calls.append(("save-post", o))
        return {**sd, "note": "post"}  # a hook may return a new state dict

    def load_pre(o, sd):
        calls.append(("load-pre", o))
        sd = dict(sd)
        sd.pop("note", None)
        return sd

    opt.register_state_dict_post_hook(save_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o)))


@pytest.mark.parametrize("wrap", [False, True], ids=["torch", "wrapped"])
def test_state_dict_hooks_run_as_on_a_torch_optimizer(wrap):
    params = _params()
    inner = torch.optim.Adam(params, lr=0.1)
    opt = ClippedOptimizer(inner, max_norm=1.0) if wrap else inner
    calls: list = []
    _hooked(opt, calls)
    _backward(params)
    opt.step()
    sd = opt.state_dict()
    assert sd["note"] == "post"
    assert [name for name, _ in calls] == ["save-pre", "save-post"]
    assert all(o is opt for _, o in calls)
    opt.load_state_dict(sd)  # the pre hook drops "note", or torch would not care either way
    assert [name for name, _ in calls] == ["save-pre", "save-post", "load-pre", "load-post"]
    assert all(o is opt for _, o in calls)
    if wrap:
        assert int(opt.state["clip"]["steps"]) == 1


def test_a_load_pre_hook_can_rewrite_the_checkpoint():
    params = _params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), max_norm=1.0)
    _backward(params)
    opt.step()
    sd = opt.state_dict()

    def rewrite(o, state_dict):
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        state_dict["state"]["clip"] = {**state_dict["state"]["clip"], "steps": torch.tensor(41)}
        return state_dict

    fresh = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), max_norm=1.0)
    fresh.register_load_state_dict_pre_hook(rewrite)
    fresh.load_state_dict(sd)
    assert int(fresh.state["clip"]["steps"]) == 41
    assert int(sd["state"]["clip"]["steps"]) == 1


# -- nonfinite="raise" names the parameters ---------------------------------------------------------
def test_raise_names_only_the_nonfinite_parameters_half_precision_included():
    # A large but finite fp16 gradient: its norm overflows fp16, not the float32 the step uses.
    big = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    bad = nn.Parameter(torch.zeros(3))
    fine = nn.Parameter(torch.zeros(2))
    big.grad = torch.full((1000,), 300.0, dtype=torch.float16)
    bad.grad = torch.tensor([1.0, float("nan"), 0.0])
    fine.grad = torch.ones(2)
    opt = ClippedOptimizer(torch.optim.SGD([big, bad, fine], lr=0.1), nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"by index in optimizer order: \[1\]"):
        opt.step()
    assert torch.equal(big.grad, torch.full((1000,), 300.0, dtype=torch.float16))


@pytest.mark.parametrize("norm_type,named", [(2.0, [2, 3]), (math.inf, [3])], ids=["2", "inf"])
def test_raise_measures_each_parameter_as_the_step_does(norm_type, named):
    # A parameter is named only if its own norm, in the step's norm_type and in the precision
    # the step measures it in (float32 for half precision, its own dtype otherwise), is NaN/Inf.
    grads = [
        torch.full((1000,), 3000.0, dtype=torch.float16),  # norm 94868: past fp16's largest, not float32's
        torch.full((3,), 1e100, dtype=torch.float64),  # norm 1.7e100: past float32's largest
        torch.full((2,), 3e38),  # its 2-norm overflows float32, its inf-norm does not
        torch.tensor([1.0, math.nan]),
    ]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), nonfinite="raise", norm_type=norm_type)
    with pytest.raises(FloatingPointError, match=re.escape(f"by index in optimizer order: {named}. Use")):
        opt.step()


def test_raise_names_a_sparse_gradient():
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 1, 3])).sum().backward()
    emb.weight.grad = emb.weight.grad.coalesce()
    emb.weight.grad._values()[0, 0] = float("inf")
    other = nn.Parameter(torch.zeros(2))
    other.grad = torch.ones(2)
    opt = ClippedOptimizer(torch.optim.SGD([other, emb.weight], lr=0.1), nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"by index in optimizer order: \[1\]"):
        opt.step()


def test_raise_says_when_only_the_global_norm_overflowed():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    for p in params:
        p.grad = torch.full((1,), 3e38)  # each finite; their 2-norm is not, in float32
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), nonfinite="raise")
    with pytest.raises(
        FloatingPointError,
        match=r"at step 1;.*none alone: the global norm overflowed\. Use nonfinite='skip' to skip such steps instead\.$",
    ):
        opt.step()
    assert int(opt.state["clip"]["steps"]) == 0  # a step that raised is not recorded


# -- the skip decision ------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [False, True], ids=["torch", "wrapped"])
def test_a_grad_scaler_overflow_skips_even_if_the_gradients_were_cleaned(wrap):
    """GradScaler decides on what it found when it unscaled: replacing the inf afterwards (as
    ``nan_to_num_`` would) does not make the step proceed, with or without the wrapper."""
    params = _params()
    inner = torch.optim.SGD(params, lr=0.1)
    opt = ClippedOptimizer(inner, max_norm=1.0) if wrap else inner
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(sum(p.pow(2).sum() for p in params)).backward()
    params[0].grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    for p in params:
        p.grad.nan_to_num_(posinf=0.0)
    weights = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert scaler.get_scale() == 2.0**7
    if wrap:
        clip = opt.state["clip"]
        assert (int(clip["steps"]), int(clip["skipped_steps"]), int(clip["nonfinite_steps"])) == (1, 1, 0)


def test_a_skipped_step_does_not_enter_the_spike_window():
    p = nn.Parameter(torch.zeros(2))
    unclipped = nn.Parameter(torch.zeros(2))
    groups = [{"params": [p]}, {"params": [unclipped], "clip": False}]
    opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.0), max_norm=1.0, skip_spikes=SpikeSkip(window=20))
    for i in range(3):
        p.grad, unclipped.grad = torch.tensor([0.5, float(i)]), torch.zeros(2)
        opt.step()
    assert int(opt.state["clip"]["spike_count"]) == 3
    # a finite norm on a step skipped for a NaN in the group that is not clipped
    p.grad, unclipped.grad = torch.tensor([0.5, 3.0]), torch.tensor([float("nan"), 0.0])
    opt.step()
    clip = opt.state["clip"]
    assert int(clip["skipped_steps"]) == 1 and int(clip["spike_count"]) == 3


def test_writing_into_a_recorded_statistic_cannot_reach_a_gradient(rule_path):
    """``all_reduce(opt.state["clip"]["clip_coef"])`` for logging writes in place. The recorded
    tensors are never the ones a step decides or multiplies with: the clip goes on as torch's,
    and a non-finite step is still skipped."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.zeros(5, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    refs = [torch.zeros_like(p, requires_grad=True) for p in params]
    opt, ref = ClippedOptimizer(torch.optim.SGD(params, lr=0.1)), torch.optim.SGD(refs, lr=0.1)
    for scale in (3.0, 0.01, 5.0, 0.02, math.nan, 2.0):
        for p, r in zip(params, refs):
            p.grad = torch.randn(p.shape, generator=gen) * scale
            r.grad = p.grad.clone()
        if not math.isnan(scale):
            torch.nn.utils.clip_grad_norm_(refs, 1.0)
            ref.step()
        opt.step()
        for p, r in zip(params, refs):
            assert torch.equal(p.detach(), r.detach())
        for key in ("clip_coef", "grad_norm"):  # the hostile write, after every step
            opt.state["clip"][key].mul_(0.25)
    assert int(opt.state["clip"]["skipped_steps"]) == 1 and int(opt.state["clip"]["clipped_steps"]) == 3
