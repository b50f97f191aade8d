"""The clip functions against torch's own, on every path a user can take.

``clip_grad_norm``, ``clip_grad_norm_per_param`` and ``clip_grad_value`` promise torch's
results (``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``) on the foreach kernels
and on the plain loop (``foreach=False``), with their default ``norm_type``, with a loss scale
still on the gradients, and with nothing to clip. The wrapper's loop path is checked the same
way, step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from clipped_optim import ClippedOptimizer, clip_grad_norm, clip_grad_norm_per_param, clip_grad_value

FOREACH = [True, False]
FOREACH_IDS = ["foreach", "loop"]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
SHAPES = [(3, 4), (5,), (2, 2, 2), (1,)]
#: a power of two, as GradScaler's scale always is: unscaling by it is exact
LOSS_SCALE = 2.0**12


def _grads(seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in SHAPES]


def _params_with(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def _clone(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.clone() for g in grads]


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


def _torch_norms(grads, norm_type=2.0) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])


# -- global norm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e4], ids=["hard", "mild", "never"])
def test_global_norm_matches_clip_grad_norm_(foreach, norm_type, max_norm):
    grads = _grads(1, scale=0.7)
    ref = _params_with(grads)
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=foreach)
    result = clip_grad_norm(grads, max_norm, norm_type, foreach=foreach)
    assert torch.equal(result.total_norm, total)
    assert _same(grads, [p.grad for p in ref])
    torch.testing.assert_close(result.param_norms, _torch_norms(_grads(1, scale=0.7), norm_type), rtol=1e-6, atol=0)
    assert float(result.clip_coef) == float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    assert float(result.threshold) == pytest.approx(max_norm)


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
def test_apply_false_measures_and_leaves_the_gradients(foreach):
    grads = _grads(2, scale=3.0)
    before = _clone(grads)
    result = clip_grad_norm(grads, 0.5, foreach=foreach, apply=False)
    assert _same(grads, before)
    applied = _clone(before)
    clip_grad_norm(applied, 0.5, foreach=foreach)
    assert _same(applied, [g * result.clip_coef for g in before])
    assert float(result.clip_coef) < 1.0


# -- per parameter ----------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_per_param_matches_clip_grad_norm_per_tensor(foreach, norm_type):
    grads = _grads(3)
    ref = _params_with(grads)
    max_norm = float(_torch_norms(grads, norm_type).median())  # some tensors clipped, some not
    coefs = []
    for p in ref:
        n = torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type, foreach=foreach)
        coefs.append(float(torch.clamp(max_norm / (n + 1e-6), max=1.0)))
    result = clip_grad_norm_per_param(grads, max_norm, norm_type, foreach=foreach)
    assert _same(grads, [p.grad for p in ref])
    assert min(coefs) < 1.0 and max(coefs) == 1.0
    assert float(result.clip_coef) == min(coefs)  # the parameter clipped hardest
    assert torch.equal(result.total_norm, torch.nn.utils.get_total_norm(_grads(3), norm_type, foreach=foreach))
    torch.testing.assert_close(result.param_norms, _torch_norms(_grads(3), norm_type), rtol=1e-6, atol=0)
    assert float(result.threshold) == pytest.approx(max_norm)


# -- value ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_value_matches_clip_grad_value_(foreach, dtype):
    grads = _grads(4, dtype)
    ref = _params_with(grads)
    torch.nn.utils.clip_grad_value_(ref, 0.3, foreach=foreach)
    before = _grads(4, dtype)
    result = clip_grad_value(grads, 0.3, foreach=foreach)
    assert _same(grads, [p.grad for p in ref])
    assert float(grads[0].max()) == pytest.approx(0.3, rel=1e-2) and float(grads[0].min()) == pytest.approx(
        -0.3, rel=1e-2
    )
    exact = lambda gs: torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in gs]))  # noqa: E731
    torch.testing.assert_close(result.total_norm.double(), exact(before), rtol=1e-6, atol=0)
    torch.testing.assert_close(result.clip_coef.double(), exact(grads) / exact(before), rtol=1e-6, atol=0)
    assert float(result.threshold) == pytest.approx(0.3)


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
def test_value_coef_is_the_norm_ratio_also_below_norm_one(foreach):
    # A norm under 1 can still be clipped by value: the coefficient is the ratio of the norms.
    grads = [torch.tensor([0.4, -0.05]), torch.tensor([0.2])]
    result = clip_grad_value(grads, 0.1, foreach=foreach)
    before = math.sqrt(0.4**2 + 0.05**2 + 0.2**2)
    after = math.sqrt(0.1**2 + 0.05**2 + 0.1**2)
    assert float(result.total_norm) == pytest.approx(before, rel=1e-6)
    assert float(result.clip_coef) == pytest.approx(after / before, rel=1e-6)
    # ...and exactly 1 when nothing changed, zero gradients included (no 0/0).
    assert float(clip_grad_value([torch.tensor([0.4, -0.05])], 1.0, foreach=foreach).clip_coef) == 1.0
    assert float(clip_grad_value([torch.zeros(3)], 1.0, foreach=foreach).clip_coef) == 1.0


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
def test_value_clamps_complex_gradients_on_both_parts(foreach):
    g = torch.tensor([0.5 - 2.0j, -3.0 + 0.1j, 0.2 + 0.2j], dtype=torch.complex64)
    grads = [g.clone()]
    clip_grad_value(grads, 1.0, foreach=foreach)
    assert torch.equal(grads[0], torch.view_as_complex(torch.view_as_real(g).clamp(-1.0, 1.0)))


# -- the defaults -----------------------------------------------------------------------------------
def test_the_default_norm_is_the_2_norm_as_in_torch():
    grads = _grads(5, scale=2.0)
    ref = _params_with(grads)
    total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    result = clip_grad_norm(grads, 1.0)
    assert torch.equal(result.total_norm, total) and _same(grads, [p.grad for p in ref])

    grads = _grads(5, scale=2.0)
    ref = _params_with(grads)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], 1.0)
    result = clip_grad_norm_per_param(grads, 1.0)
    assert _same(grads, [p.grad for p in ref])
    assert torch.equal(result.total_norm, torch.nn.utils.get_total_norm(_grads(5, scale=2.0)))

    grads = _grads(5, scale=2.0)
    result = clip_grad_value(grads, 0.5)
    assert torch.equal(result.total_norm, torch.nn.utils.get_total_norm(_grads(5, scale=2.0)))


@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_the_wrapper_records_the_2_norm_by_default(mode):
    grads = _grads(6, scale=2.0)
    params = _params_with(grads)
    bound = dict(clip_value=0.5) if mode == "value" else dict(max_norm=1.0)
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=mode, **bound)
    opt.step()
    clip = opt.state["clip"]
    assert torch.equal(clip["grad_norm"], torch.nn.utils.get_total_norm(grads))
    torch.testing.assert_close(clip["param_norms"], _torch_norms(grads), rtol=1e-6, atol=0)


def test_the_wrapper_defaults_to_global_norm_clipping_at_1():
    grads = _grads(7, scale=2.0)
    params, ref = _params_with(grads), _params_with(grads)
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.optim.SGD(ref, lr=0.1).step()
    assert _same([p.detach() for p in params], [p.detach() for p in ref])
    assert float(opt.state["clip"]["threshold"]) == 1.0


# -- a loss scale still on the gradients --------------------------------------------------------------
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_a_loss_scale_is_removed_in_the_clip(foreach, mode):
    """Clipping scaled gradients with ``grad_scale`` equals clipping the unscaled ones."""
    fn = {"norm": clip_grad_norm, "per_param": clip_grad_norm_per_param, "value": clip_grad_value}[mode]
    bound = 0.2 if mode == "value" else 0.8
    plain = _grads(8)
    scaled = [g * LOSS_SCALE for g in _grads(8)]
    want = fn(plain, bound, foreach=foreach)
    got = fn(scaled, bound, foreach=foreach, grad_scale=torch.tensor(LOSS_SCALE))
    assert _same(scaled, plain)  # unscaled and clipped, in one pass
    assert torch.equal(got.total_norm, want.total_norm)
    assert torch.equal(got.param_norms, want.param_norms)
    assert torch.equal(got.clip_coef, want.clip_coef) and float(want.clip_coef) < 1.0


def test_a_loss_scale_is_left_on_the_gradients_with_apply_false():
    scaled = [g * LOSS_SCALE for g in _grads(9)]
    before = _clone(scaled)
    got = clip_grad_norm(scaled, 0.5, apply=False, grad_scale=torch.tensor(LOSS_SCALE))
    want = clip_grad_norm(_grads(9), 0.5, apply=False)
    assert _same(scaled, before)
    assert torch.equal(got.total_norm, want.total_norm) and torch.equal(got.clip_coef, want.clip_coef)


@pytest.mark.parametrize("hold", [False, True], ids=["proceeds", "held"])
def test_a_plain_gate_is_asked_on_the_host_path_as_on_the_device(hold):
    """A gate that is only a callable (no ``on_host``) is called with the total on the host
    path too: a held step leaves the gradients bit-identical, one that proceeds is clipped as
    torch clips, with the statistics of the device path."""
    results = []
    for host in (True, False):
        grads, asked = _grads(4, scale=3.0), []

        def gate(total):
            asked.append(total.clone())
            return torch.tensor(hold), torch.isfinite(total)

        ref = _params_with(grads)
        if not hold:
            torch.nn.utils.clip_grad_norm_(ref, 0.5)
        result = clip_grad_norm(grads, 0.5, gate=gate, host=host)
        assert _same(grads, [p.grad for p in ref]) and len(asked) == 1 and torch.equal(asked[0], result.total_norm)
        results.append(result)
    for got, want in zip(*results):
        assert torch.equal(got, want)


# -- nothing to clip --------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [None, False], ids=["default", "loop"])
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_no_gradients(mode, foreach):
    fn = {"norm": clip_grad_norm, "per_param": clip_grad_norm_per_param, "value": clip_grad_value}[mode]
    for scale in (None, torch.tensor(LOSS_SCALE)):
        result = fn([], 0.5, foreach=foreach, grad_scale=scale)
        assert float(result.total_norm) == 0.0 == float(torch.nn.utils.get_total_norm([]))
        assert float(result.clip_coef) == 1.0
        assert result.param_norms.shape == (0,)
        assert float(result.threshold) == 0.5
        assert result.total_norm.device.type == "cpu" and result.total_norm.dtype == torch.float32


# -- half precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_gradients_are_measured_in_float32(foreach, dtype):
    # A GradScaler-scaled fp16 gradient: the sum of squares (~1e11) overflows fp16's 65504.
    grads = [torch.full((40,), 5e4, dtype=dtype), torch.full((3,), -3e4, dtype=dtype)]
    exact = torch.linalg.vector_norm(torch.cat([g.float() for g in grads]))
    result = clip_grad_norm(grads, 1.0, foreach=foreach)
    assert result.total_norm.dtype == torch.float32
    torch.testing.assert_close(result.total_norm, exact, rtol=1e-6, atol=0)
    assert all(torch.isfinite(g).all() and g.dtype == dtype for g in grads)
    torch.testing.assert_close(
        torch.linalg.vector_norm(torch.cat([g.float() for g in grads])), torch.tensor(1.0), rtol=1e-2, atol=0
    )


# -- the wrapper on the loop path -------------------------------------------------------------------
def _reference_step(params, mode, bound, norm_type):
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, bound, norm_type, foreach=False)
    elif mode == "per_param":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], bound, norm_type, foreach=False)
    else:
        torch.nn.utils.clip_grad_value_(params, bound, foreach=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "mode,norm_type", [("norm", 2.0), ("norm", math.inf), ("per_param", 2.0), ("per_param", 1.0), ("value", 2.0)]
)
def test_wrapper_loop_path_matches_torch_step_by_step(mode, norm_type, dtype):
    ours, ref = _params_with(_grads(10, dtype)), _params_with(_grads(10, dtype))
    bound = {"norm": 1.5, "per_param": 2.5, "value": 0.6}[mode]  # binds on some steps, not all
    options = dict(clip_value=bound) if mode == "value" else dict(max_norm=bound)
    opt = ClippedOptimizer(torch.optim.SGD(ours, lr=0.1), mode=mode, norm_type=norm_type, foreach=False, **options)
    ref_opt = torch.optim.SGD(ref, lr=0.1, foreach=False)
    for step in range(4):
        scale = [0.2, 3.0, 1.0, 8.0][step]
        for p, q, g in zip(ours, ref, _grads(20 + step, dtype, scale)):
            p.grad, q.grad = g.clone(), g.clone()
        want = torch.linalg.vector_norm(torch.cat([q.grad.double().flatten() for q in ref]), norm_type)
        _reference_step(ref, mode, bound, norm_type)
        opt.step()
        assert _same([p.grad for p in ours], [q.grad for q in ref]), step
        ref_opt.step()
        assert _same([p.detach() for p in ours], [q.detach() for q in ref]), step
        torch.testing.assert_close(opt.state["clip"]["grad_norm"].double(), want, rtol=1e-6, atol=0)
    assert 0 < int(opt.state["clip"]["clipped_steps"]) < 4


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_a_skipped_step_leaves_every_gradient_bit_identical(mode, foreach):
    grads = _grads(11, scale=5.0)
    grads[1][2] = math.inf
    grads[2][0, 1, 1] = -math.inf
    grads[3][0] = math.nan
    params = _params_with(grads)
    options = dict(clip_value=0.1) if mode == "value" else dict(max_norm=0.1)
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=mode, foreach=foreach, **options)
    weights = [p.detach().clone() for p in params]
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(g)) and torch.equal(p.grad.isnan(), g.isnan())
    assert _same([p.detach() for p in params], weights)
    assert int(opt.state["clip"]["skipped_steps"]) == 1


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex64], ids=str)
def test_wrapper_value_mode_rounds_the_bound_as_torch(foreach, dtype):
    # The wrapper clamps with a bound tensor (inf for a held step); in every dtype it must
    # round clip_value exactly as torch rounds the Python number.
    g = torch.Generator().manual_seed(12)
    grad = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    ours, ref = nn.Parameter(torch.zeros_like(grad)), nn.Parameter(torch.zeros_like(grad))
    ours.grad, ref.grad = grad.clone(), grad.clone()
    opt = ClippedOptimizer(torch.optim.SGD([ours], lr=0.0), mode="value", clip_value=0.1, foreach=foreach)
    opt.step()
    if dtype.is_complex:
        want = torch.view_as_complex(torch.view_as_real(grad).clamp(-0.1, 0.1))
    else:
        torch.nn.utils.clip_grad_value_([ref], 0.1, foreach=foreach)
        want = ref.grad
    assert torch.equal(ours.grad, want)


# -- which kernels run ------------------------------------------------------------------------------
class _Kernels(TorchDispatchMode):
    """The names of the ops that read or write the given gradients."""

    def __init__(self, grads) -> None:
        super().__init__()
        self.ptrs = {g.untyped_storage().data_ptr() for g in grads}
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
        if any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in self.ptrs for x in flat):
            self.ops.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("foreach", [None, True, False], ids=["default", "foreach", "loop"])
@pytest.mark.parametrize(
    "mode,flat",
    [("norm", False), ("per_param", False), ("value", False), ("norm", True)],
    ids=["norm", "per_param", "value", "norm-flat"],
)
def test_foreach_chooses_the_kernels(mode, flat, foreach):
    """``foreach=False`` runs torch's per-tensor kernels only; otherwise the foreach ones (CPU has
    them). With ``flat_grads`` the multiply is one kernel over the buffer, and ``foreach`` decides
    how the norms of the gradients of a size of their own are taken."""
    params = _params_with(_grads(13, scale=5.0))
    options = dict(clip_value=0.1) if mode == "value" else dict(max_norm=0.1)
    opt = ClippedOptimizer(
        torch.optim.SGD(params, lr=0.1, foreach=False), mode=mode, foreach=foreach, flat_grads=flat, **options
    )
    opt.step()  # with flat_grads, the gradients become views of one buffer here
    for p, g in zip(params, _grads(14, scale=5.0)):
        p.grad.copy_(g)
    with _Kernels([p.grad for p in params]) as kernels:
        opt.step()
    used_foreach = {op for op in kernels.ops if op.startswith("_foreach")}
    if foreach is False:
        assert not used_foreach, kernels.ops
        assert "linalg_vector_norm" in kernels.ops
    else:
        assert "_foreach_norm" in used_foreach, kernels.ops
        if not flat:
            assert ("_foreach_clamp_max_" if mode == "value" else "_foreach_mul_") in used_foreach, kernels.ops


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_foreach_chooses_the_kernels_of_the_functions(mode, foreach):
    fn = {"norm": clip_grad_norm, "per_param": clip_grad_norm_per_param, "value": clip_grad_value}[mode]
    grads = _grads(14, scale=5.0)
    with _Kernels(grads) as kernels:
        fn(grads, 0.1, foreach=foreach)
    assert any(op.startswith("_foreach") for op in kernels.ops) == foreach, kernels.ops


# -- one tensor is one gradient ---------------------------------------------------------------------
def test_one_tensor_is_one_gradient_not_a_list_of_rows():
    g = torch.tensor([[3.0, -4.0], [0.0, 0.5]])
    ref = nn.Parameter(torch.zeros(2, 2))
    ref.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    grad = g.clone()
    result = clip_grad_norm_per_param(grad, 1.0)
    assert torch.equal(grad, ref.grad)  # clipped as a whole, not row by row
    assert result.param_norms.shape == (1,)
    assert clip_grad_norm(g.clone(), 1.0).param_norms.shape == (1,)
    assert clip_grad_value(g.clone(), 1.0).param_norms.shape == (1,)


def test_foreach_on_a_device_without_foreach_kernels():
    grads = [torch.ones(3, device="meta"), torch.ones(2, 2, device="meta")]
    with pytest.raises(RuntimeError, match="foreach=True was passed, but foreach kernels are not supported on meta"):
        clip_grad_norm(grads, 1.0, foreach=True)
    result = clip_grad_norm(grads, 1.0)  # the default falls back to the per-tensor loop
    assert result.total_norm.device.type == "meta"
