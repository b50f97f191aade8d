"""The gather's reused layout (clipped_optim.gather) against a fresh gather, and the packed counters.

The wrapper reuses the last step's layout (which parameters are clipped, where they sit, which
parameter owns each gradient) while a per-step check passes. These tests change the layout
between steps in every way a user can and require the reused result to be exactly the fresh one.
"""

from __future__ import annotations

import random

import pytest
import torch

from clipped_optim import ClippedOptimizer
from clipped_optim.gather import Gatherer, gather_grads


def _alias(x: torch.Tensor, y: torch.Tensor) -> bool:
    # a sparse gradient is gathered as its coalesced values: a new view object at every gather
    return x is y or (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.dtype == y.dtype)


def _same(a, b) -> None:
    assert len(a.clipped) == len(b.clipped) and all(map(_alias, a.clipped, b.clipped))
    assert len(a.unclipped) == len(b.unclipped) and all(map(_alias, a.unclipped, b.unclipped))
    assert list(a.positions) == list(b.positions) and a.n_params == b.n_params
    assert len(a.params) == len(b.params) and all(x is y for x, y in zip(a.params, b.params))


def _mutations(groups, rng: random.Random):
    """Each a change a training loop (or a hostile user) can make between two steps."""
    params = lambda: [p for g in groups for p in g["params"]]  # noqa: E731

    def fresh_grads():  # backward after zero_grad(): new tensors, same layout
        for p in params():
            p.grad = torch.randn_like(p)

    def drop_one():
        rng.choice(params()).grad = None

    def regain_all():
        for p in params():
            if p.grad is None:
                p.grad = torch.randn_like(p)

    def toggle_clip():
        g = rng.choice(groups)
        g["clip"] = not g.get("clip", True)

    def replace_param():  # same length, another parameter object
        g = rng.choice(groups)
        i = rng.randrange(len(g["params"]))
        new = torch.nn.Parameter(torch.randn_like(g["params"][i]))
        new.grad = torch.randn_like(new)
        g["params"][i] = new

    def data_swap_dtype():  # the same gradient object, another dtype
        p = rng.choice([p for p in params() if p.grad is not None and not p.grad.is_sparse] or [None])
        if p is not None:
            p.grad.data = p.grad.data.double()

    def sparse_grad():
        p = rng.choice(params())
        p.grad = torch.randn_like(p).to_sparse()

    def add_group():
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        groups.append({"params": [p]})

    return [fresh_grads, drop_one, regain_all, toggle_clip, replace_param, data_swap_dtype, sparse_grad, add_group]


@pytest.mark.parametrize("seed", range(20))
def test_reused_layout_equals_a_fresh_gather(seed):
    rng = random.Random(seed)
    groups = [
        {"params": [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]},
        {"params": [torch.nn.Parameter(torch.randn(5)) for _ in range(2)] + [torch.nn.Parameter(torch.empty(0))]},
    ]
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    gatherer = Gatherer()
    mutations = _mutations(groups, rng)
    for _ in range(40):
        if rng.random() < 0.6:
            rng.choice(mutations)()
        _same(gatherer(groups), gather_grads(groups))


def _twin_loop(changes):
    """The wrapper and clip_grad_norm_ + SGD side by side while ``changes(step, params)`` edits the
    gradients' layout between steps; every step's parameters must be bit-identical."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(5)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt = ClippedOptimizer(torch.optim.SGD(a, lr=0.1), max_norm=0.5)
    ref = torch.optim.SGD(b, lr=0.1)
    for step in range(8):
        grads = [torch.randn(6, 4) * 3 for _ in a]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        changes(step, a)
        changes(step, b)
        opt.step()
        present = [p for p in b if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(present, 0.5)
        ref.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_a_parameter_losing_and_regaining_its_gradient_is_clipped_as_torch_does():
    def changes(step, params):
        if step in (2, 3):
            params[1].grad = None
        if step == 5:
            params[0].grad = None
            params[4].grad = None

    _twin_loop(changes)


def test_a_gradient_whose_dtype_changes_under_the_same_object_is_grouped_again():
    def changes(step, params):
        if step >= 3:  # p.grad.data = ...: same object, float64 now (torch groups it apart)
            params[2].grad.data = params[2].grad.data.double()

    _twin_loop(changes)


def test_packed_counters_survive_replacement_and_load():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    steps = opt.state["clip"]["steps"]  # a reference taken before the first step stays live
    for _ in range(3):
        p.grad = torch.full((3,), 0.01)  # below the bound: not clipped
        opt.step()
    assert int(steps) == 3
    opt.state["clip"]["steps"] = torch.tensor(10)  # a user's assignment: counted from there
    p.grad = torch.randn(3) * float("nan")
    opt.step()
    clip = opt.state["clip"]
    assert [int(clip[k]) for k in ("steps", "skipped_steps", "nonfinite_steps", "clipped_steps")] == [11, 1, 1, 0]
    saved = opt.state_dict()
    fresh = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    fresh.load_state_dict(saved)
    p.grad = torch.full((3,), 10.0)
    fresh.step()
    clip = fresh.state["clip"]
    assert [int(clip[k]) for k in ("steps", "skipped_steps", "nonfinite_steps", "clipped_steps")] == [12, 1, 1, 1]
    assert int(saved["state"]["clip"]["steps"]) == 11  # the checkpoint is not edited by later steps


def test_the_step_opens_its_profiler_range_only_under_a_profiler():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.randn(3)
    with torch.profiler.profile() as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#ClippedOptimizer.step" in names and "Optimizer.step#SGD.step" in names


def test_a_step_pre_hook_may_replace_the_closure():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    calls = []

    def closure():
        calls.append("replaced")
        opt.zero_grad()
        (p * 2).sum().backward()
        return torch.tensor(0.0)

    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, closure), {}))
    opt.step()
    assert calls == ["replaced"]
    torch.testing.assert_close(p.detach(), torch.tensor([0.9]))  # its gradient 2, clipped to 1


def test_inner_step_hooks_and_a_scheduler_built_on_the_inner_optimizer():
    import warnings

    p = torch.nn.Parameter(torch.randn(3))
    inner = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)  # patches inner.step
    opt = ClippedOptimizer(inner)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    inner.register_step_post_hook(lambda o, a, k: seen.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for _ in range(2):
            p.grad = torch.randn(3)
            opt.step()
            sched.step()
    assert seen == ["pre", "post"] * 2 and inner.param_groups[0]["lr"] == 0.025


def test_inner_optimizer_hooks_fire_once_each_in_order():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.randn(3))
    inner = torch.optim.SGD([p], lr=0.1)
    opt = ClippedOptimizer(inner)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append(("inner pre", a[0] is inner)))
    inner.register_step_post_hook(lambda o, a, k: seen.append(("inner post", o is inner)))
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global post", type(o).__name__))),
    ]
    try:
        p.grad = torch.randn(3)
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == [
        ("global pre", "ClippedOptimizer"),
        ("global pre", "SGD"),
        ("inner pre", True),
        ("inner post", True),
        ("global post", "SGD"),
        ("global post", "ClippedOptimizer"),
    ]
