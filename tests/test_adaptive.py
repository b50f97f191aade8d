"""The adaptive modes (AGC, AutoClip, ZClip) and spike skipping.

Parity: each mode is run beside its reference implementation (timm's ``adaptive_clip_grad``,
``autoclip``'s ``QuantileClip``, ``zclip``'s ``ZClip``) on the same gradient sequence, with
spikes injected after the warm-up, and the parameters, norms and thresholds are compared
after every step.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from clipped_optim import AGC, AutoClip, ClippedOptimizer, SpikeSkip, ZClip, policy
from clipped_optim._tensors import host_memory
from clipped_optim.adaptive import (
    quantile_sorted,
    quantile_sorted_host,
    sorted_ring_push,
    sorted_ring_push_host,
    spike_test,
    spike_test_host,
)
from helpers import assert_same_state_dict, no_host_sync

# Every test here runs on both paths of the rules: on the host (a CPU step) and on the device.
pytestmark = pytest.mark.usefixtures("rule_path")

autoclip_torch = pytest.importorskip("autoclip.torch")
zclip = pytest.importorskip("zclip")


@pytest.fixture(scope="module")
def timm_agc():
    """``timm/utils/agc.py`` by file path: ``import timm`` needs torchvision. The AGC parity
    tests skip where timm is absent (``.ci/run`` installs it with ``--no-deps``)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "utils", "agc.py")
    module_spec = importlib.util.spec_from_file_location("timm_agc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only contend (a loaded 2-core CI box ran 40x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STEPS = 60
#: step -> loss multiplier: gradient spikes after every warm-up used below (ZClip's is 10)
SPIKES = {14: 40.0, 27: 8.0, 28: 15.0, 41: 100.0, 52: 5.0}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # a conv weight (3-D), linear weights, biases and a LayerNorm: every AGC unit shape
    return nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(24, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2)
    )


def data(steps: int = STEPS, seed: int = 1, spikes=SPIKES, nan_at: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        x = torch.randn(5, 3, 8, generator=gen)
        out.append((x, spikes.get(t, 1.0) if nan_at != t else math.nan))
    return out


def backward(model: nn.Module, x: torch.Tensor, factor: float) -> None:
    model.zero_grad(set_to_none=True)
    (model(x).pow(2).mean() * factor).backward()


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def sgd(model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# -- AGC --------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.1, 1e-2)])
def test_agc_equals_timm(clip_factor, eps, timm_agc):
    ref, ours = make_model(), make_model()
    ref_opt = sgd(ref)
    opt = ClippedOptimizer(sgd(ours), mode=AGC(clip_factor=clip_factor, eps=eps))
    for x, f in data():
        backward(ref, x, f)
        timm_agc.adaptive_clip_grad(ref.parameters(), clip_factor=clip_factor, eps=eps)
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        assert params_equal(ref, ours)
    assert int(opt.state["clip"]["clipped_steps"]) > 0


def test_agc_clips_gradients_like_timm_exactly(timm_agc):
    """The clipped gradients themselves, unit by unit, on many random scales."""
    model = make_model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), mode="agc")
    for scale in (1e-4, 1e-2, 1.0, 1e2):
        x, _ = data(1)[0]
        backward(model, x, scale)
        expect = copy.deepcopy(model)
        for p, q in zip(model.parameters(), expect.parameters()):
            q.grad = p.grad.clone()
        timm_agc.adaptive_clip_grad(expect.parameters())
        opt.step()
        for p, q in zip(model.parameters(), expect.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_agc_param_group_opt_out(timm_agc):
    """NFNets leave the final classifier unclipped: a group with "clip": False."""
    ref, ours = make_model(), make_model()
    body = lambda m: list(m.parameters())[:-2]  # noqa: E731
    head = lambda m: list(m.parameters())[-2:]  # noqa: E731
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    inner = torch.optim.SGD([{"params": body(ours)}, {"params": head(ours), "clip": False}], lr=0.05)
    opt = ClippedOptimizer(inner, mode="agc")
    for x, f in data(20):
        backward(ref, x, f)
        timm_agc.adaptive_clip_grad(body(ref))
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        assert params_equal(ref, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agc_on_weights_measured_together_equals_timm(dtype, timm_agc):
    """Small >= 2-D weights with the same row length are measured by one kernel, a large one
    alone: every unit's bound is still its own weight row's, as timm's (here several weights
    of one row length, a 4-D conv weight, one weight over the batching limit, and biases)."""
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 2),  # 4-D weight, rows of 8
            nn.Flatten(),
            nn.Linear(12, 8),
            nn.Linear(8, 8),  # two weights of row length 8, with the conv's: one kernel
            nn.Linear(8, 8, bias=False),
            nn.Linear(8, 300),
            nn.Linear(300, 300, bias=False),  # 90000 elements: measured alone
            nn.Linear(300, 2),
        ).to(dtype)

    ours, ref = model(), model()
    opt = ClippedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.0), mode=AGC(clip_factor=0.05))
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(4, 2, 3, 3, generator=gen, dtype=dtype)
        for m in (ours, ref):
            backward(m, x, scale)
        timm_agc.adaptive_clip_grad(ref.parameters(), clip_factor=0.05)
        opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert int(opt.state["clip"]["clipped_steps"]) > 0


def test_agc_on_two_weights_of_one_row_length_equals_timm(timm_agc):
    """A batch of exactly two weights measured together (rows of 4) beside one alone."""
    ours, ref = (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2)) for _ in range(2))
    ref.load_state_dict(ours.state_dict())
    opt = ClippedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.0), mode=AGC(clip_factor=0.05))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    for m in (ours, ref):
        m.zero_grad()
        (m(x).pow(2).mean() * 100.0).backward()
    timm_agc.adaptive_clip_grad(ref.parameters(), clip_factor=0.05)
    opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert float(opt.state["clip"]["clip_coef"]) < 1


def _unit_norms(t: torch.Tensor) -> torch.Tensor:
    """AGC's unit norms, flat: each row of a >= 2-D tensor, the whole of a <= 1-D one."""
    return t.norm().reshape(1) if t.ndim <= 1 else t.norm(dim=tuple(range(1, t.ndim)))


def test_agc_records_its_smallest_unit_factor(timm_agc):
    """``clip_coef`` is the smallest factor a unit's gradient was multiplied by, here with a
    zero-initialised layer (whose units are bounded by ``eps``; the layers before it get no
    gradient), as NFNets initialise theirs."""
    ours, ref = make_model(), make_model()
    for m in (ours, ref):
        nn.init.zeros_(m[2].weight)
    opt = ClippedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.0), mode="agc")
    for x, f in data(3):
        for m in (ours, ref):
            backward(m, x, f)
        before = [p.grad.clone() for p in ref.parameters()]
        timm_agc.adaptive_clip_grad(ref.parameters())
        opt.step()
        factors = []
        for g, p in zip(before, ref.parameters()):
            n = _unit_norms(g)
            factors.append(torch.where(n > 0, _unit_norms(p.grad) / n, 1.0))  # no gradient: 1
        smallest = torch.cat(factors).min()
        assert float(smallest) < 1e-2  # the zero-initialised layer's units are clipped hard
        torch.testing.assert_close(opt.state["clip"]["clip_coef"], smallest, rtol=1e-5, atol=0)
        assert float(opt.state["clip"]["threshold"]) == pytest.approx(0.01)


