"""A user's own policy, written only against the public interface (tests/median_policy.py, the
worked example of docs/policies.md), gets every guarantee the built-in ones have: parity with a
hand-written reference step by step, bit-identical resume, no NaN in its state, GradScaler, the
fold into fused kernels, flat buffers, identical thresholds on every rank, and a compiled step.
The fuzzer (tests/test_fuzz.py) runs it too. Also: checkpoints of 0.1.0 load and continue, and
the policy objects' types are precise enough for a user's type checker."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

import clipped_optim
from clipped_optim import AGC, AutoClip, ClipDecision, ClippedOptimizer, ClipPolicy, SpikeSkip, ZClip
from helpers import assert_same_state_dict
from median_policy import MedianClip

STEPS = 30
SPIKES = {9: 20.0, 17: 6.0, 23: 50.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def data(steps: int = STEPS, nan_at: int | None = None) -> list[tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 5, generator=g), math.nan if t == nan_at else SPIKES.get(t, 1.0 + (t % 4) / 2))
        for t in range(steps)
    ]


def backward(model: nn.Module, x: torch.Tensor, factor: float) -> None:
    model.zero_grad(set_to_none=True)
    (model(x).pow(2).mean() * factor).backward()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- parity with a hand-written reference -----------------------------------------------------------
def reference(model: nn.Module, seq, k: float, window: int) -> list[torch.Tensor]:
    """The rule written out in plain torch, with the history as a Python list: clip the global
    norm to k times the (lower) median of the last ``window`` finite norms; skip NaN steps."""
    opt, history, thresholds = sgd(model), [], []
    params = list(model.parameters())
    for x, f in seq:
        backward(model, x, f)
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if not torch.isfinite(total):
            continue
        threshold = k * torch.stack(history[-window:]).median() if history else torch.tensor(math.inf)
        coef = torch.clamp(threshold / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef)
        opt.step()
        history.append(total)
        thresholds.append(threshold)
    return thresholds


@pytest.mark.parametrize("k,window", [(3.0, 16), (1.0, 4), (0.5, 1), (2.0, 7)])
def test_equals_hand_written_reference(k, window):
    ref, ours = make_model(), make_model()
    seq = data(nan_at=12)
    want = reference(ref, seq, k, window)
    opt = ClippedOptimizer(sgd(ours), mode=MedianClip(k=k, window=window))
    got = []
    for x, f in seq:
        backward(ours, x, f)
        opt.step()
        if math.isfinite(f):
            got.append(opt.state["clip"]["threshold"].clone())
    assert params_equal(ref, ours)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    clip = opt.state["clip"]
    assert clip["mode"] == "MedianClip" and int(clip["skipped_steps"]) == 1
    assert int(clip["clipped_steps"]) > 0


# -- resume, NaN ------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_spikes", [False, SpikeSkip(sigma=2.0, window=5)], ids=["plain", "spikes"])
def test_resume_is_bit_identical(skip_spikes):
    seq, cut = data(), 13

    def fresh():
        model = make_model()
        opt = ClippedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), mode=MedianClip(2.0, 5), skip_spikes=skip_spikes
        )
        return model, opt

    straight = fresh()
    for x, f in seq:
        backward(straight[0], x, f)
        straight[1].step()
    first = fresh()
    for x, f in seq[:cut]:
        backward(first[0], x, f)
        first[1].step()
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = fresh()
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    for x, f in seq[cut:]:
        backward(resumed[0], x, f)
        resumed[1].step()
    assert params_equal(straight[0], resumed[0])
    assert_same_state_dict(straight[1].state_dict(), resumed[1].state_dict())


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_nan_never_enters_the_state(nonfinite):
    """The rule computes its next state unconditionally; a NaN step's never replaces the old."""
    nan_at, seq = 8, data(15, nan_at=8)
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=MedianClip(2.0, 4), nonfinite=nonfinite)
    for t, (x, f) in enumerate(seq):
        backward(model, x, f)
        before = {k: v.clone() for k, v in opt.state["clip"].items() if k.startswith("median_")}
        opt.step()
        ring, count = opt.state["clip"]["median_ring"], opt.state["clip"]["median_count"]
        assert not torch.isnan(ring).any()
        if t == nan_at:
            assert torch.equal(ring, before["median_ring"]) and torch.equal(count, before["median_count"])
        else:
            # propagated, the NaN is in the weights: no later norm is finite, none enters either
            assert int(count) == (t + (t < nan_at) if nonfinite == "skip" else min(t + 1, nan_at))
    if nonfinite == "skip":  # the same run as without the NaN batch
        clean = make_model()
        clean_opt = ClippedOptimizer(sgd(clean), mode=MedianClip(2.0, 4))
        for t, (x, f) in enumerate(seq):
            if t != nan_at:
                backward(clean, x, f)
                clean_opt.step()
        assert params_equal(model, clean)
        assert torch.equal(opt.state["clip"]["median_ring"], clean_opt.state["clip"]["median_ring"])


