"""Regression tests: each one reproduces a way a step, a load or an option once went wrong
silently (or half-way), compared with plain torch or with ``flat_grads=False``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer, SpikeSkip, ZClip, clip_grad_norm, clip_grad_value
from helpers import assert_same_state_dict


def _params(seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in [(4, 3), (3,), (5,)]]


def _backward(params, seed: int, scale: float = 10.0) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() * scale for p in params).backward()


# -- flat_grads: a p.grad.data swap keeps the Python object and changes the storage ---------------
@pytest.mark.parametrize("swap", ["divide", "nan_to_num", "double"])
def test_flat_grads_follow_a_grad_data_swap(swap):
    """The update of SGD(lr=1) after clipping to 1 has norm 1 at every step, as with plain torch."""
    params = _params()
    model = nn.ParameterList(params)
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=1.0), max_norm=1.0, flat_grads=True)
    for step in range(4):
        opt.zero_grad()
        _backward(params, step)
        for p in params:
            if swap == "divide":
                p.grad.data = p.grad.data / 2  # the averaging idiom of hand-written data parallelism
            elif swap == "nan_to_num":
                p.grad.data = torch.nan_to_num(p.grad.data)
        if swap == "double" and step == 2:
            model.double()  # nn.Module._apply: p.data and p.grad.data, same objects
        before = [p.detach().clone() for p in params]
        opt.step()
        update = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]))
        assert abs(float(update) - 1.0) < 1e-5, (step, float(update))
        for p in params:  # the gradients the inner step used are the clipped ones
            assert p.grad.dtype == p.dtype


def test_flat_zero_grad_zeroes_a_swapped_gradient():
    params = _params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), flat_grads=True)
    _backward(params, 0)
    opt.step()
    params[0].grad.data = torch.ones_like(params[0].grad)
    opt.zero_grad(set_to_none=True)
    assert params[0].grad is None or float(params[0].grad.abs().sum()) == 0.0


@pytest.mark.parametrize("clip_groups", ["none_have_grads", "only_unclipped_has_grads"])
def test_flat_grads_with_no_clipped_gradient(clip_groups):
    a, b = _params(), _params()
    opts = []
    for params, flat in ((a, True), (b, False)):
        groups = [{"params": params[:2]}, {"params": params[2:], "clip": False}]
        opts.append(ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), flat_grads=flat))
    for params, opt in zip((a, b), opts):
        if clip_groups == "only_unclipped_has_grads":
            _backward(params[2:], 0)
        opt.step()  # raised AssertionError / "torch.cat(): expected a non-empty list" with flat
        _backward(params, 1)
        opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- fused kernels skip through found_inf but may still create state --------------------------------
FUSED = {
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "SGD-momentum-dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, fused=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_nan_on_the_first_step_leaves_no_state(name):
    """A run with a NaN batch first ends where the run without that batch ends, bit for bit."""
    a, b = _params(), _params()
    opt = ClippedOptimizer(FUSED[name](a), max_norm=1.0)
    ref = ClippedOptimizer(FUSED[name](b), max_norm=1.0)
    _backward(a, 0)
    a[1].grad[0] = math.nan
    before = {
        i: copy.deepcopy(opt.optimizer.state[p]) for i, p in enumerate(a) if p in opt.optimizer.state
    }  # Adagrad's, from __init__
    opt.step()
    opt.zero_grad()
    after = {i: opt.optimizer.state[p] for i, p in enumerate(a) if opt.optimizer.state.get(p)}
    assert_same_state_dict(after, before)  # a skipped first step created no inner state
    for step in range(1, 4):
        for params, o in ((a, opt), (b, ref)):
            _backward(params, step)
            o.step()
            o.zero_grad()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert int(opt.state["clip"]["skipped_steps"]) == 1


# -- load_state_dict: all or nothing, and never aliased ---------------------------------------------
def test_refused_load_changes_nothing():
    params = _params()
    opt = ClippedOptimizer(torch.optim.Adam(params, lr=0.1), mode="norm")
    _backward(params, 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    other_params = _params(1)
    other = ClippedOptimizer(torch.optim.Adam(other_params, lr=0.1), mode="value", clip_value=0.1)
    _backward(other_params, 1)
    other.step()
    with pytest.raises(ValueError, match=r"mode='value'.*mode='norm'"):
        opt.load_state_dict(other.state_dict())
    assert_same_state_dict(opt.state_dict(), before)  # inner state not replaced, and it still saves


def test_loaded_checkpoint_is_not_edited_by_later_steps():
    params = _params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    _backward(params, 0)
    opt.step()
    checkpoint = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    frozen = copy.deepcopy(loaded)
    opt.load_state_dict(loaded)
    for step in range(3):
        _backward(params, step)
        opt.step()
    assert_same_state_dict(loaded["state"]["clip"], frozen["state"]["clip"])
    assert loaded["state"]["clip"] is not opt.state["clip"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("steps", torch.tensor(1.5), "'steps'.*int"),
        ("param_norms", torch.zeros(2, 2), "'param_norms'.*1-dim"),
        ("history", torch.zeros(10, 3), "'history'"),
        ("grad_norm", 1.0, "'grad_norm'.*got float"),
    ],
)
def test_load_names_the_bad_key(key, value, match):
    params = _params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["clip"][key] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same_state_dict(opt.state_dict(), before)


# -- nonfinite="raise": torch's error_if_nonfinite leaves the gradients as they were ----------------
@pytest.mark.parametrize("fused", [False, True])
def test_raise_leaves_gradients_untouched(fused):
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))
    opt = ClippedOptimizer(torch.optim.Adam([p, q], lr=0.1, fused=fused), nonfinite="raise", max_norm=1.0)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    q.grad = torch.tensor([math.inf, 1.0])
    with pytest.raises(FloatingPointError, match=r"step 1.*\[1\]"):
        opt.step()
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(q.grad, torch.tensor([math.inf, 1.0]))
    assert int(opt.state["clip"]["steps"]) == 0 and not opt.state[p]


def test_raise_names_a_parameter_of_an_unclipped_group():
    params = _params()
    opt = ClippedOptimizer(
        torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "clip": False}], lr=0.1), nonfinite="raise"
    )
    _backward(params, 0)
    params[2].grad[1] = math.nan
    grads = [p.grad.clone() for p in params]
    with pytest.raises(FloatingPointError, match=r"order: \[2\]"):
        opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g) or torch.allclose(p.grad, g, equal_nan=True)


@pytest.mark.parametrize("mode", ["norm", "per_param", "value", "agc", "autoclip", "zclip"])
def test_skipped_step_leaves_gradients_bit_identical(mode):
    params = _params()
    kw = dict(clip_value=0.01) if mode == "value" else {}
    groups = [{"params": params[:2]}, {"params": params[2:], "clip": False}]
    opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), mode=mode, **kw)
    _backward(params, 0, scale=100.0)
    params[2].grad[0] = math.nan  # in the group that is not clipped: the clipped ones are held too
    grads = [p.grad.clone() for p in params]
    weights = [p.detach().clone() for p in params]
    opt.step()
    for p, g, w in zip(params, grads, weights):
        assert torch.allclose(p.grad, g, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(p, w)
    assert int(opt.state["clip"]["skipped_steps"]) == 1


# -- closures evaluated again inside the inner step (LBFGS) -----------------------------------------
def _lbfgs_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, x, y


def _closure(opt, model, x, y, after_backward=None):
    """A closure on the problem, and its evaluation count; ``after_backward(n)`` runs after the
    ``n``-th evaluation's backward (n from 1), to poison, scale or clip its gradients, or raise."""
    evals = [0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        evals[0] += 1
        if after_backward is not None:
            after_backward(evals[0])
        return loss

    return closure, evals


def test_lbfgs_nan_in_a_later_evaluation_is_skipped():
    model, x, y = _lbfgs_problem()
    opt = ClippedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), max_norm=1.0)

    def poison(n):
        if n == 3:  # a later evaluation of the same step
            model.weight.grad[0, 0] = math.nan

    closure, calls = _closure(opt, model, x, y, poison)

    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert calls[0] >= 3
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w), "the step did not proceed: the parameters are restored"
    clip = opt.state["clip"]
    assert (int(clip["steps"]), int(clip["skipped_steps"]), int(clip["nonfinite_steps"])) == (1, 1, 1)
    inner_state = opt.optimizer.state[opt.optimizer._params[0]]
    assert int(inner_state.get("func_evals", 0)) == 0 and int(inner_state.get("n_iter", 0)) == 0


