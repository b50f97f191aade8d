"""The guarantees, not just examples: property tests over random gradient lists."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipped_optim import clip_grad_norm, clip_grad_norm_per_param, clip_grad_value

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
tensor_lists = st.lists(st.lists(finite, min_size=1, max_size=40), min_size=1, max_size=6)
norm_types = st.sampled_from([1.0, 2.0, 3.0, math.inf])
bounds = st.floats(0.1, 100.0)
SETTINGS = settings(max_examples=150, deadline=None)


def _grads(values, dtype=torch.float64):
    return [torch.tensor(v, dtype=dtype) for v in values]


def _norm(grads, p):
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]).double(), p))


@SETTINGS
@given(tensor_lists, bounds, norm_types)
def test_norm_after_clipping_is_bounded_and_direction_kept(values, max_norm, p):
    grads = _grads(values)
    before = torch.cat([g.flatten() for g in grads]).clone()
    result = clip_grad_norm(grads, max_norm, p)
    after = torch.cat([g.flatten() for g in grads])
    assert _norm(grads, p) <= max_norm * (1 + 1e-6)
    assert math.isclose(float(result.total_norm), float(torch.linalg.vector_norm(before, p)), rel_tol=1e-9)
    if before.abs().max() > 0:
        unit = lambda v: v / torch.linalg.vector_norm(v)  # noqa: E731 (cosine_similarity's eps breaks on tiny vectors)
        assert abs(float(unit(after) @ unit(before)) - 1.0) < 1e-9
        # Only the length changed: every element by the same factor.
        assert torch.allclose(after, before * result.clip_coef, rtol=1e-12, atol=0)


@SETTINGS
@given(tensor_lists, bounds, norm_types)
def test_below_the_threshold_gradients_are_bit_identical(values, slack, p):
    grads = _grads(values)
    before = [g.clone() for g in grads]
    max_norm = _norm(grads, p) * (1 + 1e-9) + 1e-6 + slack  # the bound does not bind
    result = clip_grad_norm(grads, max_norm, p)
    assert float(result.clip_coef) == 1.0
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


@SETTINGS
@given(tensor_lists, bounds, norm_types)
def test_clipping_a_clipped_gradient_changes_nothing(values, max_norm, p):
    grads = _grads(values)
    clip_grad_norm(grads, max_norm, p)
    once = [g.clone() for g in grads]
    clip_grad_norm(grads, max_norm, p)
    # torch's formula, coef = min(1, max_norm / (norm + 1e-6)), is what parity requires; it
    # leaves a clipped gradient's norm just under the bound, so a second clip moves it by at
    # most a relative 1e-6 / max_norm.
    for g, o in zip(grads, once):
        torch.testing.assert_close(g, o, rtol=1e-6 / max_norm + 1e-12, atol=0)


@SETTINGS
@given(tensor_lists, bounds, norm_types)
def test_per_param_bounds_every_tensor(values, max_norm, p):
    grads = _grads(values)
    before = [g.clone() for g in grads]
    clip_grad_norm_per_param(grads, max_norm, p)
    for g, b in zip(grads, before):
        assert float(torch.linalg.vector_norm(g, p)) <= max_norm * (1 + 1e-6)
        if float(torch.linalg.vector_norm(b, p)) + 1e-6 <= max_norm:
            assert torch.equal(g, b)


@SETTINGS
@given(tensor_lists, st.floats(1e-3, 1e3), norm_types)
def test_value_clipping_bounds_every_element(values, clip_value, p):
    grads = _grads(values)
    before = [g.clone() for g in grads]
    result = clip_grad_value(grads, clip_value, p)
    assert all(float(g.abs().max()) <= clip_value for g in grads)
    assert all(torch.equal(g, b.clamp(-clip_value, clip_value)) for g, b in zip(grads, before))
    assert 0.0 <= float(result.clip_coef) <= 1.0


@SETTINGS
@given(tensor_lists, bounds, norm_types, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_foreach_and_loop_agree(values, max_norm, p, dtype):
    a, b = _grads(values, dtype), _grads(values, dtype)
    ra = clip_grad_norm(a, max_norm, p, foreach=True)
    rb = clip_grad_norm(b, max_norm, p, foreach=False)
    torch.testing.assert_close(ra.total_norm, rb.total_norm, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(tensor_lists, bounds, norm_types)
def test_matches_torch_clip_grad_norm_bitwise(values, max_norm, p):
    ours, ref = _grads(values, torch.float32), [torch.nn.Parameter(g) for g in _grads(values, torch.float32)]
    for r in ref:
        r.grad = r.detach().clone()
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm, p)
    result = clip_grad_norm(ours, max_norm, p)
    assert torch.equal(result.total_norm, total)
    assert all(torch.equal(g, r.grad) for g, r in zip(ours, ref))