def test_agc_refuses_a_sparse_gradient_with_both_shapes():
    """A sparse gradient has no rows of the weight's shape to measure: a plain ``ValueError``
    that gives both shapes, and nothing is updated."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ClippedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1), mode="agc")
    emb(torch.tensor([1, 3, 3, 7])).sum().backward()
    weight = emb.weight.detach().clone()
    shapes = r"got a gradient of shape \(\d+, 4\) for a parameter of shape \(10, 4\)$"
    with pytest.raises(ValueError, match=r"^mode=AGC\(\) needs dense gradients; " + shapes):
        opt.step()
    assert torch.equal(emb.weight, weight)


# -- AutoClip ----------------------------------------------------------------------------------
def _autoclip_threshold(clipper, key) -> torch.Tensor:
    history = clipper.state[key].get("history") if not isinstance(key, str) else clipper.state[key]
    if history is None or len(history) == 0:
        return torch.tensor(math.inf)
    return torch.quantile(history, clipper.global_quantile or clipper.parameter_groups[0]["quantile"])


@pytest.mark.parametrize("quantile,history_length", [(0.9, 1000), (0.5, 7), (0.25, 10), (1.0, 5), (0.0, 4)])
def test_autoclip_global_equals_package(quantile, history_length):
    ref, ours = make_model(), make_model()
    ref_opt = autoclip_torch.QuantileClip.as_optimizer(sgd(ref), quantile, history_length, global_threshold=True)
    opt = ClippedOptimizer(sgd(ours), mode=AutoClip(quantile=quantile, history_length=history_length))
    for x, f in data():
        backward(ref, x, f)
        expect_threshold = _autoclip_threshold(ref_opt.clipper, "global_history")
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        st = opt.state["clip"]
        assert params_equal(ref, ours)
        assert torch.equal(st["threshold"], expect_threshold)
        assert torch.equal(st["grad_norm"], ref_opt.clipper.state["global_history"][-1])
    assert int(opt.state["clip"]["clipped_steps"]) > 0


@pytest.mark.parametrize("quantile,history_length", [(0.9, 1000), (0.7, 6)])
def test_autoclip_per_param_equals_package(quantile, history_length):
    ref, ours = make_model(), make_model()
    ref_opt = autoclip_torch.QuantileClip.as_optimizer(sgd(ref), quantile, history_length, global_threshold=False)
    opt = ClippedOptimizer(sgd(ours), mode=AutoClip(quantile=quantile, history_length=history_length, per_param=True))
    for x, f in data():
        backward(ref, x, f)
        expect = torch.stack([_autoclip_threshold(ref_opt.clipper, p) for p in ref.parameters()])
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        st = opt.state["clip"]
        assert params_equal(ref, ours)
        assert torch.equal(st["autoclip_thresholds"], expect)
        assert st["threshold"].ndim == 0 and st["threshold"] in expect
        assert torch.equal(
            st["param_norms"], torch.stack([ref_opt.clipper.state[p]["history"][-1] for p in ref.parameters()])
        )
    assert int(opt.state["clip"]["clipped_steps"]) > 0


def test_autoclip_per_param_missing_gradients():
    """A parameter without a gradient keeps its history, as in autoclip (it skips None grads)."""
    ref, ours = make_model(), make_model()
    ref_opt = autoclip_torch.QuantileClip.as_optimizer(sgd(ref), 0.8, 5, global_threshold=False)
    opt = ClippedOptimizer(sgd(ours), mode=AutoClip(quantile=0.8, history_length=5, per_param=True))
    for t, (x, f) in enumerate(data(30)):
        for model, step in ((ref, ref_opt.step), (ours, opt.step)):
            backward(model, x, f)
            if t % 3 == 0:  # the last layer sits out every third step
                model[-1].weight.grad = None
            step()
        assert params_equal(ref, ours)


def test_autoclip_per_param_params_added_later_equal_package():
    """Parameters added by ``add_param_group`` after some steps (one at a time) start with
    empty histories of their own, and the others keep theirs, as in autoclip."""
    ref, ours = make_model(), make_model()
    late = lambda m: [[m[-1].weight], [m[-1].bias]]  # noqa: E731
    body = lambda m: list(m.parameters())[:-2]  # noqa: E731
    ref_opt = autoclip_torch.QuantileClip.as_optimizer(
        torch.optim.SGD(body(ref), lr=0.05, momentum=0.9), 0.7, 6, global_threshold=False
    )
    opt = ClippedOptimizer(
        torch.optim.SGD(body(ours), lr=0.05, momentum=0.9),
        mode=AutoClip(quantile=0.7, history_length=6, per_param=True),
    )
    for t, (x, f) in enumerate(data(30)):
        if t in (8, 17):  # a group of one parameter each time
            i = (8, 17).index(t)
            ref_opt.add_param_group({"params": late(ref)[i]})
            opt.add_param_group({"params": late(ours)[i]})
        backward(ref, x, f)
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        assert params_equal(ref, ours), t
    n = len(list(ours.parameters()))
    assert opt.state["clip"]["autoclip_count"].tolist() == [30] * (n - 2) + [22, 13]


def test_autoclip_per_param_resumes_from_a_checkpoint_without_thresholds():
    """Older per-parameter checkpoints lack ``autoclip_thresholds`` (each step computes them
    anew): they load, and the run goes on as from a full one."""
    seq, k = data(16), 9
    runs = []
    for drop in (False, True):
        model = make_model()
        opt = ClippedOptimizer(sgd(model), mode=AutoClip(per_param=True, history_length=5))
        for x, f in seq[:k]:
            backward(model, x, f)
            opt.step()
        ckpt = copy.deepcopy(opt.state_dict())
        if drop:
            del ckpt["state"]["clip"]["autoclip_thresholds"]
        resumed = ClippedOptimizer(sgd(model), mode=AutoClip(per_param=True, history_length=5))
        resumed.load_state_dict(ckpt)
        for x, f in seq[k:]:
            backward(model, x, f)
            resumed.step()
        runs.append((model, resumed.state["clip"]["autoclip_thresholds"]))
    assert params_equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_a_float64_norm_beyond_float32_does_not_poison_autoclip():
    """A float64 model's finite norm above float32's largest enters the (float32) history as
    that largest value: as an inf, every quantile reaching it was NaN (lerp(inf, inf)), and so
    was every later coefficient, and the weights."""
    model = make_model().double()
    opt = ClippedOptimizer(sgd(model), mode=AutoClip(quantile=1.0, history_length=4))
    for t, (x, f) in enumerate(data(8, spikes={})):
        backward(model, x.double(), 1e40 if t == 2 else f)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), t
        if t == 3:  # the bound is the largest norm of the history: that one
            assert float(opt.state["clip"]["threshold"]) == torch.finfo(torch.float32).max


@pytest.mark.parametrize("length", [1, 2, 5, 33])
def test_sorted_ring_matches_sort_and_quantile(length):
    gen = torch.Generator().manual_seed(length)
    rows = 3
    ring = torch.full((rows, length), math.inf)
    sorted_, count = ring.clone(), torch.zeros(rows, dtype=torch.long)
    history: list[list[float]] = [[] for _ in range(rows)]
    for _ in range(4 * length + 3):
        value = torch.randint(0, 5, (rows,), generator=gen).float() * torch.rand(rows, generator=gen)  # with ties
        accept = torch.rand(rows, generator=gen) > 0.2
        ring, sorted_, count = sorted_ring_push(ring, sorted_, count, value, accept)
        for r in range(rows):
            if accept[r]:
                history[r] = (history[r] + [float(value[r])])[-length:]
            expect = torch.tensor(history[r])
            assert torch.equal(sorted_[r, : len(history[r])], expect.sort().values)
            for q in (0.0, 0.1, 0.5, 0.9, 1.0):
                got = quantile_sorted(sorted_[r : r + 1], count[r : r + 1], q)[0]
                want = torch.quantile(expect, q) if len(history[r]) else torch.tensor(math.inf)
                assert torch.equal(got, want)


# -- ZClip -------------------------------------------------------------------------------------
ZCLIP_CASES = [
    dict(),
    dict(clip_option="mean"),
    dict(clip_option="percentile"),
    dict(skip_update_on_spike=True),
    dict(clip_option="mean", skip_update_on_spike=True),
    dict(clip_option="percentile", skip_update_on_spike=True),
    dict(max_norm=None),
    dict(max_norm=0.5, clip_factor=0.7, z_thresh=2.0),
    dict(max_norm=None, alpha=0.9, warmup_steps=3),
]


def _zclip_reference(kw):
    option = kw.get("clip_option", "adaptive_scaling")
    mode, clip_option = ("percentile", "adaptive_scaling") if option == "percentile" else ("zscore", option)
    return zclip.ZClip(
        alpha=kw.get("alpha", 0.97),
        z_thresh=kw.get("z_thresh", 2.5),
        max_grad_norm=kw.get("max_norm", 1.0),
        warmup_steps=kw.get("warmup_steps", 25),
        mode=mode,
        clip_option=clip_option,
        clip_factor=kw.get("clip_factor", 1.0),
        skip_update_on_spike=kw.get("skip_update_on_spike", False),
    )


@pytest.mark.parametrize("kw", ZCLIP_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_zclip_equals_package(kw):
    ref, ours = make_model(), make_model()
    ref_opt, zc = sgd(ref), _zclip_reference(kw)
    effective = []
    apply = zc._apply_clipping
    zc._apply_clipping = lambda model, clip_val, norm: (
        effective.append((apply(model, clip_val, norm), clip_val)) or effective[-1][0]
    )
    opt = ClippedOptimizer(sgd(ours), mode=ZClip(**kw))
    spikes = 0
    # a spike inside the warm-up too, then spikes once the EMA has settled
    for x, f in data(90, spikes={2: 3.0, 40: 40.0, 55: 8.0, 56: 15.0, 70: 100.0, 85: 5.0}):
        backward(ref, x, f)
        norm = zc.step(ref)
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        st = opt.state["clip"]
        assert params_equal(ref, ours)
        assert float(st["grad_norm"]) == pytest.approx(norm, rel=1e-6)
        if zc.initialized:
            # float64 as the package's Python floats; the variance can differ in the last bit,
            # where CPython's ``d ** 2`` (libm pow, not correctly rounded) is not ``d * d``
            assert float(st["zclip_mean"]) == pytest.approx(zc.mean, rel=1e-14, abs=0)
            assert float(st["zclip_var"]) == pytest.approx(zc.var, rel=1e-14, abs=0)
        if effective and effective[-1][1] is not None:  # a spike: the bound in effect
            spikes += 1
            assert float(st["threshold"]) == pytest.approx(effective.pop()[0], rel=1e-6)
    assert spikes >= 3 and int(opt.state["clip"]["clipped_steps"]) > 0


@pytest.mark.parametrize("clip_option", ["adaptive_scaling", "mean"])
def test_zclip_a_norm_exactly_at_the_z_threshold_is_no_spike(clip_option):
    """A spike is a z-score strictly above ``z_thresh``, as in the package: after a warm-up of
    zero norms (mean 0, std 0) a float64 norm ``g`` has ``z = g / eps``, exactly 2.5 for the
    first norm below and above it for the next float, whose bound is the mean, 0."""
    at = 2.4999999999999998e-06
    assert at / 1e-6 == 2.5 and math.nextafter(at, 1.0) / 1e-6 > 2.5
    for g, spike in ((at, False), (math.nextafter(at, 1.0), True)):
        ours, ref = (nn.Linear(1, 1, bias=False).double() for _ in range(2))
        zc = zclip.ZClip(max_grad_norm=None, warmup_steps=2, clip_option=clip_option)
        opt = ClippedOptimizer(
            torch.optim.SGD(ours.parameters(), lr=0.0),
            mode=ZClip(max_norm=None, warmup_steps=2, clip_option=clip_option),
        )
        for value in (0.0, 0.0, g):
            ours.weight.grad = torch.full((1, 1), value, dtype=torch.float64)
            ref.weight.grad = ours.weight.grad.clone()
            opt.step()
            zc.step(ref)
        assert torch.equal(ours.weight.grad, ref.weight.grad)
        assert float(ours.weight.grad) == (0.0 if spike else g)


def test_zclip_tracks_the_norm_of_the_norm_type():
    """With ``norm_type=1`` ZClip's statistics are of the clipped groups' L1 norm, the one the
    step measures and records (the package knows only L2): its mean after the warm-up is that
    of the warm-up's norms."""
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=ZClip(warmup_steps=5, max_norm=None), norm_type=1.0)
    norms = []
    for x, f in data(5, spikes={}):
        backward(model, x, f)
        want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], 1.0)
        opt.step()
        assert torch.equal(opt.state["clip"]["grad_norm"], want)
        norms.append(float(want))
    assert float(opt.state["clip"]["zclip_mean"]) == pytest.approx(sum(norms) / 5, rel=1e-12)


