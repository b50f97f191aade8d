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
