"""The wrapper is a torch.optim.Optimizer to the rest of the ecosystem."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from clipped_optim import ClippedOptimizer, SpikeSkip, ZClip


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 4, generator=g)).pow(2).sum().backward()


SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=10),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1 / (1 + e)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=4),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=6, power=2.0),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=2), S.ExponentialLR(o, 0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)]),
}


def _lr_sequence(make_sched, wrap: bool) -> list[float]:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ClippedOptimizer(inner, max_norm=1.0) if wrap else inner
    sched = make_sched(opt)
    lrs = []
    for i in range(8):
        _backward(model, i)
        opt.step()
        opt.zero_grad()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_lr_scheduler_gives_the_same_sequence_without_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" among them
        wrapped = _lr_sequence(SCHEDULERS[name], wrap=True)
    assert wrapped == _lr_sequence(SCHEDULERS[name], wrap=False)


def test_reduce_lr_on_plateau():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    sched = S.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    for _ in range(5):
        _backward(model, 0)
        opt.step()
        opt.zero_grad()
        sched.step(1.0)  # never improves
    assert opt.param_groups[0]["lr"] < 0.1
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_shares_param_groups_state_defaults_with_inner():
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = ClippedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    _backward(model, 0)
    opt.step()
    # After a load the inner objects are replaced: the wrapper follows them.
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


def test_zero_grad_and_add_param_group():
    model = _model()
    extra = nn.Parameter(torch.randn(3))
    opt = ClippedOptimizer(torch.optim.Adam(model[0].parameters(), lr=1e-3), max_norm=1e-3)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # inner defaults applied
    _backward(model, 0)
    extra.grad = torch.ones(3) * 10
    opt.step()
    # The extra group's gradient took part in the global norm and was clipped with the rest.
    assert float(opt.state["clip"]["grad_norm"]) > float(torch.linalg.vector_norm(extra.grad))
    assert float(torch.linalg.vector_norm(extra.grad)) < 1e-3
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    _backward(model, 1)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model[0].parameters())


def test_step_returns_what_the_inner_step_returns():
    # torch's optimizers return the closure's loss (None without one); others may return more.
    class Reporting(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            return "inner result"

    model = _model()
    opt = ClippedOptimizer(Reporting(model.parameters(), lr=0.1))
    _backward(model, 0)
    assert opt.step() == "inner result"


def test_step_hooks_run_around_the_clipped_step():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", int(o.state["clip"]["steps"]))))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", int(o.state["clip"]["steps"]))))
    _backward(model, 0)
    opt.step()
    assert seen == [("pre", 0), ("post", 1)]


def test_global_optimizer_hooks_fire_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(type(o).__name__))
    try:
        _backward(model, 0)
        opt.step()
    finally:
        handle.remove()
    # The inner optimizer's own step is hooked too: both appear, each once.
    assert sorted(calls) == ["ClippedOptimizer", "SGD"]


def test_repr_pickle_deepcopy():
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), max_norm=0.5, norm_type=math.inf)
    _backward(model, 0)
    opt.step()
    text = repr(opt)
    assert "ClippedOptimizer(mode='norm', max_norm=0.5, norm_type=inf" in text and "AdamW" in text
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert isinstance(clone, ClippedOptimizer) and clone.config == opt.config
        assert int(clone.state["clip"]["steps"]) == 1
        assert clone.state is clone.optimizer.state and clone.state is not opt.state


@pytest.mark.parametrize(
    "kwargs,first_line",
    [
        (dict(mode="value", clip_value=0.25), "mode='value', clip_value=0.25, norm_type=2.0, nonfinite='skip',"),
        (
            dict(mode="per_param", max_norm=2, nonfinite="raise"),
            "mode='per_param', max_norm=2.0, norm_type=2.0, nonfinite='raise',",
        ),
        (
            dict(mode=ZClip(z_thresh=3.0), skip_spikes=True),
            f"mode={ZClip(z_thresh=3.0)!r}, norm_type=2.0, nonfinite='skip', skip_spikes={SpikeSkip()!r},",
        ),
    ],
    ids=["value", "per_param", "policy_and_spikes"],
)
def test_repr_shows_the_options_in_force_then_the_inner_optimizer(kwargs, first_line):
    # Only the bound the mode uses is shown (a policy has its own), so a printed optimizer
    # never suggests a max_norm that does nothing; the inner repr follows, indented.
    inner = torch.optim.SGD(_model().parameters(), lr=0.1)
    lines = repr(ClippedOptimizer(inner, **kwargs)).splitlines()
    assert lines[0] == f"ClippedOptimizer({first_line}"
    assert lines[1:-1] == ["    " + line for line in repr(inner).splitlines()]
    assert lines[-1] == ")"


def _pickled(opt):
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("clone", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
@pytest.mark.parametrize("flat_grads", [False, True])
def test_a_copied_optimizer_steps_on_as_the_original_does(clone, flat_grads):
    # A copy taken mid-training (pickled with its model, or deep-copied) is a working
    # optimizer: it clips, records and keeps flat_grads' buffers as the original does.
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_norm=0.5, flat_grads=flat_grads
    )
    _backward(model, 0)
    opt.step()
    copied = clone(opt)
    pre = []
    copied.register_step_pre_hook(lambda o, a, k: pre.append(o))
    for o in (opt, copied):
        params = [p for g in o.param_groups for p in g["params"]]
        o.zero_grad()
        for i, p in enumerate(params):  # the same gradients for both: the copy has no model
            if p.grad is None:
                p.grad = p.detach() * (i + 3)
            else:  # flat_grads: backward would accumulate into the zeroed view
                p.grad.add_(p.detach() * (i + 3))
        o.step()
        o.zero_grad()
    assert pre == [copied]
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in copied.param_groups for p in g["params"]]
    assert all(torch.equal(p, q) for p, q in zip(mine, theirs))
    for key in ("steps", "clipped_steps", "grad_norm", "clip_coef"):
        assert torch.equal(copied.state["clip"][key], opt.state["clip"][key])
    # flat_grads: zero_grad() zeroes the buffer's views and keeps them, as on the original
    assert all((p.grad is None) != flat_grads for p in theirs)


def test_deepcopy_after_scheduler_attached():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    S.StepLR(opt, 1)  # patches opt.step on the instance
    copy.deepcopy(opt)
    pickle.dumps(opt)


def test_state_dict_is_the_inner_format_plus_clip():
    model = _model()
    opt = ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    _backward(model, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {"clip", 0, 1, 2, 3}
    # A plain inner optimizer's checkpoint loads into the wrapper (statistics start afresh).
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    plain.load_state_dict(
        {"state": {k: v for k, v in sd["state"].items() if k != "clip"}, "param_groups": sd["param_groups"]}
    )
    fresh = ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    fresh.load_state_dict(plain.state_dict())
    assert int(fresh.state["clip"]["steps"]) == 0
    torch.testing.assert_close(
        fresh.state[next(model.parameters())]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"]
    )


from optim_table import TORCH_OPTIMIZER_ROWS, TORCH_OPTIMIZERS  # noqa: E402

ALL_ROWS = [r for r in TORCH_OPTIMIZERS + TORCH_OPTIMIZER_ROWS if not (r.sparse or r.closure)]


@pytest.mark.parametrize("row", ALL_ROWS, ids=repr)
def test_checkpoint_roundtrip_and_scheduler_for_every_optimizer(row):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 5, bias=not row.matrix_only), nn.Tanh(), nn.Linear(5, 2, bias=not row.matrix_only)
        )
        opt = ClippedOptimizer(row.build(list(model.parameters())), max_norm=0.1)
        sched = S.StepLR(opt, step_size=1, gamma=0.5) if row.lr_schedulable else None
        return model, opt, sched

    def train(model, opt, sched, steps):
        for i in steps:
            g = torch.Generator().manual_seed(i)
            model(torch.randn(6, 4, generator=g)).pow(2).sum().backward(create_graph=row.create_graph)
            torch.manual_seed(i)
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()

    model, opt, sched = build()
    train(model, opt, sched, range(4))
    model2, opt2, sched2 = build()
    train(model2, opt2, sched2, range(2))
    ckpt = pickle.loads(pickle.dumps((model2.state_dict(), opt2.state_dict(), sched2 and sched2.state_dict())))
    model3, opt3, sched3 = build()
    model3.load_state_dict(ckpt[0])
    opt3.load_state_dict(ckpt[1])
    if sched3 is not None:
        sched3.load_state_dict(ckpt[2])
    train(model3, opt3, sched3, range(2, 4))
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q) or not row.resumes_exactly
    assert int(opt3.state["clip"]["steps"]) == 4 and int(opt3.state["clip"]["clipped_steps"]) == 4