# -- the host path and the device path -----------------------------------------------------------
#: policy -> (functions only the device path calls, functions only the host path calls)
PATH_FUNCTIONS = [
    (dict(mode=ZClip(warmup_steps=3)), ["zclip_update"], ["zclip_update_host"]),
    (dict(mode=AutoClip(history_length=4)), ["sorted_ring_push", "quantile_sorted"], ["sorted_ring_push_host"]),
    (dict(mode="norm", skip_spikes=SpikeSkip(window=3)), ["spike_test"], ["spike_test_host"]),
]


@pytest.mark.parametrize("kw,device_only,host_only", PATH_FUNCTIONS, ids=["zclip", "autoclip", "spikes"])
def test_a_cpu_step_decides_on_the_host_unless_told_not_to(kw, device_only, host_only, rule_path, monkeypatch):
    """On a CPU the rules decide on the host (a few Python floats instead of dozens of tensor
    ops); with ``policy.HOST_SCALARS`` off they take the accelerator's path. Each path calls
    only its own functions, on every step: inside and after the warm-ups, with spikes."""
    from clipped_optim import adaptive

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} called on the {rule_path} path")

        return call

    for name in host_only if rule_path == "device" else device_only:
        monkeypatch.setattr(adaptive, name, refuse(name))
    model = make_model()
    opt = ClippedOptimizer(sgd(model), **kw)
    for x, f in data(8, spikes={5: 50.0}):
        backward(model, x, f)
        opt.step()
    assert int(opt.state["clip"]["steps"]) == 8


