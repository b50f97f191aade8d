"""The clip statistics in ``optimizer.state["clip"]``: what a user reads, before and after steps,
and what a checkpoint carries (the history across a load, a resize, a size of 0)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer, SpikeSkip

COUNTERS = ("steps", "clipped_steps", "skipped_steps", "nonfinite_steps")


def _opt(mode="norm", history_size=6, n=4, **kw):
    kw.setdefault("top_k", 0)  # the four base columns; the attribution columns: tests/test_attribution.py
    p = nn.Parameter(torch.zeros(n))
    max_norm, clip_value = kw.pop("max_norm", 1.0), kw.pop("clip_value", 1.0)
    bound = dict(clip_value=clip_value) if mode == "value" else dict(max_norm=max_norm)
    return p, ClippedOptimizer(torch.optim.SGD([p], lr=0.0), mode=mode, history_size=history_size, **bound, **kw)


def _step(p, opt, *values):
    """One step whose gradient is ``values`` followed by zeros (so its norm is easy to name)."""
    g = torch.zeros(p.numel())
    g[: len(values)] = torch.tensor(values)
    p.grad = g
    opt.step()


def _scalar(t, dtype):
    return t.ndim == 0 and t.dtype == dtype


# -- before the first step --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_clip_state_before_the_first_step(mode):
    _, opt = _opt(mode, history_size=5)
    clip = opt.state["clip"]
    assert set(clip) == {
        "mode",
        "grad_norm",
        "clip_coef",
        "threshold",
        "param_norms",
        "history",
        "history_start",
        *COUNTERS,
    }
    assert clip["mode"] == mode
    assert _scalar(clip["grad_norm"], torch.float32) and float(clip["grad_norm"]) == 0.0
    assert _scalar(clip["clip_coef"], torch.float32) and float(clip["clip_coef"]) == 1.0
    assert _scalar(clip["threshold"], torch.float32) and float(clip["threshold"]) == 0.0
    assert clip["param_norms"].shape == (0,) and clip["param_norms"].dtype == torch.float32
    for name in COUNTERS + ("history_start",):
        assert _scalar(clip[name], torch.int64) and int(clip[name]) == 0, name
    assert clip["history"].shape == (5, 4) and clip["history"].dtype == torch.float32
    assert not clip["history"].any()
    assert all(t.device.type == "cpu" for t in clip.values() if torch.is_tensor(t))
    report = opt.report()
    assert report.total_steps == 0 and report.steps == []


def test_no_history_is_kept_with_history_size_0():
    _, opt = _opt(history_size=0)
    assert "history" not in opt.state["clip"] and "history_start" not in opt.state["clip"]


# -- what a step records ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["norm", "per_param", "value"])
def test_a_step_records_its_norm_coefficient_and_bound(mode):
    p, opt = _opt(mode, max_norm=2.0, clip_value=0.5)
    _step(p, opt, 3.0, 4.0)  # norm 5
    clip = opt.state["clip"]
    assert float(clip["grad_norm"]) == pytest.approx(5.0)
    torch.testing.assert_close(clip["param_norms"], torch.tensor([5.0]))
    assert float(clip["threshold"]) == (0.5 if mode == "value" else 2.0)
    # norm: 2/5; value: the clamped gradient (0.5, 0.5) has norm sqrt(0.5)
    want = math.sqrt(0.5) / 5.0 if mode == "value" else 2.0 / (5.0 + 1e-6)
    assert float(clip["clip_coef"]) == pytest.approx(want, rel=1e-6)
    assert [int(clip[k]) for k in COUNTERS] == [1, 1, 0, 0]


def test_counters_count_what_each_step_did():
    p, opt = _opt(max_norm=1.0, history_size=0)
    _step(p, opt, 0.5)  # not clipped
    _step(p, opt, 3.0)  # clipped
    _step(p, opt, math.nan)  # skipped, non-finite
    _step(p, opt, math.inf, 1.0)  # skipped, non-finite
    _step(p, opt, 0.9)  # not clipped
    clip = opt.state["clip"]
    assert [int(clip[k]) for k in COUNTERS] == [5, 1, 2, 2]


def test_an_overflow_skip_is_counted_as_skipped_not_nonfinite_nor_clipped():
    p, opt = _opt(max_norm=1.0, history_size=0)
    p.grad = torch.tensor([30.0, 0.0, 0.0, 0.0])  # would be clipped
    opt.found_inf, opt.grad_scale = torch.ones(()), None  # as GradScaler hands a step over
    try:
        opt.step()
    finally:
        del opt.found_inf, opt.grad_scale
    clip = opt.state["clip"]
    assert [int(clip[k]) for k in COUNTERS] == [1, 0, 1, 0]
    assert torch.equal(p.grad, torch.tensor([30.0, 0.0, 0.0, 0.0]))


def test_a_skipped_spike_is_not_counted_as_clipped():
    p, opt = _opt(max_norm=1.0, history_size=0, skip_spikes=SpikeSkip(window=20))
    for i in range(20):
        _step(p, opt, 0.5 + 0.01 * i)
    _step(p, opt, 100.0)  # a spike: skipped, though its coefficient is < 1
    clip = opt.state["clip"]
    assert float(clip["clip_coef"]) < 1.0
    assert [int(clip[k]) for k in COUNTERS] == [21, 0, 1, 0]


def test_propagate_counts_a_nonfinite_step_that_is_not_skipped():
    p, opt = _opt(max_norm=1.0, history_size=0, nonfinite="propagate")
    _step(p, opt, math.inf)
    clip = opt.state["clip"]
    assert [int(clip[k]) for k in COUNTERS] == [1, 0, 0, 1]


def _counter_value(kind):
    """10 as a user might assign it: an int32 or a float tensor, or another optimizer's counter
    (a view into that optimizer's own counters, which must not be advanced from here)."""
    if kind == "int32":
        return torch.tensor(10, dtype=torch.int32)
    if kind == "float":
        return torch.tensor(10.0)
    p, other = _opt(max_norm=1.0, history_size=0)
    for _ in range(10):
        _step(p, other, math.nan)  # every counter but clipped_steps reaches 10
    other.state["clip"]["clipped_steps"].fill_(10)
    return other


@pytest.mark.parametrize("kind", ["int32", "float", "another optimizer's"])
@pytest.mark.parametrize("keys", [(k,) for k in COUNTERS[1:]] + [COUNTERS], ids=[*COUNTERS[1:], "all"])
def test_a_counter_a_user_assigns_counts_on_from_its_new_value(keys, kind):
    """Assigning counters (say, resetting ``clipped_steps`` after a warm-up) while the others
    are untouched: every counter, the assigned ones included, keeps counting from its value,
    as an int64."""
    p, opt = _opt(max_norm=1.0, history_size=0)
    _step(p, opt, 3.0)  # clipped
    _step(p, opt, math.nan)  # skipped, non-finite
    other = None
    for key in keys:
        value = _counter_value(kind)
        if isinstance(value, ClippedOptimizer):
            other, value = value, value.state["clip"][key]
        opt.state["clip"][key] = value
    _step(p, opt, 3.0)  # clipped
    _step(p, opt, math.inf)  # skipped, non-finite
    _step(p, opt, 0.5)
    clip = opt.state["clip"]
    want = {"steps": 5, "clipped_steps": 2, "skipped_steps": 2, "nonfinite_steps": 2}
    since = {"steps": 3, "clipped_steps": 1, "skipped_steps": 1, "nonfinite_steps": 1}
    want.update({k: 10 + since[k] for k in keys})
    assert {k: int(clip[k]) for k in COUNTERS} == want
    assert all(clip[k].dtype == torch.int64 for k in COUNTERS)
    if other is not None:
        assert [int(other.state["clip"][k]) for k in COUNTERS] == [10, 10, 10, 10]


# -- the history rows -------------------------------------------------------------------------------
def test_each_step_writes_its_own_history_row():
    p, opt = _opt(max_norm=2.0, history_size=4)
    history = opt.state["clip"]["history"]
    _step(p, opt, 1.0)
    _step(p, opt, 8.0)
    want = torch.zeros(4, 4)
    want[0] = torch.tensor([1.0, 2.0, 1.0, 0.0])  # grad_norm, threshold, clip_coef, skipped
    want[1] = torch.tensor([8.0, 2.0, 2.0 / (8.0 + 1e-6), 0.0])
    torch.testing.assert_close(opt.state["clip"]["history"], want)
    assert opt.state["clip"]["history"] is history  # written in place, no new buffer per step
    _step(p, opt, math.nan)
    row = opt.state["clip"]["history"][2]
    assert math.isnan(float(row[0])) and float(row[1]) == 2.0 and float(row[3]) == 1.0
    _step(p, opt, 0.5)
    _step(p, opt, 4.0)  # the fifth step wraps onto row 0
    torch.testing.assert_close(opt.state["clip"]["history"][0], torch.tensor([4.0, 2.0, 2.0 / (4.0 + 1e-6), 0.0]))
    torch.testing.assert_close(opt.state["clip"]["history"][1], want[1])


def test_value_mode_history_rows_hold_the_clip_value():
    p, opt = _opt("value", clip_value=0.5, history_size=3)
    _step(p, opt, 3.0, 4.0)
    torch.testing.assert_close(opt.state["clip"]["history"][0], torch.tensor([5.0, 0.5, math.sqrt(0.5) / 5.0, 0.0]))


# -- checkpoints ------------------------------------------------------------------------------------
def _trained(history_size, steps=(1.0, 3.0, 0.5), **kw):
    p, opt = _opt(history_size=history_size, **kw)
    for v in steps:
        _step(p, opt, v)
    return p, opt


def test_the_history_survives_a_checkpoint_and_continues_in_place():
    _, opt = _trained(4)
    sd = copy.deepcopy(opt.state_dict())
    q, again = _opt(history_size=4)
    again.load_state_dict(sd)
    clip = again.state["clip"]
    assert torch.equal(clip["history"], opt.state["clip"]["history"])
    assert int(clip["history_start"]) == 0
    assert clip["history"] is not sd["state"]["clip"]["history"]
    _step(q, again, 2.0)
    _step(opt.param_groups[0]["params"][0], opt, 2.0)  # the run that never stopped
    assert torch.equal(again.state["clip"]["history"], opt.state["clip"]["history"])
    assert int(again.state["clip"]["steps"]) == 4
    assert again.report().steps == [0, 1, 2, 3]


@pytest.mark.parametrize("old,new", [(4, 8), (8, 2), (0, 5)], ids=["grown", "shrunk", "added"])
def test_a_resized_or_new_history_starts_at_the_loaded_step(old, new):
    _, opt = _trained(old)
    q, again = _opt(history_size=new)
    again.load_state_dict(opt.state_dict())
    clip = again.state["clip"]
    assert clip["history"].shape == (new, 4) and not clip["history"].any()
    assert clip["history"].dtype == torch.float32
    assert int(clip["history_start"]) == 3 and int(clip["steps"]) == 3
    _step(q, again, 6.0)
    history = again.state["clip"]["history"]
    torch.testing.assert_close(history[3 % new], torch.tensor([6.0, 1.0, 1.0 / (6.0 + 1e-6), 0.0]))
    assert int(history.any(dim=1).sum()) == 1  # only the step taken since the load
    report = again.report()
    assert (report.total_steps, report.steps, report.norms) == (4, [3], [pytest.approx(6.0)])


@pytest.mark.parametrize("old", [0, 4])
def test_loading_into_history_size_0_keeps_no_history(old):
    _, opt = _trained(old)
    q, again = _opt(history_size=0)
    again.load_state_dict(opt.state_dict())
    assert "history" not in again.state["clip"] and "history_start" not in again.state["clip"]
    _step(q, again, 2.0)
    assert int(again.state["clip"]["steps"]) == 4
    assert "history" not in again.state_dict()["state"]["clip"]


def test_a_checkpoint_without_mode_loads_as_this_optimizers_mode():
    _, opt = _trained(4)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"]["clip"]["mode"]
    _, again = _opt(history_size=4)
    again.load_state_dict(sd)
    assert again.state["clip"]["mode"] == "norm"
    assert int(again.state["clip"]["steps"]) == 3


def test_a_plain_inner_checkpoint_gives_a_fresh_clip_state():
    _, opt = _trained(4)
    q, again = _opt(history_size=4)
    again.load_state_dict(opt.optimizer.__class__(opt.param_groups[0]["params"], lr=0.0).state_dict())
    clip = again.state["clip"]
    assert int(clip["steps"]) == 0 and float(clip["clip_coef"]) == 1.0 and clip["history"].shape == (4, 4)
    _step(q, again, 2.0)
    assert int(again.state["clip"]["steps"]) == 1


def test_a_clip_state_that_is_not_a_dict_is_refused():
    _, opt = _trained(4)
    sd = opt.state_dict()
    sd["state"]["clip"] = [1, 2]
    with pytest.raises(ValueError, match="must be a dict, got list"):
        _opt(history_size=4)[1].load_state_dict(sd)


@pytest.mark.parametrize(
    "key,value,ok",
    [
        ("steps", torch.tensor(3, dtype=torch.int32), True),
        ("grad_norm", torch.tensor(1.0, dtype=torch.float64), True),
        ("history", torch.zeros(9, 4), True),  # another size: a new buffer, not an error
        ("steps", torch.tensor(3.0), False),
        ("grad_norm", torch.tensor(1), False),
        ("grad_norm", torch.zeros(1), False),
        ("history", torch.zeros(4, 5), False),
        ("history", torch.zeros(4), False),
        ("param_norms", torch.zeros(()), False),
        ("history_start", torch.zeros(()), False),
    ],
)
def test_the_loaded_keys_are_checked(key, value, ok):
    _, opt = _trained(4)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["clip"][key] = value
    _, again = _opt(history_size=4)
    if ok:
        again.load_state_dict(sd)
        assert torch.is_tensor(again.state["clip"][key])
    else:
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        with pytest.raises(
            ValueError, match=rf"invalid '{key}': expected a \d-dim (float|int) tensor.*got {re.escape(got)}"
        ):
            again.load_state_dict(sd)


def test_a_refused_key_says_what_was_expected():
    _, opt = _trained(4)
    for key, value, expected in (
        (
            "history",
            torch.zeros(4, 5),
            "expected a 2-dim float tensor of shape ('*', 4 + 2 * top_k), got a torch.float32 tensor of shape (4, 5)",
        ),
        ("grad_norm", torch.zeros(2), "expected a 0-dim float tensor, got a torch.float32 tensor of shape (2,)"),
        ("steps", [3], "expected a 0-dim int tensor, got list"),
    ):
        sd = copy.deepcopy(opt.state_dict())
        sd["state"]["clip"][key] = value
        with pytest.raises(ValueError, match=re.escape(f"invalid {key!r}: {expected}")):
            _opt(history_size=4)[1].load_state_dict(sd)


def test_a_history_of_one_step():
    p, opt = _opt(max_norm=2.0, history_size=1)
    assert opt.state["clip"]["history"].shape == (1, 4)
    _step(p, opt, 1.0)
    _step(p, opt, 4.0)
    torch.testing.assert_close(opt.state["clip"]["history"], torch.tensor([[4.0, 2.0, 2.0 / (4.0 + 1e-6), 0.0]]))
    assert opt.report().norms == [pytest.approx(4.0)]


def test_the_state_functions_keep_no_history_by_default():
    from clipped_optim.stats import new_clip_state, restore_clip_state

    cpu = torch.device("cpu")
    assert "history" not in new_clip_state("norm", cpu)
    assert "history" not in restore_clip_state(None, "norm", cpu)
    _, opt = _trained(4)
    restored = restore_clip_state(opt.state_dict()["state"]["clip"], "norm", cpu)
    assert "history" not in restored and "history_start" not in restored
    assert int(restored["steps"]) == 3


def test_stats_record_keeps_the_statistics_a_step_keeps():
    """``stats.record`` (the state function the benchmarks time) folds a clip's result into a
    clip state exactly as the wrapper's step does: values, counters and history rows."""
    from clipped_optim import clip_grad_norm
    from clipped_optim.stats import new_clip_state, record

    p, opt = _opt(max_norm=2.0, history_size=3)
    state = new_clip_state("norm", torch.device("cpu"), history_size=3)
    for values in ((1.0,), (3.0, 4.0), (math.nan,), (0.5,), (8.0,)):
        _step(p, opt, *values)
        grad = torch.zeros(p.numel())
        grad[: len(values)] = torch.tensor(values)
        result = clip_grad_norm([grad], 2.0)
        finite = torch.isfinite(result.total_norm)
        record(state, result, finite, ~finite)
    clip = opt.state["clip"]
    assert set(state) == set(clip)
    for key in ("grad_norm", "clip_coef", "threshold", "param_norms", "history", "history_start", *COUNTERS):
        torch.testing.assert_close(state[key], clip[key], equal_nan=True, msg=key)
    assert [int(state[k]) for k in COUNTERS] == [5, 2, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_path_torch_compile_traces_records_what_eager_records(monkeypatch, dtype):
    """Under ``torch.compile`` the statistics are written without the eager path's kept
    buffers (tests/test_compile.py compiles it for real, which is slow); run that path eagerly
    and check it keeps the same values, counters and history rows, a wrap and a skip included,
    for float32 and float64 gradients (the history is float32 either way)."""
    steps = ((1.0,), (3.0, 4.0), (math.nan,), (0.5,), (8.0,), (math.inf, 1.0), (2.5,))

    def run():
        p = nn.Parameter(torch.zeros(4, dtype=dtype))
        opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), max_norm=2.0, history_size=3)
        for values in steps:
            p.grad = torch.zeros(4, dtype=dtype)
            p.grad[: len(values)] = torch.tensor(values, dtype=dtype)
            opt.step()
        return opt.state["clip"]

    want = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = run()
    assert set(got) == set(want)
    for key in ("grad_norm", "clip_coef", "threshold", "param_norms", "history", "history_start", *COUNTERS):
        torch.testing.assert_close(got[key], want[key], equal_nan=True, msg=key)
        assert got[key].dtype == want[key].dtype, key
    assert got["history"].dtype == torch.float32
    assert [int(got[k]) for k in COUNTERS] == [7, 3, 2, 2]
