"""The kernels' inputs a user of the functional API builds: a ``GradBatch`` carrying the
parameters beside the gradients (AGC, per-parameter AutoClip), and the clip functions given a
``Sharding`` over a process group of one, where the global norm is this process's own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from clipped_optim import AGC, AutoClip, ClippedOptimizer, clip_grad_norm, clip_grad_value
from clipped_optim.distributed import Sharding
from clipped_optim.norms import GradBatch, tensor_norms, total_norm
from clipped_optim.policy import run_policy

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
