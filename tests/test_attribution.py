"""Attribution: each step's top parameter norms in the history, and the report naming them.

A spike is injected into known parameters' gradients; the report must name those parameters,
on every path that measures the norms (foreach or not, flat buffers, a fused kernel, the
per-parameter and value modes, a GradScaler), through a checkpoint, and without a sync.
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer as _ClippedOptimizer
from clipped_optim import plot_history
from clipped_optim.attribution import Attribution, describe
from clipped_optim.stats import history_columns, top_row

# Attribution is opt-in (top_k=0 by default, see docs/forensics.md): these tests turn it on,
# unless a test passes its own top_k.
ClippedOptimizer = functools.partial(_ClippedOptimizer, top_k=3)

SPIKE_EVERY, FIRST_SPIKE, STEPS = 20, 5, 60


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 2))


def _train(opt, model, spike=None, nan=None, steps=STEPS, scaler=None, norms=None):
    """SGD-style steps on random data; at the spike steps the gradients of the parameters named
    in ``spike`` are multiplied by 1000 (by ``nan``: one element set to NaN; in ``norms``: set
    to a constant gradient of that norm)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randint(0, 10, (8, 3), generator=g)
        loss = model(x).square().mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if step % SPIKE_EVERY == FIRST_SPIKE:
            for name in spike or ():
                params[name].grad.mul_(1000)
            for name in nan or ():
                params[name].grad.view(-1)[0] = math.nan
            for name, norm in (norms or {}).items():
                grad = params[name].grad
                grad.fill_(norm / math.sqrt(grad.numel()))
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return opt


def _spike_steps():
    return list(range(FIRST_SPIKE, STEPS, SPIKE_EVERY))


PATHS = {
    "foreach": dict(foreach=True),
    "loop": dict(foreach=False),
    "flat": dict(flat_grads=True),
    "per_param": dict(mode="per_param"),
    "value": dict(mode="value", clip_value=0.5),
    "zclip": dict(mode="zclip"),
    "skip_spikes": dict(skip_spikes=True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_dominant_tensor_is_named(path):
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), **PATHS[path])
    _train(opt, model, spike=["2.weight"])
    report = opt.report(model.named_parameters())
    spiked = [a for a in report.attributions if set(a.steps) & set(_spike_steps())]
    assert spiked and all(a.labels[0] == "2.weight" and not a.nonfinite for a in spiked), report
    assert sorted(s for a in spiked for s in a.steps if s in _spike_steps()) == _spike_steps()
    assert all(a.low > 0.9 for a in spiked)
    assert "of the squared norm in 2.weight" in str(report)


def test_the_fused_kernel_path_records_the_same_attribution():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    opt = ClippedOptimizer(inner)
    _train(opt, model, spike=["4.weight"])
    report = opt.report(model.named_parameters())
    assert [a.steps for a in report.attributions] == [_spike_steps()]
    assert report.attributions[0].labels[0] == "4.weight"


def test_a_grad_scaler_records_unscaled_norms():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    _train(opt, model, spike=["2.weight"], scaler=scaler)
    history = opt.state["clip"]["history"]
    # the top norm is that of an unscaled gradient: its square is at most the squared total
    assert (history[:STEPS, 4] <= history[:STEPS, 0] * (1 + 1e-5)).all()
    assert opt.report(model.named_parameters()).attributions[0].labels[0] == "2.weight"


def test_two_tensors_sharing_the_spike_are_both_named():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    _train(opt, model, norms={"2.weight": 300.0, "4.weight": 400.0})
    report = opt.report(model.named_parameters())
    for a in report.attributions:
        assert a.labels[:2] == ["4.weight", "2.weight"], report
        assert a.shares[0] == pytest.approx(0.64, abs=0.01) and a.shares[1] == pytest.approx(0.36, abs=0.01)
    assert "64% of the squared norm in 4.weight (next: 2.weight 36%)" in str(report)
    assert sorted(s for a in report.attributions for s in a.steps) == _spike_steps()


def test_a_nan_in_one_tensor_is_named_and_said_to_be_the_only_one():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    _train(opt, model, nan=["4.bias"])
    report = opt.report(model.named_parameters())
    assert len(report.attributions) == 1
    a = report.attributions[0]
    assert a.nonfinite and a.labels == ["4.bias"] and a.complete and a.skipped == len(_spike_steps())
    assert f"steps {', '.join(map(str, _spike_steps()))} (skipped): non-finite gradient norm in 4.bias" in str(report)


def test_nan_in_more_tensors_than_recorded_says_there_may_be_more():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=2)
    _train(opt, model, nan=["0.weight", "2.weight", "4.bias"], steps=10)
    (a,) = opt.report(model.named_parameters()).attributions
    assert a.nonfinite and not a.complete and set(a.labels) <= {"0.weight", "2.weight", "4.bias"}
    assert "perhaps others: only 2 recorded" in str(a)


