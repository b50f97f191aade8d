"""The norm history ring buffer, the report and its advice, the logging dict, the plot."""

from __future__ import annotations

import math

import pytest
import torch

from clipped_optim import ClippedOptimizer
from clipped_optim.diagnostics import ClipReport, advise, clip_stats, plot_history


def _opt(max_norm=1.0, history_size=1000, **kw):
    p = torch.nn.Parameter(torch.zeros(4))
    return p, ClippedOptimizer(torch.optim.SGD([p], lr=0.0), max_norm=max_norm, history_size=history_size, **kw)


def _step(p, opt, norm):
    p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
    opt.step()


def _drive(opt, p, norms):
    for n in norms:
        _step(p, opt, n)


# -- the ring buffer --------------------------------------------------------------------------


def test_history_holds_each_steps_norm_threshold_and_coef_in_order():
    p, opt = _opt(max_norm=2.0, history_size=10)
    norms = [0.5, 3.0, 1.0, 8.0]
    _drive(opt, p, norms)
    r = opt.report()
    assert r.steps == [0, 1, 2, 3]
    assert r.norms == pytest.approx(norms)
    assert r.thresholds == pytest.approx([2.0] * 4)
    assert r.coefs == pytest.approx([1.0, 2.0 / 3.0, 1.0, 0.25], rel=1e-5)
    assert r.clipped == 2 and r.clipped_fraction == 0.5


def test_history_wraps_and_keeps_the_last_steps():
    p, opt = _opt(history_size=7)
    norms = [float(i + 1) / 10 for i in range(23)]
    _drive(opt, p, norms)
    r = opt.report()
    assert r.total_steps == 23 and r.window == 7
    assert r.steps == list(range(16, 23))
    assert r.norms == pytest.approx(norms[-7:])
    assert opt.report(window=3).norms == pytest.approx(norms[-3:])


def test_percentiles_match_torch_quantile():
    p, opt = _opt(history_size=100)
    g = torch.Generator().manual_seed(0)
    norms = (torch.rand(60, generator=g) * 5).tolist()
    _drive(opt, p, norms)
    r = opt.report()
    t = torch.tensor(norms, dtype=torch.float64)
    for q, v in r.percentiles.items():
        assert v == pytest.approx(float(torch.quantile(t, q / 100)), rel=1e-5)


def test_recording_the_history_does_not_sync(monkeypatch, device_path):
    """With nonfinite='propagate' a step has no host sync on the device path (an accelerator's;
    a CPU step reads its values on the host); the history must not add one."""
    p, opt = _opt(history_size=5, nonfinite="propagate")
    _step(p, opt, 1.0)  # state created

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for n in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0):
        _step(p, opt, n)
    monkeypatch.undo()
    assert opt.report().norms == pytest.approx([3.0, 4.0, 5.0, 6.0, 7.0])


def test_skipped_steps_are_in_the_history():
    p, opt = _opt(history_size=50)
    _drive(opt, p, [1.0] * 25 + [math.nan] + [1.0] * 4)
    r = opt.report()
    assert r.skipped == 1 and r.skipped_mask[25] and sum(r.skipped_mask) == 1
    assert r.nonfinite_total == 1
    assert r.percentiles[100] == pytest.approx(1.0)  # NaN left out of the percentiles
    assert any("skipped" in s for s in r.advice)


def test_history_size_zero_keeps_counters_only():
    p, opt = _opt(history_size=0)
    _drive(opt, p, [0.5, 2.0, 3.0])
    assert "history" not in opt.state["clip"]
    r = opt.report()
    assert r.total_steps == 3 and r.clipped == 2 and r.percentiles == {}
    assert "history_size=0" in r.advice[0]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_history_size_is_validated(bad):
    with pytest.raises(ValueError, match="history_size"):
        _opt(history_size=bad)


def test_history_survives_a_checkpoint_and_a_resize_resets_it():
    p, opt = _opt(history_size=8)
    _drive(opt, p, [0.5, 2.0, 3.0])
    sd = opt.state_dict()
    q, again = _opt(history_size=8)
    again.load_state_dict(sd)
    assert again.report().norms == pytest.approx([0.5, 2.0, 3.0])
    _step(q, again, 4.0)
    assert opt.report().norms == pytest.approx([0.5, 2.0, 3.0])  # the checkpoint was not edited
    _, resized = _opt(history_size=4)
    resized.load_state_dict(sd)
    assert resized.state["clip"]["history"].shape[0] == 4
    assert resized.report().total_steps == 3


# -- advice -----------------------------------------------------------------------------------


def test_advice_never_active():
    p, opt = _opt(max_norm=100.0)
    _drive(opt, p, [1.0 + 0.01 * i for i in range(100)])
    r = opt.report()
    assert r.clipped == 0
    assert "almost never active" in r.advice[0] and "too high" in r.advice[0]


def test_advice_always_active_says_raise_it():
    p, opt = _opt(max_norm=0.1)
    _drive(opt, p, [1.0 + 0.01 * i for i in range(100)])
    r = opt.report()
    assert r.clipped_fraction == 1.0
    assert "raise the threshold" in r.advice[0]
    assert f"{r.percentiles[90]:.3g}" in r.advice[0]


