"""flat_grads=True: same results as the per-tensor path, one kernel per buffer, and safe when
something replaces ``p.grad``."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipped_optim import ClippedOptimizer

# Mixed sizes (some repeated: blocks; some once: the foreach remainder) and two dtypes.
SHAPES = [(3, 4), (12,), (5,), (2, 2, 2), (7,), (4, 3), (5,), (1,)]
MODES = [
    dict(mode="norm", max_norm=0.5),
    dict(mode="per_param", max_norm=0.3),
    dict(mode="value", clip_value=0.05),
]
INNER = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
}


def make_params(seed: int = 0, dtypes=(torch.float32, torch.float64)) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtypes[i % len(dtypes)])) for i, s in enumerate(SHAPES)
    ]


def backward(params, step: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(100 + step)
    loss = sum(
        (p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() * (i + 1) * scale for i, p in enumerate(params)
    )
    loss.backward()


def pair(inner: str, **kw):
    a_params, b_params = make_params(), make_params()
    flat = ClippedOptimizer(INNER[inner](a_params), flat_grads=True, **kw)
    ref = ClippedOptimizer(INNER[inner](b_params), **kw)
    return (flat, a_params), (ref, b_params)


def assert_same(flat, ref, a_params, b_params, rtol=1e-6):
    for p, q in zip(a_params, b_params):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7)
    for key in ("grad_norm", "clip_coef", "param_norms", "steps", "clipped_steps", "skipped_steps"):
        torch.testing.assert_close(flat.state["clip"][key], ref.state["clip"][key], rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_flat_matches_per_tensor_path(inner, kw, norm_type):
    (flat, a), (ref, b) = pair(inner, norm_type=norm_type, **kw)
    for step in range(4):
        for opt, params in ((flat, a), (ref, b)):
            opt.zero_grad()
            backward(params, step, scale=3.0)
            opt.step()
        assert_same(flat, ref, a, b)
    assert float(ref.state["clip"]["clipped_steps"]) > 0  # the bound was active: a real test
    assert flat._flat.adoptions == 1  # backward accumulated into the views: adopted once


def test_grads_are_views_of_one_buffer_per_dtype_and_zero_grad_keeps_them():
    params = make_params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), flat_grads=True)
    backward(params, 0)
    opt.step()
    buffers = opt._flat.batch_.flat.buffers
    assert sorted(str(k[1]) for k in buffers) == ["torch.float32", "torch.float64"]
    for p in params:
        buf = buffers[(p.device, p.dtype)]
        assert p.grad.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    views = [p.grad for p in params]
    opt.zero_grad()  # set_to_none=True by default: the buffer is zeroed and kept
    assert all(p.grad is v for p, v in zip(params, views))
    assert all(float(b.abs().sum()) == 0 for b in buffers.values())
    backward(params, 1)
    assert all(p.grad is v for p, v in zip(params, views))  # accumulated in place


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
@pytest.mark.parametrize("how", ["assign", "model_zero_grad", "create_graph", "add_param_group"])
def test_replaced_grads_are_readopted_never_silently_dropped(how):
    (flat, a), (ref, b) = pair("AdamW-foreach", max_norm=0.5)
    extra_a, extra_b = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    for step in range(4):
        for opt, params, extra in ((flat, a, extra_a), (ref, b, extra_b)):
            opt.zero_grad()
            if step == 2 and how == "model_zero_grad":
                for p in params:
                    p.grad = None  # what nn.Module.zero_grad() does by default
            if step == 2 and how == "add_param_group":
                opt.add_param_group({"params": [extra]})
                params.append(extra)
            backward(params, step, scale=3.0)
            if step == 2 and how == "assign":
                params[0].grad = params[0].grad * 2  # a user's hook or rescale
            if step == 2 and how == "create_graph":
                loss = sum((p * p).sum() for p in params)
                loss.backward(create_graph=True)  # autograd replaces p.grad out of place
                for p in params:
                    p.grad = p.grad.detach()
            opt.step()
        assert_same(flat, ref, a, b)
    assert flat._flat.adoptions == 2


def test_parameter_without_gradient_is_left_out_of_the_buffer():
    (flat, a), (ref, b) = pair("SGD", max_norm=0.5)
    for step in range(2):
        for opt, params in ((flat, a), (ref, b)):
            opt.zero_grad()
            backward(params[1:], step)
            opt.step()
        assert_same(flat, ref, a, b)
    assert a[0].grad is None
    assert float(flat.state["clip"]["param_norms"][0]) == 0
    for opt, params in ((flat, a), (ref, b)):  # it gets one later: seen, re-adopted
        opt.zero_grad()
        backward(params, 2)
        opt.step()
    assert_same(flat, ref, a, b)
    assert float(flat.state["clip"]["param_norms"][0]) > 0 and flat._flat.adoptions == 2


def test_clip_false_group_and_sparse_gradients():
    dense = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))]
    emb = torch.nn.Embedding(10, 3, sparse=True)
    groups = [{"params": dense}, {"params": [emb.weight], "clip": False}]
    opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), max_norm=0.1, flat_grads=True)
    for _ in range(2):
        opt.zero_grad()
        ((dense[0] * 5).sum() + (dense[1] * 5).sum() + emb(torch.tensor([1, 2])).sum()).backward()
        opt.step()
    assert opt._flat.batch_.flat is not None
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch.tensor(5 * math.sqrt(24)))
    # a sparse gradient inside a clipped group: not flattened, still clipped
    opt2 = ClippedOptimizer(torch.optim.SGD([emb.weight] + dense, lr=0.1), max_norm=0.1, flat_grads=True)
    opt2.zero_grad()
    ((dense[0] * 5).sum() + emb(torch.tensor([1, 2])).sum()).backward()
    opt2.step()
    assert opt2._flat.batch_ is None
    total = math.sqrt(float(dense[0].grad.square().sum()) + float(emb.weight.grad.coalesce()._values().square().sum()))
    assert total == pytest.approx(0.1, rel=1e-5)


def test_half_gradients_accumulate_the_norm_in_float32():
    params = [torch.nn.Parameter(torch.full((4096,), 60000.0, dtype=torch.float16)) for _ in range(3)]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=1.0, flat_grads=True)
    for p in params:
        p.grad = torch.full_like(p, 60000.0)
    opt.step()
    expected = 60000.0 * math.sqrt(3 * 4096)
    assert float(opt.state["clip"]["grad_norm"]) == pytest.approx(expected, rel=1e-3)
    assert math.isfinite(float(opt.state["clip"]["grad_norm"]))


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach_default", "foreach_False"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_per_parameter_norms_on_the_buffers_match_torch(dtype, norm_type, foreach):
    """``param_norms`` with flat buffers, for gradients of repeated sizes (one kernel per size)
    and of sizes that occur once: each is torch's ``vector_norm`` of that gradient, accumulated
    in float32 for half precision (60000-valued fp16 gradients overflow an fp16 sum)."""
    shapes = [(64, 64), (4096,), (3, 5), (15,), (7,), (4096,)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    opt = ClippedOptimizer(
        torch.optim.SGD(params, lr=0.0), max_norm=1.0, norm_type=norm_type, flat_grads=True, foreach=foreach
    )
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        p.grad = (torch.rand(p.shape, generator=g) * 60000.0 / (i + 1)).to(dtype)
    want = torch.stack([torch.linalg.vector_norm(p.grad.float(), norm_type) for p in params])
    opt.step()
    got = opt.state["clip"]["param_norms"]
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("last", [True, False], ids=["opted_in", "opted_out"])
def test_a_group_whose_clip_flag_changes_between_steps_is_clipped_as_it_now_says(last):
    """With flat buffers the gather is reused while nothing changed (backward accumulates into
    the same views): setting a group's ``clip`` flag between steps must still take effect."""
    runs = []
    for flat in (True, False):
        a, b = torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(6))
        groups = [{"params": [a]}, {"params": [b], "clip": not last}]
        opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.0), max_norm=1.0, flat_grads=flat)
        for step in range(4):
            if step == 2:
                opt.param_groups[1]["clip"] = last
            opt.zero_grad()
            ((a * 2.0).sum() + (b * 3.0).sum()).backward()
            opt.step()
        runs.append((a.grad.clone(), b.grad.clone(), opt.state["clip"]["grad_norm"].clone()))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the last steps clip b, and measure it, exactly when its flag then says so
    assert bool((runs[0][1] < 3.0).all()) is last
    want_norm = math.sqrt(6 * 4.0 + (6 * 9.0 if last else 0.0))
    assert float(runs[0][2]) == pytest.approx(want_norm)


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_clears_the_gradients_outside_the_buffers_as_torch_does(set_to_none):
    """``zero_grad`` with flat buffers zeroes the buffers and keeps the views; a gradient
    outside them (an opted-out group's: one made with ``create_graph=True``, one assigned) is
    zeroed in place and detached, or dropped, as torch's ``Optimizer.zero_grad`` does."""
    flat_params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    # the first has no gradient, the second one with a graph, the third an assigned one
    outside = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = ClippedOptimizer(
        torch.optim.SGD([{"params": flat_params}, {"params": outside, "clip": False}], lr=0.1),
        max_norm=1.0,
        flat_grads=True,
    )
    twins = [torch.nn.Parameter(p.detach().clone()) for p in outside]
    plain = torch.optim.SGD(twins, lr=0.1)
    for params, extra in ((flat_params, outside), ([], twins)):
        (sum((p**2).sum() for p in params + extra[1:2]) * 3).backward(create_graph=True)
        extra[2].grad = torch.ones(3)
    opt.step()
    views = [p.grad for p in flat_params]
    kept = [p.grad for p in outside]
    assert kept[0] is None and kept[1].grad_fn is not None and kept[2].grad_fn is None
    opt.zero_grad(set_to_none=set_to_none)
    plain.zero_grad(set_to_none=set_to_none)
    assert all(p.grad is v and not v.any() for p, v in zip(flat_params, views))
    for p, q, g in zip(outside, twins, kept):
        if set_to_none or g is None:
            assert p.grad is None and q.grad is None
        else:
            assert p.grad is g and torch.equal(p.grad, q.grad) and not p.grad.any()
            assert p.grad.grad_fn is None and not p.grad.requires_grad
            assert q.grad.grad_fn is None and not q.grad.requires_grad


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _clip_ops(n: int):
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(n)] + [torch.nn.Parameter(torch.randn(3, 7))]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1, foreach=True), max_norm=0.1, flat_grads=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # adoption
    for p in params:
        p.grad.normal_()
    with torch.no_grad(), _CountOps() as counter:
        opt._prepare(None, None, fold=False)
    return counter.ops