def test_without_a_gate_a_non_finite_norm_never_enters_the_state(rule_path):
    """``run_policy`` with no gate (called as a function, not by the wrapper) accepts every
    finite norm and no other: an inf or NaN step keeps the old state, on both paths (the host
    path reads the total and decides on its value)."""
    from clipped_optim.config import ClipConfig
    from clipped_optim.norms import GradBatch
    from clipped_optim.policy import run_policy

    cfg = ClipConfig(mode=MedianClip(2.0, 4))
    cpu, state = torch.device("cpu"), {}
    for norm in (3.0, math.inf, 5.0, math.nan, 2.0):
        before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        run_policy(cfg.policy, cfg.policy_keys, 2.0, GradBatch([torch.tensor([norm])]), None, True, cpu, state)
        if not math.isfinite(norm):
            assert before and all(torch.equal(state[k], v) for k, v in before.items())
    assert int(state["median_count"]) == 3  # the three finite norms, and only those
    assert torch.equal(state["median_ring"], torch.tensor([3.0, 5.0, 2.0, math.inf]))


# -- AMP, fused fold, flat buffers ------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_equals_unscaled(fused):
    scaled, plain = make_model(), make_model()
    policy = MedianClip(1.5, 6)
    opt = ClippedOptimizer(torch.optim.AdamW(scaled.parameters(), lr=1e-2, fused=fused), mode=policy)
    ref = ClippedOptimizer(torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=fused), mode=policy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    overflow = 11
    for t, (x, f) in enumerate(data()):
        scaled.zero_grad(set_to_none=True)
        loss = scaled(x).pow(2).mean() * (math.inf if t == overflow else f)
        scaler.scale(loss).backward()
        before = opt.state["clip"].get("median_ring", torch.zeros(0)).clone()
        scaler.step(opt)
        scaler.update()
        if t == overflow:  # skipped, and kept out of the history
            assert torch.equal(opt.state["clip"]["median_ring"], before)
        else:
            backward(plain, x, f)
            ref.step()
        if fused:  # the kernel divides by scale/coef, the plain path multiplies: rounding
            for p, q in zip(scaled.parameters(), plain.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            assert params_equal(scaled, plain)
    assert int(opt.state["clip"]["skipped_steps"]) == 1 and int(opt.state["clip"]["clipped_steps"]) > 0


def test_fused_fold_matches_unfolded():
    """A scalar policy's coefficient is folded into fused AdamW's grad_scale."""
    a, b = make_model(), make_model()
    fused = ClippedOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True), mode=MedianClip(1.0, 4))
    plain = ClippedOptimizer(torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False), mode=MedianClip(1.0, 4))
    assert fused._can_fold()
    for x, f in data():
        for model, opt in ((a, fused), (b, plain)):
            backward(model, x, f)
            opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.state["clip"]["clipped_steps"], plain.state["clip"]["clipped_steps"])
    assert int(plain.state["clip"]["clipped_steps"]) > 0


def test_flat_grads_equal_plain():
    a, b = make_model(), make_model()
    flat = ClippedOptimizer(sgd(a), mode=MedianClip(1.0, 4), flat_grads=True)
    plain = ClippedOptimizer(sgd(b), mode=MedianClip(1.0, 4))
    for x, f in data():
        for model, opt in ((a, flat), (b, plain)):
            backward(model, x, f)
            opt.step()
        assert params_equal(a, b)