def test_without_names_parameters_are_given_by_index_and_shape():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    _train(opt, model, spike=["2.weight"])
    assert opt.report().attributions[0].labels[0] == "param #1 (6x12)"
    assert opt.report(30).window == 30  # an int first is still the window
    with pytest.raises(
        TypeError, match=r"^ClippedOptimizer\.report: window given twice \(positionally and by keyword\)$"
    ):
        opt.report(30, window=30)


def test_the_checkpoint_carries_the_attribution_the_names_and_the_shapes():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    opt.name_parameters(model.named_parameters())
    _train(opt, model, spike=["2.weight"])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    clip = sd["state"]["clip"]
    assert clip["param_names"] == [n for n, _ in model.named_parameters()]
    assert clip["param_shapes"] == [tuple(p.shape) for p in model.parameters()]
    again = ClippedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.01))
    again.load_state_dict(sd)
    assert "param_shapes" not in again.state["clip"]  # redone at each state_dict()
    assert str(again.report()) == str(opt.report())
    assert again.report().attributions[0].labels[0] == "2.weight"


def test_fewer_parameters_than_top_k_are_padded_and_a_new_group_widens_the_record():
    p = nn.Parameter(torch.zeros(3))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), history_size=4)
    p.grad = torch.ones(3)
    opt.step()
    row = opt.state["clip"]["history"][0]
    torch.testing.assert_close(row[4:], torch.tensor([math.sqrt(3), 0.0, 0.0, 0.0, -1.0, -1.0]))
    q = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [q]})
    p.grad, q.grad = torch.ones(3), torch.full((2,), 10.0)
    opt.step()
    row = opt.state["clip"]["history"][1]
    torch.testing.assert_close(row[4:], torch.tensor([math.sqrt(200), math.sqrt(3), 0.0, 1.0, 0.0, -1.0]))


def test_top_row_is_what_the_recorder_writes():
    norms = torch.tensor([0.5, math.nan, 3.0, math.inf, 1.0])
    torch.testing.assert_close(
        top_row(norms, 3), torch.tensor([math.nan, math.inf, 3.0, 1.0, 3.0, 2.0]), equal_nan=True
    )
    torch.testing.assert_close(top_row(norms[:1], 2), torch.tensor([0.5, 0.0, 0.0, -1.0]))
    assert history_columns(1) == ("grad_norm", "threshold", "clip_coef", "skipped", "top_norm_0", "top_index_0")


def test_top_k_0_records_no_attribution_and_is_validated():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=0)
    _train(opt, model, spike=["2.weight"], steps=10)
    assert opt.state["clip"]["history"].shape[1] == 4 and opt.report().attributions == []
    with pytest.raises(ValueError, match="top_k"):
        ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=-1)


def test_a_checkpoint_with_another_top_k_keeps_what_fits():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=3)
    _train(opt, model, spike=["2.weight"], steps=10)
    one = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=1)
    one.load_state_dict(opt.state_dict())
    h3, h1 = opt.state["clip"]["history"], one.state["clip"]["history"]
    assert torch.equal(h1, torch.cat([h3[:, :5], h3[:, 7:8]], dim=1))
    five = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), top_k=5)
    five.load_state_dict(opt.state_dict())
    h5 = five.state["clip"]["history"]
    assert torch.equal(h5[:, :7], h3[:, :7]) and torch.equal(h5[:, 9:12], h3[:, 7:10])
    assert (h5[:, 12:] == -1).all() and (h5[:, 7:9] == 0).all()


def test_recording_the_attribution_does_not_sync(monkeypatch, device_path):
    """On the device path (an accelerator's; a CPU step reads its values on the host)."""
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), nonfinite="propagate")
    _train(opt, model, steps=2)

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the step")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    _train(opt, model, steps=3)


def test_lines_are_capped():
    runs = [Attribution([i], False, [i % 2], [f"p{i % 2}"], [0.9], 0.9, 0.9) for i in range(14)]
    lines = describe(runs)
    assert len(lines) == 11 and lines[-1] == "and 4 more runs of steps"
    assert lines[0] == "step 0: 90% of the squared norm in p0"


def test_many_steps_in_one_run_are_elided():
    a = Attribution(list(range(0, 100, 10)), False, [0], ["w"], [0.97], 0.95, 0.99)
    assert str(a) == "steps 0, 10, 20, 30, 40, 50, ... 90 (10 steps): 95-99% of the squared norm in w"


def test_plot_marks_the_attributed_steps(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    _train(opt, model, spike=["2.weight"])
    ax = plot_history(opt.report(model.named_parameters()), path=str(tmp_path / "h.png"))
    assert any(t.get_text() == "2.weight" for t in ax.texts)
    assert (tmp_path / "h.png").stat().st_size > 0


def test_a_history_swapped_for_another_width_is_written_at_its_width():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), history_size=4)
    _train(opt, model, steps=1)
    opt.state["clip"]["history"] = torch.zeros(4, 6)  # one contributor a row
    _train(opt, model, spike=["2.weight"], steps=6)
    row = opt.state["clip"]["history"][(1 + FIRST_SPIKE) % 4]  # the spike, after the first call's step
    assert float(row[5]) == 1.0 and float(row[4]) > 0.9 * float(row[0])  # in param #1, 2.weight
