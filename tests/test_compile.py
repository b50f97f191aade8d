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


COMPILED_STEPS = [
    dict(mode="norm", max_norm=0.5),
    dict(mode="norm", max_norm=0.5, flat_grads=True),
    dict(mode="norm", max_norm=0.5, skip_spikes=True, spike_window=3),
    dict(mode="per_param", max_norm=0.3),
    dict(mode="value", clip_value=0.05),
    dict(mode="agc"),
    dict(mode="autoclip", history_length=4),
    dict(mode="zclip", warmup_steps=2),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kw", COMPILED_STEPS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_compiled_training_step_matches_eager(kw):
    """Every mode (and the options that change the step) inside a torch.compile'd training step
    with graph breaks allowed: the same parameters and statistics as eager, a NaN batch skipped."""
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kw)

        def train_step(x, model=model, opt=opt):
            loss = model(x).pow(2).sum() * 5
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        g = torch.Generator().manual_seed(1)
        for i in range(5):
            x = torch.randn(6, 4, generator=g)
            if i == 2:
                x[0, 0] = float("nan")  # a NaN batch: skipped in both
            step(x)
        runs[compiled] = (model, opt)
    (eager, eager_opt), (comp, comp_opt) = runs[False], runs[True]
    for p, q in zip(comp.parameters(), eager.parameters()):  # inductor rounds AdamW's math its own way
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)
    for key in ("steps", "skipped_steps", "nonfinite_steps", "clipped_steps"):
        assert int(comp_opt.state["clip"][key]) == int(eager_opt.state["clip"][key]), key
    assert int(comp_opt.state["clip"]["skipped_steps"]) >= 1