class _Lbfgs:
    """LBFGS under the wrapper on a fixed problem; ``step(poison=True)`` makes a later
    evaluation of the closure (one of LBFGS's own, after the wrapper's first) NaN."""

    def __init__(self, nonfinite: str):
        self.model, self.x, self.y = _lbfgs_problem()
        inner = torch.optim.LBFGS(self.model.parameters(), lr=0.5, max_iter=5)
        self.opt = ClippedOptimizer(inner, max_norm=1.0, nonfinite=nonfinite)

    def step(self, poison: bool = False) -> None:
        def after_backward(n):
            if poison and n == 2:
                self.model.weight.grad[0, 0] = math.nan

        closure, evals = _closure(self.opt, self.model, self.x, self.y, after_backward)

        try:
            self.opt.step(closure)
        finally:
            assert evals[0] >= 2 or not poison, "LBFGS did not evaluate again: nothing was poisoned"


def test_lbfgs_step_undone_by_a_nan_evaluation_is_as_if_it_never_ran():
    # After a first step, LBFGS's state holds tensors and lists that its step updates in place
    # (prev_flat_grad, old_dirs): the undone step must give them back untouched, so that the
    # next step is the one a run without the bad step takes.
    run, ref = _Lbfgs("skip"), _Lbfgs("skip")
    run.step(), run.step(poison=True), run.step()
    ref.step(), ref.step()
    for p, q in zip(run.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    state, ref_state = run.opt.optimizer.state[run.model.weight], ref.opt.optimizer.state[ref.model.weight]
    assert int(state["n_iter"]) == int(ref_state["n_iter"]) and len(state["old_dirs"]) == len(ref_state["old_dirs"])
    clip = run.opt.state["clip"]
    assert (int(clip["steps"]), int(clip["skipped_steps"]), int(clip["nonfinite_steps"])) == (3, 1, 1)


def test_lbfgs_nan_evaluation_under_raise_leaves_the_optimizer_as_it_was():
    run, ref = _Lbfgs("raise"), _Lbfgs("raise")
    run.step(), ref.step()
    with pytest.raises(FloatingPointError, match="at step 2;"):
        run.step(poison=True)
    for p, q in zip(run.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    # the inner state and the first step's statistics, as before the step that raised
    assert_same_state_dict(run.opt.state_dict(), ref.opt.state_dict())


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_lbfgs_closure_that_raises_in_the_line_search(nonfinite):
    # "skip" undoes the step from a copy taken before it; "propagate" takes no copy and leaves
    # the parameters where LBFGS had moved them, as plain torch (clipping in its closure) does.
    def run(wrap: bool):
        model, x, y = _lbfgs_problem()
        inner = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
        opt = ClippedOptimizer(inner, max_norm=1.0, nonfinite=nonfinite) if wrap else inner

        def after_backward(n):
            if n == 3:  # LBFGS's third call, with or without the wrapper
                raise RuntimeError("data loader failed")
            if not wrap:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        closure, _ = _closure(opt, model, x, y, after_backward)

        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="data loader failed"):
            opt.step(closure)
        return list(model.parameters()), before

    (got, before), (torch_got, _) = run(wrap=True), run(wrap=False)
    want = before if nonfinite == "skip" else torch_got
    assert all(torch.equal(p, q) for p, q in zip(got, want))
    assert not all(torch.equal(p, q) for p, q in zip(torch_got, before))  # LBFGS had moved them


def test_lbfgs_adaptive_state_advances_once_per_step():
    model, x, y = _lbfgs_problem()
    opt = ClippedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), mode=ZClip(warmup_steps=3))
    closure, evals = _closure(opt, model, x, y)

    for step in range(2):
        opt.step(closure)
        assert int(opt.state["clip"]["zclip_seen"]) == step + 1
    assert evals[0] > 2


