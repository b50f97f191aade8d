"""Every inner optimizer x every mode x several norm types, step by step against torch's own
clip functions followed by the same inner optimizer's step."""

from __future__ import annotations

import pytest
import torch

from clipped_optim import ClippedOptimizer
from helpers import INF, Problem, assert_same_params, reference_clip_
from optim_table import TORCH_OPTIMIZER_ROWS, TORCH_OPTIMIZERS

MODES = [
    ("norm", 2.0),
    ("norm", 1.0),
    ("norm", INF),
    ("norm", 3.0),
    ("per_param", 2.0),
    ("per_param", INF),
    ("value", 2.0),
]


def _tolerance(row, dtype):
    # Fused kernels divide by grad_scale = 1/coef where torch multiplies by coef: one rounding.
    if row.fused:
        return (1e-6, 1e-7) if dtype == torch.float32 else (1e-13, 1e-15)
    return (0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,norm_type", MODES, ids=[f"{m}-{n}" for m, n in MODES])
@pytest.mark.parametrize("row", TORCH_OPTIMIZERS, ids=repr)
def test_matches_torch_clip_then_step(row, mode, norm_type, dtype):
    _check_parity(row, mode, norm_type, dtype)


PEER_MODES = [("norm", 2.0), ("per_param", 2.0), ("value", 2.0)]


@pytest.mark.parametrize("mode,norm_type", PEER_MODES, ids=[m for m, _ in PEER_MODES])
@pytest.mark.parametrize("row", TORCH_OPTIMIZER_ROWS, ids=repr)
def test_torch_optimizer_classes_match(row, mode, norm_type):
    _check_parity(row, mode, norm_type, torch.float64)


def _check_parity(row, mode, norm_type, dtype):
    if row.name == "Muon" and dtype == torch.float64:
        pytest.skip("Muon orthogonalises in bfloat16; float32 covers it")
    prob = Problem(row, dtype)
    # Step 0 has a small loss factor (0.2): bounds just above its norms bind on the larger steps only.
    max_norm = 1.1 * prob.typical_norm(norm_type, per_param=mode == "per_param")
    clip_value = 1.1 * prob.typical_norm(INF) if mode == "value" else None
    bound = dict(clip_value=clip_value) if mode == "value" else dict(max_norm=max_norm)
    ours_model, ref_model = prob.clone_model(), prob.clone_model()
    ours = ClippedOptimizer(row.build(list(ours_model.parameters())), mode=mode, norm_type=norm_type, **bound)
    ref = row.build(list(ref_model.parameters()))
    rtol, atol = _tolerance(row, dtype)
    for step in range(len(prob.batches)):
        if row.closure:
            ref_norms = []

            def ref_closure():
                ref.zero_grad()
                loss = prob.backward(ref_model, step)
                ref_norms.append(reference_clip_(ref_model.parameters(), mode, max_norm, norm_type, clip_value))
                return loss

            def our_closure():
                ours.zero_grad()
                loss = prob.backward(ours_model, step)
                return loss

            torch.manual_seed(step)
            ref.step(ref_closure)
            torch.manual_seed(step)
            ours.step(our_closure)
            ref_norm = ref_norms[0]
        else:
            prob.backward(ref_model, step)
            prob.backward(ours_model, step)
            ref_norm = reference_clip_(ref_model.parameters(), mode, max_norm, norm_type, clip_value)
            # Same random draws for optimizers that sample (Adahessian's Hutchinson probes).
            torch.manual_seed(step)
            ref.step()
            torch.manual_seed(step)
            ours.step()
            ref.zero_grad()
            ours.zero_grad()
        assert_same_params(ours_model, ref_model, rtol, atol)
        torch.testing.assert_close(ours.state["clip"]["grad_norm"].to(ref_norm.dtype), ref_norm, rtol=1e-6, atol=0)
    assert int(ours.state["clip"]["steps"]) == len(prob.batches)
    # The problem is built so that the bound binds on some steps and not on others.
    assert 0 < int(ours.state["clip"]["clipped_steps"]) < len(prob.batches)


# -- the norm mode's host path (a CPU step reads its total norm and decides in Python floats)
def _edge_totals(dtype: torch.dtype) -> torch.Tensor:
    """Random norms over many magnitudes, and the edges: 0, the smallest numbers, values next to
    the bound, the largest finite one, inf and NaN."""
    gen = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    spread = torch.exp(torch.empty(20000, dtype=torch.float64).uniform_(-40, 40, generator=gen))
    near = torch.tensor([1.0, 0.5, 2.0, 3.3]).double()
    near = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)])
    edges = torch.tensor([0.0, info.tiny, info.smallest_normal / 4, info.eps, info.max, INF, float("nan")])
    return torch.cat([spread, near - 1e-6, near, edges.double()]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_the_host_coefficient_equals_the_tensor_ops(dtype):
    """The host coefficient has the bits of torch's four ops, for every norm and bound tried."""
    from clipped_optim.modes import global_norm_coef, global_norm_coef_host

    totals = _edge_totals(dtype)
    for max_norm in (1.0, 0.5, 1e-3, 3.3, 0.1, 7e5, 1e-30, 1e-45, 1e39, INF):
        want = global_norm_coef(totals, max_norm)
        got = torch.tensor([global_norm_coef_host(t, max_norm, dtype) for t in totals.tolist()], dtype=dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_the_norm_mode_matches_torch_on_both_paths(dtype, norm_type, rule_path):
    """Each gradient bit for bit as ``clip_grad_norm_`` leaves it, on the host and the device
    path, for clipped and unclipped steps (an unclipped one multiplies nothing on the host, which
    must be the same as multiplying by exactly 1), with the same statistics."""
    gen = torch.Generator().manual_seed(5)
    params, refs = _pair([(7, 3), (5,), (2, 3, 4), (1,)], dtype)
    kinds = set()
    for max_norm in (1e-3, 0.7, 1.0, 3.3, 1e6):
        opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=max_norm, norm_type=norm_type)
        clipped = 0
        for scale in (0.01, 1.0, 30.0, 0.3):
            _set_grads(params, refs, scale, gen)
            want = torch.nn.utils.clip_grad_norm_(refs, max_norm, norm_type)
            want_coef = torch.clamp(max_norm / (want + 1e-6), max=1.0)
            clipped += bool(want_coef < 1)
            kinds.add(bool(want_coef < 1))
            opt.step()
            for p, r in zip(params, refs):
                assert torch.equal(p.grad, r.grad)
            state = opt.state["clip"]
            assert torch.equal(state["grad_norm"], want) and torch.equal(state["clip_coef"], want_coef)
            assert int(state["clipped_steps"]) == clipped
            row = torch.stack([want, state["threshold"], want_coef]).float()
            assert torch.equal(state["history"][int(state["steps"]) - 1, :3], row)
    assert kinds == {True, False}  # clipped and unclipped steps were both met


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "mixed"])
def test_half_gradients_take_the_same_bits_on_both_paths(dtype, monkeypatch):
    """Half-precision norms accumulate in float32 (not torch's way, so no torch reference): the
    host path must still give the device path's bits; so must a model of several dtypes, whose
    total norm is float64 and multiplies every group."""
    from clipped_optim import policy

    gen = torch.Generator().manual_seed(6)
    dtypes = [torch.float32, torch.float64, torch.bfloat16] if dtype == "mixed" else [dtype] * 3
    pairs = [_pair([(7, 3), (5,), (2, 3, 4)], dtypes) for _ in range(2)]
    opts = [ClippedOptimizer(torch.optim.SGD(ps, lr=0.0), max_norm=0.5) for ps, _ in pairs]
    for scale in (0.01, 1.0, 30.0, float("nan"), 0.3):
        grads = [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in pairs[0][0]]
        for host, (params, _), opt in zip((True, False), pairs, opts):
            monkeypatch.setattr(policy, "HOST_SCALARS", host)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for p, q in zip(pairs[0][0], pairs[1][0]):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
        for key in ("grad_norm", "clip_coef", "steps", "clipped_steps", "skipped_steps", "history"):
            a, b = opts[0].state["clip"][key], opts[1].state["clip"][key]
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert int(opts[0].state["clip"]["skipped_steps"]) == 1


def _pair(shapes, dtypes):
    """Two lists of zero parameters of ``shapes``: one dtype for all, or one per shape."""
    dtypes = [dtypes] * len(shapes) if isinstance(dtypes, torch.dtype) else dtypes
    return tuple([torch.zeros(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)] for _ in range(2))


def _set_grads(params, refs, scale, gen):
    for p, r in zip(params, refs):
        g = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        p.grad, r.grad = g.clone(), g.clone()