def test_norm_and_clip_kernels_do_not_grow_with_the_parameter_count():
    few, many = _clip_ops(4), _clip_ops(64)
    assert few == many  # the same kernels for 5 parameters and for 65, decision included
    assert many["mul_.Tensor"] == 1  # the clip: one multiply over the buffer
    assert many["linalg_vector_norm.default"] == 2  # one block of 50-element grads + the global norm
    assert many["_foreach_norm.Scalar"] == 1  # the one lone size


def test_flat_grads_is_validated():
    with pytest.raises(ValueError, match="flat_grads"):
        ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), flat_grads="yes")


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_flat_value_clipping_clamps_as_the_per_tensor_path_and_torch(nonfinite, dtype):
    """Value clipping on the flat buffers clamps every element into ``[-clip_value, clip_value]``
    (a complex one on its real and imaginary parts), whether the bound is decided on the device
    (the default policy can hold the step) or is the plain number (``nonfinite="propagate"``)."""
    runs = []
    for flat in (True, False):
        params = make_params(dtypes=(dtype,))
        opt = ClippedOptimizer(
            torch.optim.SGD(params, lr=0.1), mode="value", clip_value=0.05, nonfinite=nonfinite, flat_grads=flat
        )
        g = torch.Generator().manual_seed(0)
        for i, p in enumerate(params):  # a complex loss has no backward(): gradients as given
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * 0.02 * (i + 1)
        raw = [p.grad.clone() for p in params]
        opt.step()
        runs.append(([p.grad for p in params], raw))
    (got, raw), (want, _) = runs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # torch's clip_grad_value_ (it clips the .grad of what it is given), on the real and
    # imaginary parts of a complex gradient
    holders = [torch.zeros_like(torch.view_as_real(r) if r.is_complex() else r) for r in raw]
    for h, r in zip(holders, raw):
        h.grad = (torch.view_as_real(r) if r.is_complex() else r).clone()
    assert any(bool((h.grad.abs() > 0.05).any()) for h in holders)  # something to clamp
    torch.nn.utils.clip_grad_value_(holders, 0.05)
    for g, h in zip(got, holders):
        torch.testing.assert_close(torch.view_as_real(g) if g.is_complex() else g, h.grad, rtol=0, atol=0)