PATH_CASES = [
    dict(),  # the default norm mode: its total is read on the host too
    dict(max_norm=0.05, nonfinite="propagate", top_k=2),
    dict(max_norm=0.05, norm_type=1.0, history_size=0),
    dict(max_norm=1e4, norm_type="inf"),  # never clipped: the host multiplies nothing
]
PATH_CASES += [dict(mode=ZClip(**kw)) for kw in ZCLIP_CASES] + [
    dict(mode=AutoClip(history_length=7)),
    dict(mode=AutoClip(quantile=0.5, history_length=1)),
    dict(mode=AutoClip(quantile=1.0, history_length=4), nonfinite="propagate"),
    dict(mode=AutoClip(quantile=0.3, history_length=1000)),
    dict(mode=AutoClip(per_param=True, history_length=5)),
    dict(mode="agc"),
    dict(mode="norm", skip_spikes=SpikeSkip(window=8, sigma=1.5)),
    dict(mode="norm", skip_spikes=SpikeSkip(window=5, sigma=1.0), nonfinite="propagate"),
    dict(mode=ZClip(warmup_steps=4), skip_spikes=SpikeSkip(window=6, sigma=2.0)),
]
#: step -> loss multiplier: spikes, a NaN and an Inf inside and after every warm-up and window
PATH_FACTORS = {3: 30.0, 6: math.nan, 9: 0.0, 12: math.inf, 14: 40.0, 27: 8.0, 28: 15.0, 33: math.nan, 41: 100.0}


