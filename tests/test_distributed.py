"""Multi-process tests: DDP, FSDP2 (DTensor), FSDP1, 2-D meshes and ``process_group=``.

Every test spawns gloo workers on the loopback (a fresh free port each time) and checks, step
by step, that the distributed run records the norm and reaches the parameters of a
single-process run on the full batch. Each spawn batches several checks: start-up is most of
the cost (about 5 s for 2 processes here).

A spawned gloo worker occasionally dies with SIGABRT at exit ("terminate called without an
active exception"), with plain torch too (about 1 run in 40 here). Workers end with ``barrier``,
``destroy_process_group`` and ``os._exit(0)``, which makes that rare; :func:`_spawn` reruns a
spawn once, and only when a worker was *killed by a signal* — an assertion or an exit code
fails at once.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clipped_optim import ClippedOptimizer
from clipped_optim import distributed as cdist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

BATCH, DIM, STEPS = 8, 6, 3
TOL = dict(rtol=1e-5, atol=1e-6)
# A collective that waits longer than this raises instead of hanging (ranks that disagree on
# the collectives to run then fail the test, with the pytest timeout as the last guard).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# -- harness -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout=COLLECTIVE_TIMEOUT
    )
    fn(rank, world, *args)  # an exception here reaches the parent through mp.spawn
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skips the interpreter teardown where gloo sometimes aborts


def _spawn(fn, world: int, *args) -> None:
    for attempt in range(2):
        try:
            mp.spawn(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as exc:
            # Rerun only a worker killed by a signal (the gloo SIGABRT flake), never a failure.
            if exc.signal_name is None or attempt == 1:
                raise


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, DIM, generator=g) * 3, torch.randn(BATCH, 3, generator=g)


def _half(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _reference(steps: int, max_norm: float, norm_type: float = 2.0) -> tuple[list[float], list[torch.Tensor]]:
    """One process, the full batch: the norms it records and its final parameters."""
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=max_norm, norm_type=norm_type)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        _loss(model, *_data(step)).backward()
        opt.step()
        norms.append(float(opt.state["clip"]["grad_norm"]))
    return norms, [p.detach().clone() for p in model.parameters()]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, cdist._dtensor_type()) else t


def _train(model, opt, rank, world, steps, start=0) -> list[float]:
    norms = []
    for step in range(start, start + steps):
        opt.zero_grad()
        x, y = _data(step)
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        opt.step()
        norms.append(float(opt.state["clip"]["grad_norm"]))
    return norms


def _assert_same(norms, params, ref_norms, ref_params) -> None:
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(_full(p.detach()), q, **TOL)


@contextmanager
def _count_all_reduce():
    """Count the all-reduces issued (the clip's go through torch.distributed.all_reduce)."""
    calls = []
    original = cdist.dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    cdist.dist.all_reduce = counting
    try:
        yield calls
    finally:
        cdist.dist.all_reduce = original


# -- DDP, FSDP1, manual process_group (2 processes) --------------------------------------
def _ddp_fsdp1_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    max_norm = 0.5  # well below the gradients' norm: every step clips
    ref_norms, ref_params = _reference(STEPS, max_norm)
    assert min(ref_norms) > max_norm

    # DDP: gradients are averaged before step(), so no collective of ours and the same result.
    model = DDP(_model())
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=max_norm, top_k=3)
    assert opt._reduction is None
    with _count_all_reduce() as calls:
        norms = _train(model, opt, rank, world, STEPS)
    assert calls == []
    _assert_same(norms, model.module.parameters(), ref_norms, ref_params)
    # DDP's gradients are whole parameters: each step's top contributors are recorded, the same
    # on every rank (replicas)
    top = opt.state["clip"]["history"][:STEPS, 4:]
    assert (top[:, 3:] >= 0).all()
    gathered = [torch.zeros_like(top) for _ in range(world)]
    dist.all_gather(gathered, top.contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered)

    # DDP, NaN in rank 1's input only: the all-reduce of the gradients spreads it, every rank skips.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = _data(0)
    x = _half(x, rank, world).clone()
    if rank == 1:
        x[0, 0] = math.nan
    _loss(model, x, _half(y, rank, world)).backward()
    opt.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)

    # FSDP1, use_orig_params=True: each rank holds a flat slice of every gradient, so the
    # plain gradients are slices of the world: process_group= makes the norm global.
    model = FSDP(_model(), use_orig_params=True, device_id=torch.device("cpu"))
    opt = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=max_norm, process_group=dist.group.WORLD, top_k=3
    )
    norms = _train(model, opt, rank, world, STEPS)
    with FSDP.summon_full_params(model):
        _assert_same(norms, model.parameters(), ref_norms, ref_params)
    # slices of parameters: their norms are not the parameters', so no attribution is recorded
    assert (opt.state["clip"]["history"][:STEPS, 7:] == -1).all()

    # Manual (ZeRO-style) slices: each rank owns half the parameters and their full
    # gradients; the norm over its own slice, summed over the group, is the global one.
    model = _model()
    params = list(model.parameters())
    mine = params[rank::world]
    opt = ClippedOptimizer(torch.optim.AdamW(mine, lr=0.05), max_norm=max_norm, process_group=dist.group.WORLD)
    for step in range(STEPS):
        model.zero_grad()
        _loss(model, *_data(step)).backward()
        opt.step()
        assert math.isclose(float(opt.state["clip"]["grad_norm"]), ref_norms[step], rel_tol=1e-5)
        for i, p in enumerate(params):  # the owner broadcasts its updated slice
            dist.broadcast(p.data, src=i % world)
    _assert_same([], params, [], ref_params)

    # Rank-consistent skip: a NaN in rank 0's slice only makes both ranks skip.
    model.zero_grad()
    _loss(model, *_data(0)).backward()
    if rank == 0:
        mine[0].grad[0] = math.nan
    before = [p.detach().clone() for p in mine]
    opt.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1
    assert math.isnan(float(opt.state["clip"]["grad_norm"]))
    assert all(torch.equal(p, q) for p, q in zip(mine, before))

    # A NaN in an opted-out group ("clip": False) of rank 1 only: still every rank skips.
    groups = [{"params": mine[:1]}, {"params": mine[1:], "clip": False}]
    opt = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1), max_norm=max_norm, process_group=dist.group.WORLD)
    model.zero_grad()
    _loss(model, *_data(0)).backward()
    if rank == 1:
        mine[-1].grad.view(-1)[0] = math.nan
    before = [p.detach().clone() for p in mine]
    opt.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1
    assert all(torch.equal(p, q) for p, q in zip(mine, before))

    # Bad input at construction: per-parameter clipping of slices would clip each slice alone.
    with pytest.raises(ValueError, match="per_param"):
        ClippedOptimizer(torch.optim.SGD(mine, lr=0.1), mode="per_param", process_group=dist.group.WORLD)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_fsdp1_and_process_group_match_single_process():
    _spawn(_ddp_fsdp1_worker, 2)


