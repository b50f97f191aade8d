"""Save -> load into fresh objects -> continue is bit-identical to never stopping."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer

OPTIONS = {
    "norm": dict(mode="norm", max_norm=0.3),
    "norm-inf": dict(mode="norm", max_norm=0.1, norm_type=float("inf")),
    "per_param": dict(mode="per_param", max_norm=0.2),
    "value": dict(mode="value", clip_value=0.01),
}


def _setup(options, fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused), **options)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 5, generator=g)
        loss = model(x).pow(2).mean() * (10.0 if i % 3 == 0 else 1.0)
        loss.backward()
        if i == 4:
            model[0].bias.grad[0] = float("nan")  # a skipped step inside the checkpointed span
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_resume_is_bit_identical(name, fused):
    model, opt, sched = _setup(OPTIONS[name], fused)
    _train(model, opt, sched, range(12))

    model2, opt2, sched2 = _setup(OPTIONS[name], fused)
    _train(model2, opt2, sched2, range(6))
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3, opt3, sched3 = _setup(OPTIONS[name], fused)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    saved_steps = ckpt["opt"]["state"]["clip"]["steps"].clone()
    _train(model3, opt3, sched3, range(6, 12))

    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    for key in ("steps", "clipped_steps", "skipped_steps", "nonfinite_steps", "grad_norm", "clip_coef"):
        assert torch.equal(opt.state["clip"][key], opt3.state["clip"][key]), key
    assert int(opt3.state["clip"]["skipped_steps"]) == 1
    # Continuing did not write into the checkpoint that was loaded.
    assert torch.equal(ckpt["opt"]["state"]["clip"]["steps"], saved_steps)


def test_loading_a_checkpoint_of_another_mode_is_refused():
    model, opt, _ = _setup(OPTIONS["norm"], False)
    _train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt), range(2))
    other = ClippedOptimizer(torch.optim.AdamW(model.parameters()), mode="per_param")
    with pytest.raises(ValueError, match="mode='norm'"):
        other.load_state_dict(opt.state_dict())


def test_checkpoint_written_before_a_failure_loads():
    model, opt, sched = _setup(dict(mode="norm", max_norm=0.3, nonfinite="raise"), False)
    _train(model, opt, sched, range(3))
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    model[0].weight.grad = torch.full_like(model[0].weight, float("inf"))
    with pytest.raises(FloatingPointError):
        opt.step()
    model2, opt2, _ = _setup(dict(mode="norm", max_norm=0.3, nonfinite="raise"), False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)  # the failed step changed nothing


def _checkpoint(top_k: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), history_size=8, top_k=top_k)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    opt.name_parameters(model.named_parameters())
    return model, opt.state_dict()


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("history", torch.zeros(8, 5), r"invalid 'history'.*shape \('\*', 4 \+ 2 \* top_k\), got .* shape \(8, 5\)"),
        ("history", torch.zeros(8, 2), r"invalid 'history'.*got .* shape \(8, 2\)"),
        ("param_names", "0.weight", r"invalid 'param_names': expected a list of str \(or None\), got str"),
        ("param_names", ["0.weight", 3], r"invalid 'param_names': expected a list of str \(or None\), got list"),
    ],
    ids=["history-odd-width", "history-too-narrow", "names-a-string", "names-not-strings"],
)
def test_a_checkpoint_with_a_malformed_record_is_refused_before_anything_changes(key, value, pattern):
    model, sd = _checkpoint()
    sd["state"]["clip"][key] = value
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), history_size=8, top_k=1)
    with pytest.raises(ValueError, match=r"^ClippedOptimizer: the checkpoint's clip state has an " + pattern):
        opt.load_state_dict(sd)
    assert int(opt.state["clip"]["steps"]) == 0


@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_a_checkpoint_of_any_top_k_loads_with_names_some_unknown(top_k):
    # Attribution widths are free to differ between save and load; an unnamed parameter is None.
    model, sd = _checkpoint(top_k)
    sd["state"]["clip"]["param_names"][1] = None
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), history_size=8, top_k=1)
    opt.load_state_dict(sd)
    assert opt.state["clip"]["param_names"][:2] == ["0.weight", None]
    assert opt.state["clip"]["history"].shape == (8, 6) and int(opt.state["clip"]["steps"]) == 1
