"""GradScaler: clipping sees unscaled gradients; overflow steps are skipped; the scale
evolves exactly as it does without the wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer

INNERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "SGD-fused": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
}


def _train(inner_name, wrap, mode="norm", inject=(2,), pre_unscale=False, steps=7, grad_dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(grad_dtype)
    inner = INNERS[inner_name](list(model.parameters()))
    bound = dict(clip_value=0.05) if mode == "value" else dict(max_norm=0.5)
    opt = ClippedOptimizer(inner, mode=mode, **bound) if wrap else inner
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    g = torch.Generator().manual_seed(1)
    scales, seen_norms = [], []
    for i in range(steps):
        x, y = torch.randn(16, 6, generator=g, dtype=grad_dtype), torch.randn(16, 3, generator=g, dtype=grad_dtype)
        scaler.scale(nn.functional.mse_loss(model(x), y) * (1 + i)).backward()
        if i in inject:
            model[0].weight.grad[0, 0] = float("inf")
        if not wrap or pre_unscale:
            scaler.unscale_(opt)
        if not wrap:
            n = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            seen_norms.append(float(n))
            if mode == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            else:
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
        scaler.step(opt)
        if wrap:
            seen_norms.append(float(opt.state["clip"]["grad_norm"]))
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return model, scales, seen_norms, opt


@pytest.mark.parametrize("pre_unscale", [False, True], ids=["scaler-step", "unscale-then-step"])
@pytest.mark.parametrize("mode", ["norm", "value"])
@pytest.mark.parametrize("inner", list(INNERS))
def test_grad_scaler_matches_manual_unscale_clip_step(inner, mode, pre_unscale):
    ref_model, ref_scales, ref_norms, _ = _train(inner, wrap=False, mode=mode)
    model, scales, norms, opt = _train(inner, wrap=True, mode=mode, pre_unscale=pre_unscale)
    assert scales == ref_scales  # growth and back-off unchanged
    assert ref_scales[2] < ref_scales[1]  # the injected inf did back off
    # The recorded norms are the unscaled ones (the scale is 2**12 and more).
    finite = [i for i in range(len(norms)) if i != 2]
    torch.testing.assert_close(torch.tensor([norms[i] for i in finite]), torch.tensor([ref_norms[i] for i in finite]))
    tol = dict(rtol=2e-6, atol=1e-7) if "fused" in inner else dict(rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
    st = opt.state["clip"]
    assert (int(st["steps"]), int(st["skipped_steps"]), int(st["nonfinite_steps"])) == (7, 1, 1)


def test_overflow_step_leaves_parameters_and_state_untouched():
    model, _, _, opt = _train("AdamW-foreach", wrap=True, inject=(0, 1, 2, 3), steps=4)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert [k for k in opt.state if k != "clip"] == []


def test_raise_policy_does_not_raise_on_scaler_overflow():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 3)).sum()).backward()
    model.weight.grad.fill_(float("inf"))
    scaler.step(opt)  # routine overflow while the scale calibrates: skipped, not raised
    scaler.update()
    assert int(opt.state["clip"]["skipped_steps"]) == 1


def test_fp16_scaled_gradient_norm_does_not_overflow():
    # 4096 fp16 entries of 60000: the sum of squares is 1.5e13, far beyond fp16's 65504.
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=1.0), max_norm=1.0)
    opt.step()
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch.tensor(60000.0 * 64), rtol=1e-5, atol=0)
    assert int(opt.state["clip"]["skipped_steps"]) == 0
    torch.testing.assert_close(torch.linalg.vector_norm(p.grad.float()), torch.tensor(1.0), rtol=1e-3, atol=0)


def test_bf16_autocast_without_scaler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(32, 8)).float().pow(2).mean() * 100
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert int(opt.state["clip"]["clipped_steps"]) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_does_not_warn_when_the_first_step_overflows():
    # Unwrapped, a skipped first scaler step makes the LR scheduler warn that it ran before
    # optimizer.step(); the wrapper's step is always called (it skips internally).
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 3)).sum()).backward()
    model.weight.grad.fill_(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1