@pytest.mark.parametrize("kw", PATH_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_host_and_device_paths_give_the_same_bits(kw, monkeypatch):
    """A CPU step decides on the host, an accelerator's with tensor ops only: step by step,
    with spikes, NaN/Inf and a zero gradient, both give the same parameters and clip state."""
    models = make_model(), make_model()
    opts = [ClippedOptimizer(sgd(m), **copy.deepcopy(kw)) for m in models]
    for x, f in data(50, spikes=PATH_FACTORS):
        for host, (model, opt) in zip((True, False), zip(models, opts)):
            monkeypatch.setattr(policy, "HOST_SCALARS", host)
            backward(model, x, f)
            opt.step()
        for p, q in zip(*(m.parameters() for m in models)):  # NaN where "propagate" let it in
            torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
        assert_same_state_dict(opts[0].state["clip"], opts[1].state["clip"])
    assert int(opts[0].state["clip"]["nonfinite_steps"]) >= 3  # the NaN and Inf steps were met


def test_host_helpers_equal_the_tensor_ones():
    """The host versions of the sorted ring, its quantile and the spike test, on random
    histories with ties, partly filled and wrapped: the same bits as the tensor functions."""
    gen = torch.Generator().manual_seed(3)
    cases = [(1, torch.float32), (2, torch.float32), (5, torch.float64), (64, torch.float32), (64, torch.float64)]
    for length, dtype in cases:
        ring = torch.full((1, length), math.inf, dtype=dtype)  # float64 under torch.set_default_dtype
        sorted_, count = ring.clone(), torch.zeros(1, dtype=torch.long)
        window = torch.zeros(length + 3, dtype=torch.float64)
        for step in range(3 * length + 4):
            for q in (0.0, 0.1, 0.5, 0.9, 1.0):
                want = quantile_sorted(sorted_, count, q)[0]
                assert torch.equal(quantile_sorted_host(sorted_[0], int(count), q), want)
            value = torch.randint(0, 4, (1,), generator=gen).double() * torch.rand(1, generator=gen)  # with ties
            if step == length + 1:
                value.fill_(1e39)  # a float64 norm beyond float32: held as float32's largest, not inf
            before = ring.clone(), sorted_.clone()
            host = sorted_ring_push_host(ring, sorted_, int(count), float(value))
            assert torch.equal(ring, before[0]) and torch.equal(sorted_, before[1])  # new copies: the old state kept
            ring, sorted_, count = sorted_ring_push(ring, sorted_, count, value)
            assert torch.equal(host[0], ring) and torch.equal(host[1], sorted_)
            assert not sorted_[0, : int(count)].isinf().any()  # so every quantile stays a number
            norm = float(value) * 3
            spike, bound = spike_test(window, torch.tensor(step), torch.tensor(norm), 1.5, 3)
            assert spike_test_host(window, step, norm, 1.5, 3) == (bool(spike), float(bound))
            window[step % window.shape[0]] = float(value)


def test_the_spike_bound_is_the_windows_mean_plus_sigma_sample_deviations():
    """Against Python's ``statistics`` on the same norms: partial windows (the masked sums) and
    full ones (one ``std_mean``), on both paths (the device path picks between the two)."""
    gen = torch.Generator().manual_seed(5)
    length = 9
    for count in (3, 5, 8, 9, 10, 31):
        window = torch.zeros(length, dtype=torch.float64)
        filled = torch.rand(min(count, length), generator=gen, dtype=torch.float64) * 4 + 1
        window[: filled.numel()] = filled
        values = filled.tolist()
        want = statistics.mean(values) + 2.5 * statistics.stdev(values)
        for norm in (want * 0.999, want * 1.001):
            spike, bound = spike_test(window, torch.tensor(count), torch.tensor(norm), 2.5, 4)
            assert float(bound) == pytest.approx(want, rel=1e-13)
            assert bool(spike) == (count >= 4 and norm > want)
            assert spike_test_host(window, count, norm, 2.5, 4) == (bool(spike), float(bound))


def test_the_host_quantile_reads_a_strided_row():
    """A history loaded as a view with strides (a checkpoint's slice): read as its values."""
    base = torch.sort(torch.rand(1, 40, generator=torch.Generator().manual_seed(6))).values
    row = base[:, ::2]
    assert not row.is_contiguous()
    for count in (0, 1, 7, 20, 25):
        for q in (0.0, 0.35, 0.9, 1.0):
            want = quantile_sorted(row, torch.tensor([count]), q)[0]
            assert torch.equal(quantile_sorted_host(row, count, q), want)


def test_host_memory_is_the_tensors_own_memory():
    """Reads give the values the tensor holds, writes land in it, in row-major order; anything
    but a contiguous CPU float32/float64 tensor is refused."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3
    mem = host_memory(t)
    assert list(mem) == t.flatten().tolist()
    mem[4] = 0.1  # rounded to float32 as the tensor would hold it
    assert t[1, 1].item() == torch.tensor(0.1).item()
    d = torch.zeros(3, dtype=torch.float64)
    host_memory(d)[2] = 0.1
    assert d[2].item() == 0.1
    for bad in (t.t(), t.half(), t.long(), torch.zeros(3, device="meta")):
        with pytest.raises(ValueError, match="contiguous CPU float32/float64"):
            host_memory(bad)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_agc_in_another_norm_type_equals_timm(norm_type, timm_agc):
    """AGC measures its units, weights and gradients alike, in the optimizer's ``norm_type``,
    as timm's ``norm_type=``: the rows of the 2-D and 3-D weights too, not only the whole of
    the biases and the LayerNorm's."""
    ref, ours = make_model(), make_model()
    ref_opt = sgd(ref)
    opt = ClippedOptimizer(sgd(ours), mode=AGC(clip_factor=0.01, eps=1e-3), norm_type=norm_type)
    for x, f in data(20):
        backward(ref, x, f)
        timm_agc.adaptive_clip_grad(ref.parameters(), clip_factor=0.01, eps=1e-3, norm_type=norm_type)
        ref_opt.step()
        backward(ours, x, f)
        opt.step()
        assert params_equal(ref, ours)
    assert int(opt.state["clip"]["clipped_steps"]) > 0


def test_the_host_quantile_is_made_on_the_cpu_whatever_the_default_device():
    """The host quantile of a CPU history is a CPU tensor under another default device
    (``torch.set_default_device``, here its context): an empty history's ``inf``, a value
    read as it is, and one interpolated between two."""
    row = torch.tensor([1.0, 2.0, 4.0, math.inf])
    cases = [(0, 0.5), (3, 0.5), (3, 0.25)]  # empty; rank 1 exactly; rank 0.5
    with torch.device("meta"):
        got = [quantile_sorted_host(row, count, q) for count, q in cases]
    for (count, q), value in zip(cases, got):
        assert value.device == torch.device("cpu"), (count, q)
        assert torch.equal(value, quantile_sorted(row.unsqueeze(0), torch.tensor([count]), q)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autoclip_on_a_half_precision_total_decides_on_the_host_as_on_the_device(dtype):
    """``AutoClip.rule`` asked directly (a policy of the user's delegating to it) with a total
    norm of a dtype the host arithmetic does not reproduce: the host rule takes the tensor ops
    for the coefficient, so both paths give the same bits, clipping and not."""
    rule = AutoClip(quantile=0.5, history_length=4)
    cpu = torch.device("cpu")
    states = [rule.init_state(1, cpu), rule.init_state(1, cpu)]
    gen = torch.Generator().manual_seed(10)
    clipped = 0
    for _ in range(12):
        total = (torch.rand((), generator=gen) * 10 + 0.1).to(dtype)
        out = []
        for host, state in zip((True, False), states):
            norms = policy.StepNorms(total, torch.zeros(0), [], [], [], 1, 2.0, None, False, cpu, host)
            decision = rule.rule(norms, state)
            state.update(decision.state)
            out.append(decision)
        (h, d) = out
        assert h.coef.dtype == d.coef.dtype and torch.equal(h.coef, d.coef)
        assert torch.equal(h.threshold, d.threshold)
        clipped += bool(d.coef < 1)
    assert clipped > 0


# -- robustness: one NaN gradient ---------------------------------------------------------------
def test_nonfinite_step_poisons_peers_but_not_ours():
    nan_at = 35
    seq = data(nan_at=nan_at)
    clean = [d for t, d in enumerate(seq) if t != nan_at]
    # the peers: one NaN and the threshold is NaN for good
    model, model2 = make_model(), make_model()
    zc = zclip.ZClip()
    auto = autoclip_torch.QuantileClip.as_optimizer(sgd(model2), global_threshold=True)
    for x, f in seq[: nan_at + 1]:
        backward(model, x, f)
        zc.step(model)
        backward(model2, x, f)
        auto.step()
    assert not all(torch.isfinite(p).all() for p in model2.parameters())  # the weights follow
    assert math.isnan(zc.mean) and math.isnan(zc.var)
    assert torch.isnan(torch.quantile(auto.clipper.state["global_history"], 0.9))
    # ours: the NaN step is skipped and leaves no trace in the history or the EMA
    for kw in (
        dict(mode="zclip"),
        dict(mode="autoclip"),
        dict(mode=AutoClip(per_param=True)),
        dict(mode="agc"),
        dict(mode="norm", skip_spikes=True),
    ):
        with_nan, without = make_model(), make_model()
        a = ClippedOptimizer(sgd(with_nan), **kw)
        b = ClippedOptimizer(sgd(without), **kw)
        for x, f in seq:
            backward(with_nan, x, f)
            a.step()
        for x, f in clean:
            backward(without, x, f)
            b.step()
        assert params_equal(with_nan, without), kw
        sa, sb = a.state["clip"], b.state["clip"]
        assert int(sa["nonfinite_steps"]) == int(sa["skipped_steps"]) == 1
        for key in sb:
            # the counters and the diagnostics' per-step log record the NaN step by design
            if key not in ("steps", "nonfinite_steps", "skipped_steps", "mode", "history"):
                assert torch.equal(sa[key], sb[key]) if torch.is_tensor(sb[key]) else sa[key] == sb[key], (kw, key)
        assert torch.isfinite(sa["threshold"]).any()


# -- spike skipping ----------------------------------------------------------------------------
def test_skip_spikes_skips_outliers_and_keeps_them_out_of_the_history():
    spikes = {40: 1e3, 47: 1e3}
    model, twin = make_model(), make_model()
    opt = ClippedOptimizer(sgd(model), mode=AutoClip(history_length=50), skip_spikes=SpikeSkip(window=32))
    ref = ClippedOptimizer(sgd(twin), mode=AutoClip(history_length=50))
    for t, (x, f) in enumerate(data(STEPS, spikes=spikes)):
        before = [p.clone() for p in model.parameters()]
        backward(model, x, f)
        opt.step()
        if t in spikes:
            assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
        else:
            backward(twin, x, f)
            ref.step()
            assert params_equal(model, twin)  # a skipped spike is as if it never came
    st = opt.state["clip"]
    assert int(st["skipped_steps"]) == len(spikes) and int(st["nonfinite_steps"]) == 0
    assert torch.equal(st["autoclip_sorted"], ref.state["clip"]["autoclip_sorted"])


def test_skip_spikes_waits_for_its_window_then_adapts_to_a_lasting_shift():
    model = make_model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), skip_spikes=SpikeSkip(window=32))
    x, _ = data(1)[0]
    skipped = []
    for t in range(120):
        backward(model, x * (1 + 0.01 * (t % 3)), 1.0 if t < 50 else 50.0)  # a lasting 50x shift at 50
        if t == 5:  # before the window holds 20 norms nothing is skipped
            backward(model, x, 1e4)
        opt.step()
        skipped.append(int(opt.state["clip"]["skipped_steps"]))
    assert skipped[49] == 0
    assert skipped[50] == 1  # the jump is a spike...
    assert skipped[-1] == skipped[-40] < 30  # ...but the new level is learned, not skipped forever