def test_equal_sizes_share_one_norm_kernel_in_whatever_order_they_come():
    """The norm costs one kernel per distinct gradient size, also when the parameters of one
    size are not next to each other in the optimizer (a transformer's layers interleave them)."""
    params = [torch.nn.Parameter(torch.randn((50,) if i % 2 else (3, 7))) for i in range(12)]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1, foreach=True), max_norm=0.1, flat_grads=True)
    for p in params:
        p.grad = torch.randn_like(p)
    want = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
    opt.step()  # adoption
    torch.testing.assert_close(opt.state["clip"]["param_norms"], want)
    with torch.no_grad(), _CountOps() as counter:
        opt._prepare(None, None, fold=False)
    assert counter.ops["linalg_vector_norm.default"] == 3  # a block per size + the global norm
    assert counter.ops["_foreach_norm.Scalar"] == 0


def test_foreach_false_is_kept_when_a_sparse_gradient_stops_the_flattening():
    """A sparse gradient sends the step down the per-tensor path; ``foreach=False`` must still
    pick the per-tensor kernels there (as it does without ``flat_grads``)."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = ClippedOptimizer(torch.optim.SGD([emb.weight, *dense], lr=0.1), max_norm=0.1, flat_grads=True, foreach=False)
    opt.zero_grad()
    (emb(torch.tensor([1, 2])).sum() + sum((p * 5).sum() for p in dense)).backward()
    with torch.no_grad(), _CountOps() as counter:
        opt._prepare(None, None, fold=False)
    assert opt._flat.batch_ is None  # not flattened
    assert not [op for op in counter.ops if op.startswith("_foreach")]
    assert counter.ops["linalg_vector_norm.default"] >= 3  # one per gradient, and the total
