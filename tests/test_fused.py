"""The clip folded into fused optimizers and GradScaler: same parameters as clip_grad_norm_ +
step, skipping through ``found_inf``, no host sync, and the number of passes over the gradients."""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipped_optim import ClippedOptimizer
from helpers import no_host_sync

# These tests stand in for an accelerator, where a host read is a sync: the device path.
pytestmark = pytest.mark.usefixtures("device_path")

SHAPES = [(6, 5), (5,), (4, 4, 2), (9,)]
FUSED = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}
FOREACH = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
}


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def loss_of(params, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + step)
    return sum((p * torch.randn(p.shape, generator=g)).sum() * (3 + i) for i, p in enumerate(params))


def poison(params, step: int, bad_steps) -> None:
    if step in bad_steps:
        params[1].grad[0] = math.inf


@pytest.mark.parametrize("name", sorted(FUSED))
@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_fused_fold_matches_clip_grad_norm_then_step(name, flat):
    a, b = make_params(), make_params()
    opt = ClippedOptimizer(FUSED[name](a), max_norm=1.0, flat_grads=flat)
    ref = FUSED[name](b)
    bad = {2}
    for step in range(5):
        opt.zero_grad()
        ref.zero_grad()
        loss_of(a, step).backward()
        loss_of(b, step).backward()
        poison(a, step, bad)
        poison(b, step, bad)
        # nonfinite='skip' skips inside the kernel (found_inf), except on the first step: a kernel
        # told to skip still creates the inner state, so that step is decided on the host.
        with no_host_sync() if step > 0 else contextlib.nullcontext():
            opt.step()
        norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
        if math.isfinite(norm):  # the reference skips by hand
            ref.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        if step not in bad:
            for p, q in zip(a, b):  # the kernel leaves the clipped gradients in p.grad
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    st = opt.state["clip"]
    assert int(st["skipped_steps"]) == 1 and int(st["nonfinite_steps"]) == 1
    assert int(st["clipped_steps"]) == 4


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_fused_with_an_opted_out_group_matches_clipping_the_others_then_step(name):
    # A group with "clip": False keeps its gradient: the clip cannot be folded into the kernel's
    # one grad_scale, which would scale that group too.
    a, b = make_params(), make_params()
    opt = ClippedOptimizer(FUSED[name]([{"params": a[:2]}, {"params": a[2:], "clip": False}]), max_norm=1.0)
    ref = FUSED[name]([{"params": b[:2]}, {"params": b[2:]}])
    for step in range(3):
        opt.zero_grad()
        ref.zero_grad()
        loss_of(a, step).backward()
        loss_of(b, step).backward()
        opt.step()
        torch.nn.utils.clip_grad_norm_(b[:2], 1.0)
        ref.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert int(opt.state["clip"]["clipped_steps"]) == 3


def test_a_skipped_step_creates_no_state_for_a_parameter_added_since():
    # A fused kernel told to skip still creates a parameter's missing state (fused SGD's
    # momentum buffer from uninitialised memory), so such a step is decided on the host: as
    # with torch's own skip, the added parameter has no state until a step proceeds.
    a, b = make_params(), make_params()
    opt = ClippedOptimizer(FUSED["SGD"](a[:3]), max_norm=1.0)
    ref = FUSED["SGD"](b[:3])
    for step in range(3):
        if step == 1:
            opt.add_param_group({"params": a[3:]})
            ref.add_param_group({"params": b[3:]})
        opt.zero_grad()
        ref.zero_grad()
        loss_of(a, step).backward()
        loss_of(b, step).backward()
        poison(a, step, {1})
        poison(b, step, {1})
        opt.step()
        held = [q for g in ref.param_groups for q in g["params"]]
        if math.isfinite(torch.nn.utils.clip_grad_norm_(held, 1.0)):
            ref.step()
        assert [p in opt.state for p in a] == [q in ref.state for q in b]
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert int(opt.state["clip"]["skipped_steps"]) == 1


def scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


@pytest.mark.parametrize(
    "name,inner", [(f"fused-{k}", v) for k, v in FUSED.items()] + [(f"foreach-{k}", v) for k, v in FOREACH.items()]
)
def test_under_gradscaler_matches_unscale_clip_step(name, inner):
    a, b = make_params(), make_params()
    opt = ClippedOptimizer(inner(a), max_norm=1.0)
    ref = inner(b)
    s_opt, s_ref = scaler(), scaler()
    bad = {1, 3}
    for step in range(6):
        opt.zero_grad()
        ref.zero_grad()
        s_opt.scale(loss_of(a, step)).backward()
        s_ref.scale(loss_of(b, step)).backward()
        poison(a, step, bad)
        poison(b, step, bad)
        if name.startswith("fused") and step > 0:  # the first step creates state: see above
            with no_host_sync():
                s_opt.step(opt)
        else:
            s_opt.step(opt)
        s_opt.update()
        s_ref.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(b, 1.0)
        s_ref.step(ref)
        s_ref.update()
        assert s_opt.get_scale() == s_ref.get_scale()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert int(opt.state["clip"]["skipped_steps"]) == len(bad)