@pytest.mark.parametrize("window,min_count", [(3, 3), (32, 20), (60, 30)])
def test_skip_spikes_starts_once_its_minimum_count_is_in(window, min_count):
    """Spikes are looked for once ``min(window, max(20, window // 2))`` norms are in (as
    OLMo-core): a spike on the step that finds one norm fewer passes, on the next it is skipped."""
    model = make_model()
    x, _ = data(1)[0]
    for at, skipped in ((min_count - 1, 0), (min_count, 1)):
        opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), skip_spikes=SpikeSkip(window=window))
        for t in range(at + 1):
            backward(model, x * (1 + 0.01 * (t % 3)), 1e4 if t == at else 1.0)
            opt.step()
        assert int(opt.state["clip"]["skipped_steps"]) == skipped, (at, skipped)


def test_skip_spikes_with_fused_adamw_leaves_state_untouched():
    model = make_model()
    opt = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        mode=ZClip(warmup_steps=5),
        skip_spikes=SpikeSkip(window=20),
    )
    for t, (x, f) in enumerate(data(40, spikes={35: 1e4})):
        backward(model, x, f)
        before = copy.deepcopy((list(model.parameters()), opt.optimizer.state_dict()["state"]))
        opt.step()
        if t == 35:
            assert all(torch.equal(p, q) for p, q in zip(before[0], model.parameters()))
            after = opt.optimizer.state_dict()["state"]
            assert all(torch.equal(after[i]["exp_avg"], before[1][i]["exp_avg"]) for i in range(len(before[0])))
            assert all(torch.equal(after[i]["step"], before[1][i]["step"]) for i in range(len(before[0])))
    assert int(opt.state["clip"]["skipped_steps"]) == 1


# -- checkpoint resume --------------------------------------------------------------------------
RESUME_CASES = [
    dict(mode="agc"),
    dict(mode=AutoClip(history_length=8)),
    dict(mode=AutoClip(per_param=True, history_length=8)),
    dict(mode=ZClip(warmup_steps=5)),
    dict(mode=ZClip(warmup_steps=20, clip_option="percentile", max_norm=None)),  # resumes inside the warm-up
    dict(mode="norm", skip_spikes=SpikeSkip(window=8)),
    dict(mode="autoclip", skip_spikes=SpikeSkip(window=8)),
]


def _run(model, opt, sched, seq):
    for x, f in seq:
        backward(model, x, f)
        opt.step()
        sched.step()


@pytest.mark.parametrize("kw", RESUME_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_resume_is_bit_identical(kw):
    seq, k = data(40), 17

    def fresh():
        model = make_model()
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)

    straight = fresh()
    _run(*straight, seq)
    first = fresh()
    _run(*first, seq[:k])
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = fresh()
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    resumed[2].load_state_dict(ckpt["sched"])
    _run(*resumed, seq[k:])
    assert params_equal(straight[0], resumed[0])
    a, b = straight[1].state["clip"], resumed[1].state["clip"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_resume_rejects_a_mismatched_history_length():
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=AutoClip(history_length=8))
    x, f = data(1)[0]
    backward(model, x, f)
    opt.step()
    other = ClippedOptimizer(sgd(model), mode=AutoClip(history_length=9))
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"autoclip_ring.*history_length=9"):  # at the load, not at a later step
        other.load_state_dict(opt.state_dict())
    assert_same_state_dict(other.state_dict(), before)


@pytest.mark.parametrize("saved,loaded", [(False, True), (True, False)])
def test_resume_rejects_a_history_of_the_other_kind(saved, loaded):
    # A global history read as parameter 0's (or the reverse) would clip with the wrong bound.
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=AutoClip(per_param=saved, history_length=8))
    x, f = data(1)[0]
    backward(model, x, f)
    opt.step()
    other = ClippedOptimizer(sgd(model), mode=AutoClip(per_param=loaded, history_length=8))
    with pytest.raises(ValueError, match=f"per_param={saved}, but this optimizer uses per_param={loaded}"):
        other.load_state_dict(opt.state_dict())
    assert "autoclip_ring" not in other.state["clip"] and int(other.state["clip"]["steps"]) == 0


def _autoclip_checkpoint(per_param: bool) -> tuple[list[nn.Parameter], dict]:
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=AutoClip(per_param=per_param, history_length=4))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt.state_dict()


def test_resume_rejects_a_history_whose_rows_do_not_fit():
    """A checkpoint without the ``autoclip_per_param`` flag (older ones) is judged by its rows:
    per-parameter rows are refused by a global AutoClip, and keys whose rows disagree by both
    kinds, each time at the load, naming the rows found."""
    params, ckpt = _autoclip_checkpoint(per_param=True)
    del ckpt["state"]["clip"]["autoclip_per_param"]
    other = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=AutoClip(history_length=4))
    with pytest.raises(ValueError, match=r"AutoClip history has rows \[2\] across its keys; expected one in each$"):
        other.load_state_dict(copy.deepcopy(ckpt))
    ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=AutoClip(per_param=True, history_length=4)).load_state_dict(
        copy.deepcopy(ckpt)
    )  # the kind it was kept with takes it
    for per_param in (True, False):
        params, ckpt = _autoclip_checkpoint(per_param)
        clip = ckpt["state"]["clip"]
        clip["autoclip_sorted"] = torch.cat([clip["autoclip_sorted"], clip["autoclip_sorted"]])
        other = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=AutoClip(per_param=per_param, history_length=4))
        want = "one per parameter" if per_param else "one"
        rows = "1, 2" if not per_param else "2, 4"
        with pytest.raises(ValueError, match=rf"has rows \[{rows}\] across its keys; expected {want} in each$"):
            other.load_state_dict(ckpt)