def test_advice_rare_outliers_is_a_safety_net():
    p, opt = _opt(max_norm=5.0)
    norms = [1.0] * 300
    norms[100] = norms[200] = 80.0
    _drive(opt, p, norms)
    r = opt.report()
    assert r.clipped == 2
    assert "safety-net" in r.advice[0]
    # two outliers are not a stream; recorded without attribution, the report says how to get it
    assert len(r.advice) == 2 and "2 outlier, skipped or non-finite steps" in r.advice[1]
    assert "top_k=3" in r.advice[1]
    p, opt = _opt(max_norm=5.0, top_k=3)
    _drive(opt, p, norms)
    r = opt.report()
    assert len(r.advice) == 1 and [a.steps for a in r.attributions] == [[100, 200]]


def test_advice_stream_of_large_norms_points_at_the_data():
    p, opt = _opt(max_norm=5.0)
    norms = [50.0 if i % 10 == 3 else 1.0 for i in range(200)]
    _drive(opt, p, norms)
    r = opt.report()
    assert any("data pipeline" in s and "rather than clipping harder" in s for s in r.advice)


def test_advice_early_large_norms_only_are_not_a_stream():
    p, opt = _opt(max_norm=5.0)
    norms = [50.0] * 20 + [1.0] * 180  # a noisy start that settles
    _drive(opt, p, norms)
    assert not any("data pipeline" in s for s in opt.report().advice)


def test_advice_too_few_steps():
    p, opt = _opt()
    _drive(opt, p, [1.0] * 5)
    assert opt.report().advice == [advise(opt.report())[0]]
    assert "too few" in opt.report().advice[0]


def test_report_str_has_the_figures_and_advice():
    p, opt = _opt(max_norm=0.1)
    _drive(opt, p, [1.0] * 30)
    text = str(opt.report())
    assert "mode='norm'" in text and "100.0%" in text and "p50 1" in text and "raise the threshold" in text


def test_report_rejects_bad_window():
    p, opt = _opt()
    _drive(opt, p, [1.0])
    with pytest.raises(ValueError, match="window"):
        opt.report(window=0)


# -- logging ----------------------------------------------------------------------------------


def test_stats_is_a_flat_dict_of_floats():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().mul(100).backward()
        opt.step()
    s = opt.stats()
    assert all(type(v) is float for v in s.values())
    assert s["clip/steps"] == 3.0 and s["clip/threshold"] == 0.5
    assert s["clip/clip_rate"] == s["clip/clipped_steps"] / 3
    assert s["clip/grad_norm"] == pytest.approx(float(opt.state["clip"]["grad_norm"]))
    assert "clip/history" not in s and "clip/param_norms" not in s  # only scalars


@pytest.mark.parametrize("as_map", [False, True])
def test_stats_per_layer_by_name(as_map):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1e6)  # p.grad stays pre-clip
    model(torch.randn(8, 3)).sum().backward()
    opt.step()
    names = dict(model.named_parameters()) if as_map else model.named_parameters()
    s = clip_stats(opt, names, prefix="")
    for name, param in model.named_parameters():
        assert s[f"grad_norm/{name}"] == pytest.approx(float(param.grad.norm()), rel=1e-6)


def test_stats_includes_any_scalar_state_a_mode_keeps():
    p, opt = _opt()
    _step(p, opt, 1.0)
    opt.state["clip"]["ema_mean"] = torch.tensor(0.25)  # as an adaptive mode might keep
    assert opt.stats()["clip/ema_mean"] == 0.25


def test_stats_without_a_clip_state_is_a_clear_error():
    with pytest.raises(ValueError, match="clip statistics"):
        clip_stats(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


# -- plot -------------------------------------------------------------------------------------


def test_plot_history_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    p, opt = _opt(max_norm=2.0)
    _drive(opt, p, [1.0, 3.0, 1.0, math.nan, 1.0] * 6)
    path = tmp_path / "h.png"
    ax = plot_history(opt, path=str(path))
    assert path.stat().st_size > 5_000
    labels = ax.get_legend_handles_labels()[1]
    assert {"pre-clip grad norm", "threshold", "clipped", "skipped"} <= set(labels)
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_report_is_a_dataclass_with_advice_field():
    r = ClipReport("norm", 0, 0, 0, 0.0, 0, 0, {}, math.nan, [])
    assert advise(r)[0].startswith("Only 0 steps")


def test_report_after_loading_into_a_new_history_covers_only_recorded_steps():
    # A checkpoint written without a history (or with another size) gives a fresh buffer:
    # the report must not read its zero rows as steps.
    model = torch.nn.Linear(3, 1)
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), history_size=0)
    for _ in range(30):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), history_size=100)
    fresh.load_state_dict(opt.state_dict())
    model(torch.randn(4, 3)).sum().backward()
    fresh.step()
    report = fresh.report()
    assert (report.total_steps, report.window, report.steps) == (31, 1, [30])
    assert report.norms[0] > 0