# -- FSDP2 (DTensor gradients), 2 processes ----------------------------------------------
def _fsdp2_model(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp2_worker(rank: int, world: int, ckpt_dir: str) -> None:
    import torch.distributed.checkpoint as dcp

    for norm_type in (2.0, math.inf):
        ref_norms, ref_params = _reference(STEPS, 0.5, norm_type)
        model = _fsdp2_model(world)
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=0.5, norm_type=norm_type)
        norms = []
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _data(step)
            _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
            grads = [p.grad for p in model.parameters()]
            assert all(isinstance(g, cdist._dtensor_type()) for g in grads)
            torch_norm = nn.utils.get_total_norm(grads, norm_type).full_tensor()
            with _count_all_reduce() as calls:
                opt.step()
            assert len(calls) == 1  # one collective per step, whatever the number of parameters
            norms.append(float(opt.state["clip"]["grad_norm"]))
            torch.testing.assert_close(opt.state["clip"]["grad_norm"], torch_norm, **TOL)
            # The local shards were scaled by the global coefficient.
            clipped = nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type).full_tensor()
            torch.testing.assert_close(clipped, torch.clamp(torch_norm, max=0.5), rtol=1e-5, atol=1e-5)
        _assert_same(norms, list(model.parameters()), ref_norms, ref_params)

    # A fused inner optimizer: the global coefficient is folded into its kernel's grad_scale.
    ref_norms, ref_params = _reference(STEPS, 0.5)
    fused = _fsdp2_model(world)
    fused_opt = ClippedOptimizer(torch.optim.AdamW(fused.parameters(), lr=0.05, fused=True), max_norm=0.5)
    _assert_same(_train(fused, fused_opt, rank, world, STEPS), list(fused.parameters()), ref_norms, ref_params)

    # NaN in rank 1's local shard only: the reduced norm is NaN on both ranks, both skip.
    opt.zero_grad()
    x, y = _data(0)
    _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
    if rank == 1:
        next(iter(model.parameters())).grad.to_local()[0, 0] = math.nan
    before = [p.detach().full_tensor() for p in model.parameters()]
    opt.step()
    assert int(opt.state["clip"]["skipped_steps"]) == 1 and int(opt.state["clip"]["nonfinite_steps"]) == 1
    assert all(torch.equal(p.detach().full_tensor(), q) for p, q in zip(model.parameters(), before))

    # Checkpoint with DCP, resume in a fresh model and optimizer, continue: same trajectory.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = _fsdp2_model(world)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=0.5)
    _train(model, opt, rank, world, 2)
    state = {"model": get_model_state_dict(model), "optim": cdist.get_optimizer_state_dict(model, opt)}
    assert isinstance(state["optim"]["clip"], bytes)
    dcp.save(state, checkpoint_id=ckpt_dir)
    expected = _train(model, opt, rank, world, 2, start=2)
    expected_params = [p.detach().full_tensor() for p in model.parameters()]

    model2 = _fsdp2_model(world)
    opt2 = ClippedOptimizer(torch.optim.AdamW(model2.parameters(), lr=0.05), max_norm=0.5)
    blank = {"model": get_model_state_dict(model2), "optim": cdist.get_optimizer_state_dict(model2, opt2)}
    dcp.load(blank, checkpoint_id=ckpt_dir)
    set_model_state_dict(model2, blank["model"])
    cdist.set_optimizer_state_dict(model2, opt2, blank["optim"])
    assert int(opt2.state["clip"]["steps"]) == 2 and int(opt2.state["clip"]["clipped_steps"]) == 2
    resumed = _train(model2, opt2, rank, world, 2, start=2)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), **TOL)
    for p, q in zip(model2.parameters(), expected_params):
        torch.testing.assert_close(p.detach().full_tensor(), q, **TOL)
    assert int(opt2.state["clip"]["steps"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_fsdp2_matches_single_process_and_resumes():
    with tempfile.TemporaryDirectory() as ckpt_dir:
        _spawn(_fsdp2_worker, 2, ckpt_dir)


# -- Replicate + Shard on a 2-D mesh (tensor-parallel style), 4 processes -----------------
def _mesh_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    layouts = [(Replicate(), Shard(0)), (Shard(0), Replicate()), (Replicate(), Replicate()), (Shard(0), Shard(1))]
    layouts.append((Replicate(), Shard(0)))  # one row on two tp ranks: an empty local shard
    torch.manual_seed(0)  # the same full tensors on every rank
    full_grads = [torch.randn(4, 6) * (i + 1) for i in range(len(layouts) - 1)] + [torch.randn(1, 6)]
    full_grads[1] = full_grads[1] * 7  # the largest entry sits in a Replicate-sharded tensor
    for norm_type in (2.0, 1.0, math.inf):
        params = [distribute_tensor(torch.zeros_like(g), mesh, list(pl)) for g, pl in zip(full_grads, layouts)]
        plain = torch.zeros(5)  # an unsharded parameter, complete on every rank
        for p, g in zip(params, full_grads):
            p.grad = distribute_tensor(g.clone(), mesh, p.placements)
        plain.grad = torch.arange(5.0)
        opt = ClippedOptimizer(torch.optim.SGD([*params, plain], lr=1.0), max_norm=1.0, norm_type=norm_type)
        assert opt._reduction.group is dist.group.WORLD
        expected = torch.linalg.vector_norm(
            torch.cat([g.flatten() for g in [*full_grads, torch.arange(5.0)]]), norm_type
        )
        with _count_all_reduce() as calls:
            opt.step()
        assert len(calls) == 1
        torch.testing.assert_close(opt.state["clip"]["grad_norm"], expected, **TOL)
        coef = 1.0 / (expected + 1e-6)
        for p, g in zip(params, full_grads):  # SGD lr=1 from 0: p = -clipped grad
            torch.testing.assert_close(p.full_tensor(), -g * coef, **TOL)
        torch.testing.assert_close(plain, -torch.arange(5.0) * coef, **TOL)

    # Parameters on one 1-D sub-mesh (each tp pair its own model): reduced over that mesh only.
    p = distribute_tensor(torch.zeros(4, 6), mesh["tp"], [Shard(0)])
    full = full_grads[0] * (1 + mesh.get_coordinate()[0])  # the two tp pairs differ
    p.grad = distribute_tensor(full.clone(), mesh["tp"], [Shard(0)])
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=1.0), max_norm=1.0)
    opt.step()
    torch.testing.assert_close(opt.state["clip"]["grad_norm"], full.norm(), **TOL)

    # Meshes that together miss a rank: refused at construction, asking for process_group.
    q = distribute_tensor(torch.zeros(4, 6), mesh["dp"], [Shard(0)])
    with pytest.raises(ValueError, match="process_group"):
        ClippedOptimizer(torch.optim.SGD([p, q], lr=1.0))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_replicate_and_shard_mix_on_2d_mesh_counts_each_element_once():
    _spawn(_mesh_worker, 4)


# -- construction, no processes -----------------------------------------------------------
@pytest.mark.parametrize("bad", [3, "world", object()])
def test_process_group_must_be_a_process_group(bad):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="process_group"):
        ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), process_group=bad)