# -- GradScaler and fused inner optimizers -------------------------------------------------------
ADAPTIVE = [
    dict(mode="agc"),
    dict(mode=AutoClip(history_length=10)),
    dict(mode=AutoClip(per_param=True, history_length=10)),
    dict(mode=ZClip(warmup_steps=5)),
    dict(mode=ZClip(warmup_steps=5), skip_spikes=SpikeSkip(window=10)),
]
_ids = lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())  # noqa: E731


@pytest.mark.parametrize("kw", ADAPTIVE, ids=_ids)
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_equals_unscaled(kw, fused):
    """Under GradScaler the modes see the unscaled norms: the run equals the unscaled one
    (the scale is a power of two), and an overflow step is skipped and kept out of the state."""
    scaled, plain = make_model(), make_model()
    opt = ClippedOptimizer(torch.optim.AdamW(scaled.parameters(), lr=1e-2, fused=fused), **kw)
    ref = ClippedOptimizer(torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=fused), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    overflow = 23
    for t, (x, f) in enumerate(data(40)):
        scaled.zero_grad(set_to_none=True)
        loss = scaled(x).pow(2).mean() * (math.inf if t == overflow else f)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if t != overflow:
            backward(plain, x, f)
            ref.step()
        if fused:  # the fused kernel divides by scale/coef, the plain path multiplies: rounding
            for p, q in zip(scaled.parameters(), plain.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            assert params_equal(scaled, plain)
    st = opt.state["clip"]
    assert int(st["skipped_steps"]) == 1 + int(ref.state["clip"]["skipped_steps"])  # the overflow, and any spike
    assert int(st["nonfinite_steps"]) == 1
    assert int(st["clipped_steps"]) > 0


@pytest.mark.parametrize("kw", [dict(mode=AutoClip(history_length=10)), dict(mode=ZClip(warmup_steps=5))], ids=_ids)
def test_fused_fold_matches_unfolded(kw):
    """AutoClip (global) and ZClip clip with one scalar: folded into fused AdamW's grad_scale."""
    a, b = make_model(), make_model()
    fused = ClippedOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True), **kw)
    plain = ClippedOptimizer(torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False), **kw)
    assert fused._can_fold()
    for x, f in data(40):
        for model, opt in ((a, fused), (b, plain)):
            backward(model, x, f)
            opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.state["clip"]["clipped_steps"], plain.state["clip"]["clipped_steps"])


@pytest.mark.parametrize("kw", ADAPTIVE, ids=_ids)
def test_the_device_path_reads_nothing_on_the_host(kw, rule_path):
    """An accelerator's step (the device path) decides with tensor ops only, so it never reads a
    value on the host: with a fused inner optimizer and nothing to skip on the host, no read at
    all. A CPU step decides on the host, which is a read of host memory there."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt = ClippedOptimizer(inner, nonfinite="propagate", **kw)
    for t, (x, f) in enumerate(data(12)):
        backward(model, x, f)
        if t < 2:  # the first step creates the inner state: decided on the host by design
            opt.step()
        elif rule_path == "device":
            with no_host_sync():
                opt.step()
        else:
            with pytest.raises(AssertionError, match="host sync"), no_host_sync():
                opt.step()
            return


def test_non_scalar_adaptive_modes_do_not_fold():
    model = make_model()
    for kw in (dict(mode="agc"), dict(mode=AutoClip(per_param=True))):
        assert not ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), **kw)._can_fold()


# -- options ---------------------------------------------------------------------------------
BAD_FIELDS = [
    (lambda: AGC(clip_factor=0.0), r"AGC: invalid clip_factor=0\.0; expected a positive finite number"),
    (lambda: AGC(eps=-1.0), "AGC: invalid eps"),
    (lambda: AutoClip(quantile=1.5), r"AutoClip: invalid quantile=1\.5; expected a number in \[0, 1\]"),
    (lambda: AutoClip(history_length=0), "history_length"),
    (lambda: AutoClip(history_length=2.5), "history_length"),
    (lambda: AutoClip(per_param="yes"), "per_param"),
    (lambda: ZClip(alpha=1.0), "alpha"),
    (lambda: ZClip(z_thresh=0), "z_thresh"),
    (lambda: ZClip(z_thresh="3"), "ZClip: invalid z_thresh='3'"),
    (lambda: ZClip(warmup_steps=0), "warmup_steps"),
    (lambda: ZClip(clip_option="median"), "clip_option"),
    (lambda: ZClip(skip_update_on_spike=1), "skip_update_on_spike"),
    (lambda: ZClip(max_norm=-1.0), "max_norm"),
    (lambda: SpikeSkip(window=2), "SpikeSkip: invalid window=2"),
    (lambda: SpikeSkip(sigma=math.nan), "sigma"),
]


@pytest.mark.parametrize("make,match", BAD_FIELDS, ids=[str(i) for i in range(len(BAD_FIELDS))])
def test_bad_policy_fields_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


#: (policy, field, a value it refuses, what the message says is allowed)
FIELD_ERRORS = [
    (AGC, "clip_factor", 0.0, "expected a positive finite number"),
    (AGC, "eps", math.inf, "expected a positive finite number"),
    (AutoClip, "quantile", -0.1, r"expected a number in \[0, 1\]"),
    (AutoClip, "history_length", 0, "expected an integer >= 1"),
    (AutoClip, "per_param", 1, "expected True or False"),
    (ZClip, "alpha", 0.0, r"expected a number in \(0, 1\)"),
    (ZClip, "z_thresh", -2.5, "expected a positive finite number"),
    (ZClip, "max_norm", 0.0, "expected a positive finite number"),
    (ZClip, "warmup_steps", True, "expected an integer >= 1"),
    (ZClip, "clip_option", "zscore", "expected one of 'adaptive_scaling', 'mean', 'percentile'"),
    (ZClip, "clip_factor", math.nan, "expected a positive finite number"),
    (ZClip, "skip_update_on_spike", "no", "expected True or False"),
    (SpikeSkip, "sigma", 0, "expected a positive finite number"),
    (SpikeSkip, "window", 2, r"expected an integer >= 3 \(norms in the rolling window\)"),
]


@pytest.mark.parametrize("cls,field,value,allowed", FIELD_ERRORS, ids=lambda v: getattr(v, "__name__", None))
def test_a_bad_field_is_named_with_its_policy_value_and_what_is_allowed(cls, field, value, allowed):
    """The message a user reads: ``<Policy>: invalid <field>=<value>; <what is allowed>``."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: invalid {field}={value!r}; {allowed}$"):
        cls(**{field: value})


