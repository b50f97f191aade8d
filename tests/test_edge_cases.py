"""Parameters without grads, no grads, zero grads, empty tensors, mixed dtypes, complex, sparse."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer


def _params(*tensors):
    return [nn.Parameter(t) for t in tensors]


def test_parameters_without_grads_are_ignored_and_reported_as_zero():
    ps = _params(torch.randn(3), torch.randn(4), torch.randn(2))
    ps[0].grad, ps[2].grad = torch.full((3,), 2.0), torch.full((2,), 2.0)
    opt = ClippedOptimizer(torch.optim.SGD(ps, lr=1.0), max_norm=1.0)
    before = ps[1].detach().clone()
    opt.step()
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch.tensor(math.sqrt(20.0)))
    torch.testing.assert_close(opt.state["clip"]["param_norms"], torch.tensor([math.sqrt(12.0), 0.0, math.sqrt(8.0)]))
    assert torch.equal(ps[1], before)


def test_no_grads_at_all():
    ps = _params(torch.randn(3))
    opt = ClippedOptimizer(torch.optim.Adam(ps), max_norm=1.0)
    opt.step()
    clip = opt.state["clip"]
    assert float(clip["grad_norm"]) == 0.0 and float(clip["clip_coef"]) == 1.0
    assert (int(clip["steps"]), int(clip["clipped_steps"]), int(clip["skipped_steps"])) == (1, 0, 0)


@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_all_zero_grads_give_no_nan(mode):
    ps = _params(torch.randn(3), torch.randn(2, 2))
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = ClippedOptimizer(torch.optim.SGD(ps, lr=1.0), mode=mode, clip_value=1.0 if mode == "value" else None)
    opt.step()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ps)
    assert float(opt.state["clip"]["clip_coef"]) == 1.0 and int(opt.state["clip"]["skipped_steps"]) == 0


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_empty_tensors(norm_type):
    ps = _params(torch.randn(0), torch.randn(3), torch.randn(0, 4))
    for p in ps:
        p.grad = torch.ones_like(p) * 3
    opt = ClippedOptimizer(torch.optim.SGD(ps, lr=1.0), max_norm=1.0, norm_type=norm_type)
    opt.step()
    torch.testing.assert_close(
        opt.state["clip"]["grad_norm"], torch.linalg.vector_norm(torch.full((3,), 3.0), norm_type)
    )
    torch.testing.assert_close(torch.linalg.vector_norm(ps[1].grad, norm_type), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_mixed_dtypes_fp32_bf16_fp64():
    torch.manual_seed(0)
    ps = _params(torch.randn(5), torch.randn(7).bfloat16(), torch.randn(3).double())
    grads = [torch.randn_like(p) * 4 for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = ClippedOptimizer(torch.optim.SGD(ps, lr=0.0), max_norm=1.0)
    opt.step()
    exact = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]))
    torch.testing.assert_close(opt.state["clip"]["grad_norm"].double(), exact, rtol=1e-6, atol=0)
    after = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in ps]))
    torch.testing.assert_close(after, torch.tensor(1.0, dtype=torch.float64), rtol=1e-2, atol=0)  # bf16 rounding
    for p, g in zip(ps, grads):  # direction kept, per dtype
        cos = torch.nn.functional.cosine_similarity(p.grad.double(), g.double(), dim=0)
        assert float(cos) > 0.9999
        assert p.grad.dtype == g.dtype


@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_complex_parameters(mode):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, dtype=torch.complex64))
    g = torch.randn(6, dtype=torch.complex64) * 5
    p.grad = g.clone()
    opt = ClippedOptimizer(
        torch.optim.Adam([p]), mode=mode, **(dict(clip_value=0.5) if mode == "value" else dict(max_norm=1.0))
    )
    opt.step()
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch.linalg.vector_norm(g))
    if mode == "value":
        ref = torch.view_as_complex(torch.view_as_real(g).clamp(-0.5, 0.5))
    else:
        ref = g.clone()
        torch.nn.utils.clip_grad_norm_([nn.Parameter(torch.zeros(6, dtype=torch.complex64))], 1.0)
        ref = g * torch.clamp(1.0 / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
    torch.testing.assert_close(p.grad, ref)


@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_sparse_gradients_with_dense_ones(mode):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 1)
    opt_emb = ClippedOptimizer(
        torch.optim.SparseAdam(list(emb.parameters())),
        mode=mode,
        **(dict(clip_value=0.01) if mode == "value" else dict(max_norm=0.5)),
    )
    idx = torch.tensor([1, 1, 4, 7])  # a repeated index: the sparse grad is uncoalesced
    lin(emb(idx)).sum().backward()
    dense = emb.weight.grad.to_dense().clone()
    opt_emb.step()
    got = emb.weight.grad.to_dense()
    if mode == "value":
        expected = dense.clamp(-0.01, 0.01)
    else:
        expected = dense * torch.clamp(0.5 / (torch.linalg.vector_norm(dense) + 1e-6), max=1.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(opt_emb.state["clip"]["grad_norm"], torch.linalg.vector_norm(dense))


def test_param_group_opt_out_is_neither_measured_nor_clipped():
    ps = _params(torch.randn(4), torch.randn(4))
    ps[0].grad, ps[1].grad = torch.full((4,), 3.0), torch.full((4,), 3.0)
    opt = ClippedOptimizer(
        torch.optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "clip": False}], lr=0.0), max_norm=1.0
    )
    opt.step()
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch.tensor(6.0))
    torch.testing.assert_close(torch.linalg.vector_norm(ps[0].grad), torch.tensor(1.0), rtol=1e-5, atol=0)
    assert torch.equal(ps[1].grad, torch.full((4,), 3.0))
    # ...but a NaN there still counts as a non-finite step.
    ps[1].grad[0] = float("nan")
    opt.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1


def test_named_grad_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1e9)
    model(torch.randn(2, 3)).sum().backward()
    expected = {n: torch.linalg.vector_norm(p.grad) for n, p in model.named_parameters()}
    opt.step()
    got = opt.named_grad_norms(model.named_parameters())
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