# -- 2 processes: identical thresholds --------------------------------------------------------------
def _dist_worker(rank: int, world: int) -> None:
    from test_distributed import _data, _fsdp2_model, _full, _half, _loss, _model

    steps, kw = 8, dict(mode=MedianClip(k=1.2, window=3))

    def factor(step: int) -> float:
        return 30.0 if step == 6 else 1.0

    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kw)
    ref_thresholds = []
    for step in range(steps):
        opt.zero_grad()
        (_loss(model, *_data(step)) * factor(step)).backward()
        opt.step()
        ref_thresholds.append(opt.state["clip"]["threshold"].clone())
    ref_params = [p.detach().clone() for p in model.parameters()]
    sharded = _fsdp2_model(world)
    opt = ClippedOptimizer(torch.optim.AdamW(sharded.parameters(), lr=0.05), **kw)
    for step in range(steps):
        opt.zero_grad()
        x, y = _data(step)
        (_loss(sharded, _half(x, rank, world), _half(y, rank, world)) * factor(step)).backward()
        opt.step()
        mine = opt.state["clip"]["threshold"].reshape(1)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        assert all(torch.equal(t, every[0]) for t in every), (step, every)  # bit-identical
        torch.testing.assert_close(mine[0], ref_thresholds[step], rtol=1e-5, atol=1e-6)
    assert int(opt.state["clip"]["clipped_steps"]) > 0
    for p, q in zip(sharded.parameters(), ref_params):
        torch.testing.assert_close(_full(p.detach()), q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_thresholds_identical_on_every_rank_under_fsdp2():
    from test_distributed import _spawn

    _spawn(_dist_worker, 2)


# -- a compiled training step -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        model = make_model()
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), mode=MedianClip(1.0, 3))

        def train_step(x, factor, model=model, opt=opt):
            loss = model(x).pow(2).sum() * factor
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        for i, (x, f) in enumerate(data(6)):
            if i == 2:
                x = x.clone()
                x[0, 0] = float("nan")  # a NaN batch: skipped in both
            step(x, torch.tensor(f))
        runs[compiled] = (model, opt)
    (eager, eager_opt), (comp, comp_opt) = runs[False], runs[True]
    for p, q in zip(comp.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)
    for key in ("steps", "skipped_steps", "nonfinite_steps", "clipped_steps", "median_count"):
        assert int(comp_opt.state["clip"][key]) == int(eager_opt.state["clip"][key]), key
    # the norms come from inductor's backward, which rounds its own way
    torch.testing.assert_close(
        comp_opt.state["clip"]["median_ring"], eager_opt.state["clip"]["median_ring"], rtol=1e-4, atol=1e-5
    )
    assert int(comp_opt.state["clip"]["skipped_steps"]) == 1 and int(comp_opt.state["clip"]["clipped_steps"]) > 0


# -- what the framework refuses ---------------------------------------------------------------------
class _Clash(ClipPolicy):
    def init_state(self, n_params, device):
        return {"steps": torch.zeros((), device=device)}

    def rule(self, norms, state):
        return ClipDecision(coef=torch.ones(()), threshold=torch.ones(()))


class _WrongShape(ClipPolicy):
    def init_state(self, n_params, device):
        return {"wrong_ring": torch.zeros(3, device=device)}

    def rule(self, norms, state):
        one = torch.ones((), device=norms.device)
        return ClipDecision(coef=one, threshold=one, state={"wrong_ring": torch.zeros(4, device=norms.device)})


def test_state_that_would_overwrite_a_statistic_is_refused():
    with pytest.raises(ValueError, match=r"'steps'.*prefix"):
        ClippedOptimizer(sgd(make_model()), mode=_Clash())


def test_rule_must_keep_its_state_shapes():
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=_WrongShape())
    backward(model, *data(1)[0])
    with pytest.raises(ValueError, match=r"wrong_ring.*shape \(4,\).*shape \(3,\)"):
        opt.step()


def test_checkpoint_of_another_policy_is_refused():
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=MedianClip(2.0, 4))
    backward(model, *data(1)[0])
    opt.step()
    with pytest.raises(ValueError, match="mode='MedianClip'"):
        ClippedOptimizer(sgd(model), mode="zclip").load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"median_ring.*shape \(5,\)"):
        ClippedOptimizer(sgd(model), mode=MedianClip(2.0, 5)).load_state_dict(opt.state_dict())


class _LargestSeen(ClipPolicy):
    """State with a row per parameter: each one's largest gradient norm so far."""

    def init_state(self, n_params, device):
        return {"largest_seen": torch.zeros(n_params, device=device)}

    def rule(self, norms, state):
        seen, rows = state["largest_seen"], norms.rows()
        largest = seen.index_copy(0, rows, torch.maximum(seen[rows], norms.param_norms.to(seen.dtype)))
        one = torch.ones((), device=norms.device)
        return ClipDecision(coef=one, threshold=one, state={"largest_seen": largest})


def test_checkpoint_of_per_parameter_state_loads_and_one_of_another_size_is_refused():
    model = make_model()
    opt = ClippedOptimizer(sgd(model), mode=_LargestSeen())
    for x, f in data(3):
        backward(model, x, f)
        opt.step()
    sd = opt.state_dict()
    resumed = ClippedOptimizer(sgd(model), mode=_LargestSeen())
    resumed.load_state_dict(sd)
    assert torch.equal(resumed.state["clip"]["largest_seen"], opt.state["clip"]["largest_seen"])
    sd["state"]["clip"]["largest_seen"] = torch.zeros(5)  # the model has four parameters
    with pytest.raises(ValueError, match=r"largest_seen.*shape \(4,\)"):
        ClippedOptimizer(sgd(model), mode=_LargestSeen()).load_state_dict(sd)