def test_the_bounds_of_each_field_are_accepted():
    """The allowed ends of each range are taken, and numbers are kept as floats."""
    assert AutoClip(quantile=0, history_length=1).quantile == 0.0
    assert AutoClip(quantile=1).quantile == 1.0 and type(AutoClip(quantile=1).quantile) is float
    assert SpikeSkip(window=3, sigma=1).window == 3
    assert type(SpikeSkip(sigma=1).sigma) is float and type(AGC(clip_factor=1, eps=1).eps) is float
    z = ZClip(alpha=0.5, z_thresh=1, max_norm=2, warmup_steps=1, clip_factor=3)
    assert (z.alpha, z.z_thresh, z.max_norm, z.warmup_steps, z.clip_factor) == (0.5, 1.0, 2.0, 1, 3.0)
    assert all(type(v) is float for v in (z.alpha, z.z_thresh, z.max_norm, z.clip_factor))
    assert type(AGC(clip_factor=1).clip_factor) is float and type(ZClip(alpha=Fraction(1, 2)).alpha) is float
    # any integer type is kept as a Python int
    sizes = AutoClip(history_length=np.int64(5)), ZClip(warmup_steps=np.int64(3)), SpikeSkip(window=np.int64(4))
    assert [type(v) for v in (sizes[0].history_length, sizes[1].warmup_steps, sizes[2].window)] == [int] * 3
    with pytest.raises(ValueError, match="alpha"):
        ZClip(alpha=1)


BAD = [
    (dict(mode="autoclip", max_norm=None), "max_norm=None"),
    (dict(skip_spikes="on"), "skip_spikes"),
    (dict(mode="zclipp"), "mode"),
    (dict(mode=ZClip), r"mode=ZClip\(\)"),
    (dict(mode=SpikeSkip()), "skip_spikes="),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        ClippedOptimizer(sgd(make_model()), **kw)


MOVED = [
    (dict(mode="zclip", z_thresh=3.0), r"z_thresh= moved.*mode=clipped_optim\.ZClip\(z_thresh=3\.0\)"),
    (dict(mode="zclip", max_norm=None), r"mode=clipped_optim\.ZClip\(max_norm=None\)"),
    (dict(mode="agc", clip_factor=0.02), r"mode=clipped_optim\.AGC\(clip_factor=0\.02\)"),
    (dict(mode="zclip", clip_factor=0.7, alpha=0.9), r"mode=clipped_optim\.ZClip\(clip_factor=0\.7, alpha=0\.9\)"),
    (dict(mode="autoclip", quantile=0.8, per_param=True), r"AutoClip\(quantile=0\.8, per_param=True\)"),
    (dict(mode="norm", quantile=0.5), r"mode=clipped_optim\.AutoClip\(quantile=0\.5\)"),
    (dict(skip_spikes=True, spike_sigma=5), r"skip_spikes=clipped_optim\.SpikeSkip\(sigma=5\)"),
    (dict(spike_window=10), r"skip_spikes=clipped_optim\.SpikeSkip\(window=10\)"),
]


@pytest.mark.parametrize("kw,match", MOVED, ids=[str(i) for i in range(len(MOVED))])
def test_per_mode_keywords_moved_into_the_objects(kw, match):
    """0.1's per-mode keyword arguments are refused with the object form to write instead."""
    with pytest.raises(TypeError, match=match):
        ClippedOptimizer(sgd(make_model()), **kw)


def test_defaults_filled_per_mode():
    model = make_model()
    assert ClippedOptimizer(sgd(model), mode="agc").config.policy == AGC(clip_factor=0.01, eps=1e-3)
    policy = ClippedOptimizer(sgd(model), mode="zclip").config.policy
    assert isinstance(policy, ZClip)
    assert (policy.clip_factor, policy.alpha, policy.z_thresh, policy.warmup_steps, policy.clip_option) == (
        1.0,
        0.97,
        2.5,
        25,
        "adaptive_scaling",
    )
    assert policy.max_norm == 1.0
    assert ClippedOptimizer(sgd(model), mode="autoclip").config.policy == AutoClip(0.9, 1000, False)
    assert ClippedOptimizer(sgd(model), skip_spikes=True).config.skip == SpikeSkip(sigma=6.0, window=128)


@pytest.mark.parametrize("kw", [kw for kw in ADAPTIVE if not getattr(kw["mode"], "per_param", False)], ids=_ids)
def test_flat_grads_equal_plain(kw):
    # (per-parameter AutoClip refuses flat_grads: tests/test_arguments.py)
    """With flat_grads=True (gradients as views of one buffer) every mode gives the same run."""
    a, b = make_model(), make_model()
    flat = ClippedOptimizer(sgd(a), flat_grads=True, **kw)
    plain = ClippedOptimizer(sgd(b), **kw)
    for x, f in data(30):
        for model, opt in ((a, flat), (b, plain)):
            backward(model, x, f)
            opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert torch.equal(flat.state["clip"]["clipped_steps"], plain.state["clip"]["clipped_steps"])


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_an_opted_out_groups_nan_decides_whether_the_clipped_norm_enters_autoclips_history(nonfinite):
    """NaN in a ``{"clip": False}`` group: by default the step is skipped, and its clipped
    groups' norm (finite) must not enter AutoClip's history; with ``nonfinite="propagate"`` the
    step proceeds, and that finite norm does enter it."""
    body, head = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([{"params": [body]}, {"params": [head], "clip": False}], lr=0.0)
    opt = ClippedOptimizer(inner, mode=AutoClip(history_length=4), nonfinite=nonfinite)
    body.grad, head.grad = torch.tensor([3.0, 4.0, 0.0]), torch.ones(2)
    opt.step()
    before = {k: v.clone() for k, v in opt.state["clip"].items() if k.startswith("autoclip_") and torch.is_tensor(v)}
    body.grad, head.grad = torch.tensor([6.0, 8.0, 0.0]), torch.tensor([math.nan, 1.0])
    opt.step()
    clip = opt.state["clip"]
    if nonfinite == "skip":
        assert int(clip["skipped_steps"]) == 1
        for key, value in before.items():
            assert torch.equal(clip[key], value), key
    else:
        assert int(clip["skipped_steps"]) == 0
        assert int(clip["autoclip_count"].sum()) == int(before["autoclip_count"].sum()) + 1
        assert 10.0 in clip["autoclip_ring"].flatten().tolist()


@pytest.mark.parametrize(
    "norm_dtype,bound_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64)],
)
def test_the_host_coefficient_to_a_tensor_bound_equals_the_tensor_ops(norm_dtype, bound_dtype):
    """AutoClip's coefficient to its quantile (a tensor, of another dtype than the norm when the
    gradients are float64 or the default dtype is): the same bits and dtype on the host."""
    from clipped_optim.adaptive import _coef, _coef_host

    gen = torch.Generator().manual_seed(8)
    norms = torch.exp(torch.empty(3000, dtype=torch.float64).uniform_(-30, 30, generator=gen)).tolist()
    bounds = torch.exp(torch.empty(3000, dtype=torch.float64).uniform_(-30, 30, generator=gen)).tolist()
    for n, b in zip(norms + [0.0, math.inf, math.nan], bounds + [1.0, 1.0, 1.0]):
        total, bound = torch.tensor(n, dtype=norm_dtype), torch.tensor(b, dtype=bound_dtype)
        want, got = _coef(total, bound), _coef_host(total, float(total), bound)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
