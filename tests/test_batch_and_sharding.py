"""The kernels' inputs a user of the functional API builds: a ``GradBatch`` carrying the
parameters beside the gradients (AGC, per-parameter AutoClip), and the clip functions given a
``Sharding`` over a process group of one, where the global norm is this process's own; and the
wrapper given ``process_group=`` over that group."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from clipped_optim import AGC, AutoClip, ClipGradScaler, ClippedOptimizer, SpikeSkip, clip_grad_norm, clip_grad_value
from clipped_optim.distributed import Sharding
from clipped_optim.norms import GradBatch, tensor_norms, total_norm
from clipped_optim.policy import run_policy
from clipped_optim.stats import history_columns

NORM_TYPES = [1.0, 2.0, math.inf]


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(3, 4), (5,), (2, 2)]]


def _torch_clipped(clip, *args) -> list[torch.Tensor]:
    """The gradients of ``_grads()`` after torch's own ``clip(params, *args)``."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads()]
    for p, g in zip(params, _grads()):
        p.grad = g
    clip(params, *args)
    return [p.grad for p in params]


def test_a_batch_keeps_the_owners_it_is_given():
    grads = _grads()
    params = [torch.zeros_like(g) for g in grads]
    batch = GradBatch(grads, params=params, positions=[0, 2, 3], n_total=4)
    assert len(batch.params) == 3 and all(p is q for p, q in zip(batch.params, params))
    assert list(batch.positions) == [0, 2, 3] and batch.n_total == 4
    plain = GradBatch(grads)
    assert plain.params is None and plain.positions is None and plain.n_total is None
    assert plain.sharding is None


def test_agc_on_a_batch_needs_the_parameters_beside_the_gradients():
    """AGC's bound is a ratio of each weight's norm: run on a batch of gradients alone it
    refuses, leaving them as they were; given the parameters it clips as timm does."""
    grads = _grads()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"^mode=AGC\(\) needs the parameters beside the gradients$"):
        run_policy(AGC(), (), 2.0, GradBatch(grads), None, True, cpu, {})
    assert all(torch.equal(g, h) for g, h in zip(grads, _grads()))
    params = [torch.ones_like(g) for g in grads]
    run_policy(AGC(clip_factor=0.1), (), 2.0, GradBatch(grads, params=params), None, True, cpu, {})
    for g, h, p in zip(grads, _grads(), params):  # each unit to at most 0.1 of its weight's norm
        dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        torch.testing.assert_close(
            g, h * torch.clamp(0.1 * p.norm(dim=dims, keepdim=True) / h.norm(dim=dims, keepdim=True), max=1.0)
        )


