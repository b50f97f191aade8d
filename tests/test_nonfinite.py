"""A NaN/Inf gradient never silently corrupts the weights (unless asked to)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer
from optim_table import TORCH_OPTIMIZERS

STEPPABLE = [r for r in TORCH_OPTIMIZERS if not (r.closure or r.sparse or r.matrix_only)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _grads(model, poison=None):
    model(torch.randn(5, 4)).pow(2).sum().backward()
    if poison is not None:
        model[2].weight.grad[1, 1] = poison


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row", STEPPABLE, ids=repr)
def test_skip_leaves_parameters_and_optimizer_state_untouched(row, poison):
    model = _model()
    opt = ClippedOptimizer(row.build(list(model.parameters())), max_norm=1.0)
    _grads(model)
    opt.step()
    opt.zero_grad()
    params = copy.deepcopy(list(model.parameters()))
    state = [copy.deepcopy(opt.state[p]) for p in model.parameters()]
    _grads(model, poison)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, s in zip(model.parameters(), state):
        assert set(opt.state[p]) == set(s)
        for key, value in s.items():
            now = opt.state[p][key]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value
    clip = opt.state["clip"]
    assert (int(clip["steps"]), int(clip["skipped_steps"]), int(clip["nonfinite_steps"])) == (2, 1, 1)
    assert int(clip["clipped_steps"]) <= 1  # the skipped step is not counted as clipped


def test_raise_names_the_problem_and_the_parameters():
    model = _model()
    opt = ClippedOptimizer(torch.optim.Adam(model.parameters()), nonfinite="raise")
    _grads(model, float("nan"))
    before = copy.deepcopy(list(model.parameters()))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 1.*\[2\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_propagate_is_torch_behaviour():
    model, ref = _model(), _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="propagate")
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m in (model, ref):
        torch.manual_seed(1)
        _grads(m, float("inf"))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, equal_nan=True)
    assert torch.isnan(model[2].weight).any()
    assert (int(opt.state["clip"]["skipped_steps"]), int(opt.state["clip"]["nonfinite_steps"])) == (0, 1)


@contextlib.contextmanager
def count_host_syncs():
    """Count the Python-level ways a tensor's value reaches the host during the block.

    The inner optimizers are chosen so that they read no tensor value themselves (Adam's
    for-each path reads its CPU step counters), so every count is the wrapper's."""
    calls = []
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def spy(name):
        def wrapper(self, *a, **k):
            calls.append(name)
            return originals[name](self, *a, **k)

        return wrapper

    for n in names:
        setattr(torch.Tensor, n, spy(n))
    try:
        yield calls
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize(
    "nonfinite,inner,expected",
    [
        ("propagate", lambda p: torch.optim.SGD(p, lr=0.1, foreach=True), 0),
        ("skip", lambda p: torch.optim.SGD(p, lr=0.1, foreach=True), 1),
        ("raise", lambda p: torch.optim.SGD(p, lr=0.1, foreach=True), 1),
        ("skip", lambda p: torch.optim.AdamW(p, fused=True), 0),  # skips inside the kernel
        ("raise", lambda p: torch.optim.AdamW(p, fused=True), 1),
    ],
)
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_host_syncs_per_step(nonfinite, inner, expected, mode, device_path):
    # the reads an accelerator's step makes (on a CPU the decision is read on the host anyway)
    model = _model()
    opt = ClippedOptimizer(
        inner(list(model.parameters())), mode=mode, nonfinite=nonfinite, clip_value=0.1 if mode == "value" else None
    )
    _grads(model)
    opt.step()  # the inner optimizer's lazy state initialisation is not what is counted
    _grads(model)
    with count_host_syncs() as calls:
        opt.step()
    assert len(calls) == expected, calls


def test_a_parameter_that_never_has_a_gradient_costs_no_host_sync(device_path):
    # It has no inner state, and a fused kernel creates none for a parameter without a
    # gradient: the kernel can still be the one to skip, with no sync (on an accelerator).
    model = _model()
    idle = nn.Parameter(torch.zeros(3))
    opt = ClippedOptimizer(torch.optim.AdamW([*model.parameters(), idle], fused=True))
    _grads(model)
    opt.step()
    _grads(model)
    with count_host_syncs() as calls:
        opt.step()
    assert calls == [] and idle not in opt.state


def test_a_norm_past_float32_from_finite_gradients_is_skipped_under_grad_scaler(rule_path):
    """Finite gradients whose norm overflows float32 are a non-finite step: GradScaler finds no
    overflow in them (its flag is 0), and the step is skipped all the same, as without it."""

    def run(scaled: bool):
        p = nn.Parameter(torch.zeros(2))
        opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1, momentum=0.9), max_norm=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
        for size in (1.0, 3e38, 1.0):  # 3e38 is finite; the 2-norm of two of them is not
            opt.zero_grad()
            loss = (p * torch.tensor([size, size])).sum()
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        clip = opt.state["clip"]
        return p.detach(), [int(clip[k]) for k in ("steps", "skipped_steps", "nonfinite_steps")]

    (p, counts), (q, plain) = run(True), run(False)
    assert torch.equal(p, q) and counts == plain == [3, 1, 1]


def test_a_closure_marked_nonfinite_stays_on_the_path_its_gate_took(rule_path):
    """A re-evaluation that went NaN marks the step non-finite after the gate decided: on the
    device path the decision stays a tensor (the recorder then reads nothing on the host), on a
    CPU's host path it stays read."""
    from clipped_optim.decision import StepGate

    p = torch.zeros(3, requires_grad=True)
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    gate = StepGate(opt.config, dict(opt._clip_state()))
    gate(torch.tensor(2.0))
    assert gate.held_on_host() == (False if rule_path == "host" else None)
    gate.mark_nonfinite()
    assert gate.held_on_host() == (True if rule_path == "host" else None)
    finite, hold, skip = gate.decided()
    assert gate.held() and not bool(finite) and bool(hold) and float(skip) == 1.0
