"""The norm/clip/statistics path has no host sync: it compiles with ``fullgraph=True`` (a
``.item()`` or ``if tensor`` would be a graph break, hence an error) and matches eager; with
``flat_grads=True`` it compiles with one graph break (the storage check of the views)."""

from __future__ import annotations

import pytest
import torch

from clipped_optim import ClippedOptimizer

SHAPES = [(8, 4), (8,), (8, 4), (3,)]


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def clip_path(opt: ClippedOptimizer):
    """What ``step()`` runs before the inner step: gather, norm, clip, decide, record."""
    result, _, _, skip, _ = opt._clip_and_record(None, None, fold=False)
    return result.total_norm, result.param_norms, skip


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_clip_path_compiles_fullgraph_and_matches_eager(flat):
    torch._dynamo.reset()
    a, b = make_params(), make_params()
    kw = dict(max_norm=0.5, nonfinite="propagate", flat_grads=flat)
    compiled_opt = ClippedOptimizer(torch.optim.SGD(a, lr=0.1), **kw)
    eager_opt = ClippedOptimizer(torch.optim.SGD(b, lr=0.1), **kw)
    # Per tensor, any graph break raises. Flat, one is expected: the check that every view still
    # points into its buffer (a ``p.grad.data = t`` swap) reads data pointers, which dynamo
    # cannot trace, so it runs eagerly.
    compiled = torch.compile(clip_path, fullgraph=not flat)
    for step in range(3):
        for opt, params in ((compiled_opt, a), (eager_opt, b)):
            opt.zero_grad()
            g = torch.Generator().manual_seed(step)
            sum((p * torch.randn(p.shape, generator=g)).sum() * 3 for p in params).backward()
        got = compiled(compiled_opt)
        want = clip_path(eager_opt)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
        for key in ("grad_norm", "clip_coef", "param_norms", "steps", "clipped_steps"):
            torch.testing.assert_close(compiled_opt.state["clip"][key], eager_opt.state["clip"][key], rtol=1e-6, atol=0)
    assert int(compiled_opt.state["clip"]["clipped_steps"]) == 3