@pytest.fixture
def group_of_one():
    """A gloo process group of this process alone (no port: an in-memory store)."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, and no default process group already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("split", ["shared", "local", "mixed"])
def test_a_sharded_total_over_one_process_is_the_local_total(group_of_one, norm_type, split):
    grads = _grads()
    positions = list(range(len(grads)))
    shared = {"shared": positions, "local": [], "mixed": positions[:1]}[split]
    local = [i for i in positions if i not in shared]
    batch = GradBatch(grads, sharding=Sharding(group_of_one, shared, local))
    assert batch.sharding is not None
    total, stacked = total_norm(tensor_norms(batch, norm_type), norm_type, torch.device("cpu"), batch.sharding)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)
    torch.testing.assert_close(total.double(), want.double())
    assert stacked.shape == (len(grads),)


def test_a_sharded_clip_over_one_process_clips_as_one_process(group_of_one):
    grads, expect = _grads(), _torch_clipped(torch.nn.utils.clip_grad_norm_, 0.5)
    batch = GradBatch(grads, sharding=Sharding(group_of_one, list(range(len(grads))), []))
    result = clip_grad_norm(batch, 0.5)
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e)
    assert float(result.total_norm) > 0.5 and float(result.clip_coef) < 1


def test_a_sharded_value_clip_measures_the_clamped_norm(group_of_one):
    grads, expect = _grads(), _torch_clipped(torch.nn.utils.clip_grad_value_, 0.3)
    batch = GradBatch(grads, sharding=Sharding(group_of_one, [], list(range(len(grads)))))
    result = clip_grad_value(batch, 0.3)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in expect]))
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads()]))
    for g, e in zip(grads, expect):
        assert torch.equal(g, e)
    torch.testing.assert_close(result.clip_coef.double(), (after / before).double())


def test_a_sharded_total_with_no_pieces_here_is_zero(group_of_one):
    batch = GradBatch([], sharding=Sharding(group_of_one, [], []))
    total, stacked = total_norm([], 2.0, torch.device("cpu"), batch.sharding)
    assert float(total) == 0.0 and stacked.shape == (0,)


def _wrapped(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, ClippedOptimizer(inner, max_norm=0.5, top_k=2, **kwargs)


def _loss(model, step: int) -> torch.Tensor:
    return model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(2).sum()


def test_a_wrapper_sharded_over_one_process_steps_as_an_unsharded_one(group_of_one):
    # Over one process the reduced norm is the local one: the same updates and statistics. Only
    # the attribution is left out (-1), as on many ranks, where param_norms are of pieces.
    (a, sharded), (b, plain) = _wrapped(process_group=group_of_one), _wrapped()
    for step in range(3):
        for model, opt in ((a, sharded), (b, plain)):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    columns = history_columns(2)
    top_index = [i for i, c in enumerate(columns) if c.startswith("top_index")]
    mine, theirs = sharded.state["clip"]["history"][:3], plain.state["clip"]["history"][:3]
    assert torch.equal(mine[:, :4], theirs[:, :4])
    assert bool((mine[:, top_index] == -1).all()) and bool((theirs[:, top_index] >= 0).all())


def test_a_sharded_wrapper_refuses_what_would_differ_across_ranks(group_of_one):
    with pytest.raises(ValueError, match="flat_grads=True is not supported with sharded gradients"):
        _wrapped(process_group=group_of_one, flat_grads=True)
    model, opt = _wrapped(process_group=group_of_one)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})  # still sharded after a new group
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, 0)).backward()
    # torch's GradScaler found its inf on this rank alone: the ranks' scales would drift apart
    with pytest.raises(ValueError, match=r"overflow flag of a torch\.amp\.GradScaler is this rank's own"):
        scaler.step(opt)


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_a_sharded_wrapper_over_one_process_counts_an_opted_out_nan_as_unsharded(group_of_one, nonfinite):
    # Sharded, the finiteness of a "clip": False group rides on the mode's all-reduce instead
    # of being added to the norm here: the same decision, gradients and counters either way.
    def run(**kwargs):
        torch.manual_seed(0)
        clipped, opted_out = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
        groups = [{"params": [clipped]}, {"params": [opted_out], "clip": False}]
        opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), max_norm=0.5, nonfinite=nonfinite, **kwargs)
        for bad in (1.0, math.nan):
            clipped.grad, opted_out.grad = torch.full((3,), 2.0), torch.tensor([bad, 1.0])
            opt.step()
        return clipped, opt.state["clip"]

    (p, sharded), (q, plain) = run(process_group=group_of_one), run()
    assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    for key in ("steps", "clipped_steps", "skipped_steps", "nonfinite_steps", "grad_norm", "clip_coef"):
        torch.testing.assert_close(sharded[key], plain[key], rtol=0, atol=0, equal_nan=True)
    assert int(plain["nonfinite_steps"]) == 1 and math.isnan(float(plain["grad_norm"]))


def test_a_sharded_wrapper_over_one_process_skips_spikes_as_unsharded_with_propagate(group_of_one):
    # Sharded, the spike detector is asked after the opted-out groups' poison has arrived, with
    # nothing else to hold the step (propagate): the same spikes, updates and counters either way.
    def run(**kwargs):
        clipped, opted_out = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
        groups = [{"params": [clipped]}, {"params": [opted_out], "clip": False}]
        skip = SpikeSkip(window=3, sigma=1.0)
        opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), max_norm=5.0, nonfinite="propagate", skip_spikes=skip)
        for size in (1.0, 1.1, 0.9, 1.0, 40.0, 1.05):
            clipped.grad, opted_out.grad = torch.full((3,), size), torch.ones(2)
            opt.step()
        return clipped, opt.state["clip"]

    (p, sharded), (q, plain) = run(process_group=group_of_one), run()
    assert torch.equal(p, q)
    for key in ("steps", "clipped_steps", "skipped_steps", "spike_count", "grad_norm", "clip_coef"):
        assert torch.equal(sharded[key], plain[key]), key
    assert int(plain["skipped_steps"]) == 1  # the spike, and only it


def test_a_sharded_wrapper_over_one_process_unscales_an_opted_out_group_as_unsharded(group_of_one):
    # Under ClipGradScaler the gradients of a "clip": False group are unscaled, not clipped,
    # sharded or not: their update is the same.
    def run(**kwargs):
        torch.manual_seed(0)
        clipped, opted_out = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
        groups = [{"params": [clipped]}, {"params": [opted_out], "clip": False}]
        opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), max_norm=0.5, **kwargs)
        scaler = ClipGradScaler("cpu", init_scale=2.0**8)
        scaler.scale((clipped * 3).sum() + (opted_out * 2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        return clipped, opted_out

    (a, b), (c, d) = run(process_group=group_of_one), run()
    assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(b.grad, torch.full((2,), 2.0))  # unscaled, not clipped


@pytest.mark.parametrize(
    "mode,match",
    [
        (
            "agc",
            r"^ClippedOptimizer: mode=AGC\(\) on sharded gradients \(FSDP, DTensor, process_group=\) is not supported",
        ),
        (
            AutoClip(per_param=True),
            r"^ClippedOptimizer: AutoClip\(per_param=True\) on sharded gradients \(FSDP, DTensor, process_group=\) is not "
            r"supported: the per-parameter norms are of local pieces\. Use per_param=False",
        ),
    ],
)
def test_the_per_unit_modes_refuse_sharded_gradients(group_of_one, mode, match):
    """AGC and per-parameter AutoClip need each parameter's whole norm: under ``process_group=``
    they refuse at the step, saying so, and leave the weights as they were."""
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), mode=mode, process_group=group_of_one)
    for p in params:
        p.grad = torch.full_like(p, 5.0)
    with pytest.raises(NotImplementedError, match=match):
        opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