def test_propagate_performs_no_host_sync():
    params = make_params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1, foreach=True), max_norm=1.0, nonfinite="propagate")
    loss_of(params, 0).backward()
    with no_host_sync():
        opt.step()
    assert float(opt.state["clip"]["clip_coef"]) < 1
    # the guard is real: the default policy reads the finiteness flag on the host
    opt2 = ClippedOptimizer(torch.optim.SGD(params, lr=0.1, foreach=True), max_norm=1.0)
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        opt2.step()


class _Passes(TorchDispatchMode):
    """Counts the ops that take the gradient tensors as input, by name."""

    def __init__(self, grads) -> None:
        super().__init__()
        self.ptrs = {g.untyped_storage().data_ptr() for g in grads}
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
        if any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in self.ptrs for x in flat):
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _passes(inner, amp: bool, flat: bool = False) -> Counter[str]:
    params = make_params()
    opt = ClippedOptimizer(inner(params), max_norm=1.0, flat_grads=flat)
    s = scaler()
    if flat:  # adopt the gradients into the buffer first
        loss_of(params, 0).backward()
        opt.step()
    (s.scale(loss_of(params, 1)) if amp else loss_of(params, 1)).backward()
    with _Passes([p.grad for p in params]) as counter:
        s.step(opt) if amp else opt.step()
    return counter.ops


def test_pass_counts():
    # fused fold: the wrapper reads the gradients once (norm); the fused kernel does the rest
    ops = _passes(FUSED["AdamW"], amp=False)
    assert ops == Counter({"_foreach_norm": 1, "_fused_adamw_": 1})
    # non-fused under GradScaler: GradScaler's inf check, the norm, ONE multiply, the step
    ops = _passes(FOREACH["SGD"], amp=True)
    assert ops["_amp_foreach_non_finite_check_and_unscale_"] == 1
    assert ops["_foreach_norm"] == 1 and ops["_foreach_mul_"] == 1
    # fused under GradScaler: the inf check and the norm only
    ops = _passes(FUSED["AdamW"], amp=True)
    assert ops == Counter({"_amp_foreach_non_finite_check_and_unscale_": 1, "_foreach_norm": 1, "_fused_adamw_": 1})
    # flat buffer, foreach SGD (4 distinct sizes: one foreach norm), one multiply over the buffer
    ops = _passes(FOREACH["SGD"], amp=False, flat=True)
    assert ops == Counter({"_foreach_norm": 1, "mul_": 1, "_foreach_add_": 1})


@pytest.mark.parametrize("name,inner", [("fused-AdamW", FUSED["AdamW"]), ("foreach-SGD", FOREACH["SGD"])])
@pytest.mark.parametrize("nonfinite,flat", [("skip", False), ("propagate", False), ("skip", True)])
def test_clip_grad_scaler_matches_gradscaler_without_the_inf_check_pass(name, inner, nonfinite, flat):
    from clipped_optim import ClipGradScaler

    a, b = make_params(), make_params()
    opt = ClippedOptimizer(inner(a), max_norm=1.0, nonfinite=nonfinite, flat_grads=flat)
    ref = inner(b)
    s_opt = ClipGradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    s_ref = scaler()
    bad = {1, 3, 4}
    for step in range(7):
        opt.zero_grad()
        ref.zero_grad()
        s_opt.scale(loss_of(a, step)).backward()
        s_ref.scale(loss_of(b, step)).backward()
        poison(a, step, bad)
        poison(b, step, bad)
        with _Passes([p.grad for p in a]) as counter:
            s_opt.step(opt)
        assert "_amp_foreach_non_finite_check_and_unscale_" not in counter.ops
        s_opt.update()
        s_ref.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(b, 1.0)
        s_ref.step(ref)
        s_ref.update()
        assert s_opt.get_scale() == s_ref.get_scale()  # backed off and grew alike
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert int(opt.state["clip"]["skipped_steps"]) == len(bad)
    # any other optimizer gets GradScaler's usual inf check
    plain = torch.optim.SGD(make_params(), lr=0.1)
    s_opt.scale(loss_of(plain.param_groups[0]["params"], 0)).backward()
    plain.param_groups[0]["params"][0].grad[0, 0] = math.nan
    s_opt.step(plain)
    assert float(sum(s_opt._found_inf_per_device(plain).values())) == 1.0