def test_lbfgs_spike_detector_judges_a_step_by_its_first_evaluation():
    # A line search's later evaluations can have far larger gradients than the step's first
    # (the one recorded): they are clipped, but they are not spikes that skip the step. (The
    # small max_norm clips every evaluation, so the scaled ones move LBFGS as the others would.)
    model, x, y = _lbfgs_problem()
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4),
        max_norm=1e-3,
        skip_spikes=SpikeSkip(sigma=3.0, window=3),
    )

    def scale(n):
        if n > 1:
            for p in model.parameters():
                p.grad.mul_(1e3)

    closure, evals = _closure(opt, model, x, y, scale)

    for _ in range(6):
        evals[0] = 0
        opt.step(closure)
        assert evals[0] > 1
    clip = opt.state["clip"]
    assert (int(clip["skipped_steps"]), int(clip["spike_count"])) == (0, 6)


def test_lbfgs_matches_clipping_inside_the_closure():
    """Every evaluation is clipped, as a plain-torch user clips inside the closure."""
    (a, x, y), (b, _, _) = _lbfgs_problem(), _lbfgs_problem()
    opt = ClippedOptimizer(torch.optim.LBFGS(a.parameters(), lr=0.5, max_iter=4), max_norm=0.1)
    ref = torch.optim.LBFGS(b.parameters(), lr=0.5, max_iter=4)

    closure_a, _ = _closure(opt, a, x, y)
    closure_b, _ = _closure(ref, b, x, y, lambda n: torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1))

    for _ in range(3):
        opt.step(closure_a)
        ref.step(closure_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- the inner step raises --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip"])
def test_inner_step_that_raises_is_not_recorded(mode):
    params = _params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=mode, skip_spikes=True)
    _backward(params, 0)
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy(opt.state["clip"])
    _backward(params, 1)
    weights = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = "not a number"  # a bad hyper-parameter: the inner step raises
    with pytest.raises(TypeError):
        opt.step()
    assert_same_state_dict(opt.state["clip"], before)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    opt.param_groups[0]["lr"] = 0.1
    opt.step()  # the retry is recorded once
    assert int(opt.state["clip"]["steps"]) == int(before["steps"]) + 1


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,extra", [("value", dict(clip_value=0.1)), ("agc", {}), ("autoclip", {})])
def test_explicit_max_norm_is_refused_where_unused(mode, extra):
    with pytest.raises(ValueError, match=rf"max_norm=1\.0.*not mode='{mode}'"):
        ClippedOptimizer(torch.optim.SGD(_params(), lr=0.1), mode=mode, max_norm=1.0, **extra)
    ClippedOptimizer(torch.optim.SGD(_params(), lr=0.1), mode=mode, **extra)  # the default is fine