# -- checkpoints written before clip policies were objects -----------------------------------------
OLD = os.path.join(os.path.dirname(__file__), "data", "old_checkpoints.pt")
NEW_FORM = {
    "agc": dict(mode=AGC(clip_factor=0.02)),
    "autoclip": dict(mode=AutoClip(quantile=0.8, history_length=6)),
    "autoclip_per_param": dict(mode=AutoClip(quantile=0.5, history_length=5, per_param=True)),
    "zclip": dict(mode=ZClip(z_thresh=2.0, warmup_steps=4, max_norm=5.0)),
    "spikes": dict(mode="norm", max_norm=0.5, skip_spikes=SpikeSkip(sigma=3.0, window=4)),
}


@pytest.mark.parametrize("name", sorted(NEW_FORM))
def test_old_checkpoint_loads_and_continues(name):
    """A checkpoint of 0.1.0 (tests/data/make_old_checkpoints.py, its per-mode keyword arguments)
    loads into the object form and continues to the parameters 0.1.0 reached, bit for bit."""
    import data.make_old_checkpoints as old

    saved = torch.load(OLD, weights_only=True)[name]
    model = old.model()
    model.load_state_dict(saved["checkpoint"]["model"])
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), history_size=8, top_k=3, **NEW_FORM[name]
    )
    opt.load_state_dict(saved["checkpoint"]["optimizer"])
    # 0.1.0 kept 4 columns: the loaded rows are kept, their attribution unknown (index -1)
    loaded = opt.state["clip"]["history"]
    assert loaded.shape == (8, 10) and (loaded[:, 7:] == -1).all() and loaded[:, :4].any()
    for step in range(old.BEFORE, old.BEFORE + old.AFTER):
        old.backward(model, step)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved["final"]))
    history = opt.state["clip"]["history"]
    assert (history[:, 7:] >= 0).all()  # the steps since the load (8, the whole ring) are attributed
    opt.state["clip"]["history"] = history[:, :4]  # the columns 0.1.0 wrote, compared below
    for key, value in saved["final_clip"].items():
        if name == "agc" and key in ("grad_norm", "param_norms", "history"):
            # 0.1.0's AGC derived the recorded norms from its unit norms; they are measured as
            # every mode measures them now (the clip itself is unchanged): the last bit may differ
            torch.testing.assert_close(opt.state["clip"][key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(opt.state["clip"][key], value), key
    assert set(opt.state["clip"]) == set(saved["final_clip"]) | {"mode"} | (
        {"autoclip_per_param"} if "autoclip" in name else set()
    )


# -- types: a user's checker catches a wrong field type ---------------------------------------------
class RowSkip(ClipPolicy):
    """A skip policy whose state has one row per parameter it was made for (``n_params``)."""

    name = "rowskip"

    def init_state(self, n_params, device):
        return {"rowskip_seen": torch.zeros(n_params, device=device)}

    def rule(self, norms, state):
        return ClipDecision(skip=norms.total_norm > 1e9, state={"rowskip_seen": state["rowskip_seen"] + 1})


def test_a_skip_policy_with_per_parameter_state_resumes_from_its_checkpoint():
    """A skip policy is asked from the total norm alone, so its state is made for n_params=0:
    a checkpoint of it is checked the same way, and loads."""

    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return model, ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), skip_spikes=RowSkip())

    model, opt = make()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    _, fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state_dict(fresh.state_dict(), opt.state_dict())


SNIPPET = """
import clipped_optim
from median_policy import MedianClip

clipped_optim.ZClip(z_thresh="3")
clipped_optim.AutoClip(quantile=0.8, per_param="yes")
clipped_optim.ZClip(clip_option="median")
clipped_optim.SpikeSkip(sigma=5, window=4.5)
ok = [clipped_optim.ZClip(z_thresh=3), clipped_optim.AGC(clip_factor=0.02), MedianClip(k=2.0, window=8)]
"""


@pytest.mark.timeout(300)
def test_type_checker_catches_wrong_field_types(tmp_path):
    mypy = shutil.which("mypy") or os.path.join(os.path.dirname(sys.executable), "mypy")
    if not os.path.exists(mypy):
        pytest.skip("mypy is not installed (the dev extra)")
    (tmp_path / "snippet.py").write_text(textwrap.dedent(SNIPPET))
    root = os.path.dirname(os.path.dirname(os.path.abspath(clipped_optim.__file__)))
    env = dict(os.environ, MYPYPATH=os.pathsep.join([root, os.path.dirname(__file__)]))
    out = subprocess.run(
        [mypy, "--no-incremental", "--follow-imports=silent", "--ignore-missing-imports", "snippet.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [5, 6, 7, 8], out
    assert '"z_thresh" to "ZClip" has incompatible type "str"' in out, out