def test_functional_api_takes_one_tensor_and_the_inf_string():
    g = torch.tensor([[3.0, -4.0], [0.0, 12.0]])
    want = g.clone()
    ref = nn.Parameter(torch.zeros(2, 2))
    ref.grad = want
    total = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type="inf")
    result = clip_grad_norm(g, 1.0, norm_type="inf")
    assert torch.equal(result.total_norm, total) and torch.equal(g, ref.grad)
    h = torch.tensor([[3.0, -4.0], [0.5, 12.0]])
    clip_grad_value(h, 1.0)
    assert torch.equal(h, torch.tensor([[1.0, -1.0], [0.5, 1.0]]))


def test_always_callable_before_and_after_anything():
    params = _params()
    opt = ClippedOptimizer(torch.optim.Adam(params[:2], lr=0.1), flat_grads=True)
    names = [(f"p{i}", p) for i, p in enumerate(params)]
    for _ in range(2):
        opt.stats(names)
        opt.report()
        opt.named_grad_norms(names)
        opt.state_dict()
        opt.zero_grad()
        opt.step()  # no gradients at all
    _backward(params[:2], 0)
    opt.step()
    opt.add_param_group({"params": params[2:]})
    assert set(opt.named_grad_norms(names)) == {"p0", "p1"}
    opt.stats(names)
    opt.report()
    opt.load_state_dict(opt.state_dict())
    opt.stats(names)
