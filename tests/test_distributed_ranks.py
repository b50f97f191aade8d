"""Ranks never diverge: every rank runs the same collectives and ends each step (and each load)
with the same clip state, equal to one process's, whatever its own groups, gradients, dtypes
or slice of the model. One regression test per way they used to diverge (2 gloo processes).

Uses the spawn harness of test_distributed.py (collective timeouts, the gloo exit flake).
"""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from clipped_optim import ClipGradScaler, ClippedOptimizer
from clipped_optim import distributed as cdist
from test_distributed import _data, _fsdp2_model, _half, _loss, _model, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TOL = dict(rtol=1e-5, atol=1e-6)


def _gather(value: float) -> list[float]:
    """``value`` from every rank (float64, so the comparison is to the bit)."""
    mine = torch.tensor([value], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(t) for t in every]


def _broadcast_owned(params: list[torch.Tensor], world: int) -> None:
    """ZeRO-style: the owner of each parameter (index modulo world) sends its update."""
    for i, p in enumerate(params):
        dist.broadcast(p.data, src=i % world)


# -- 1. an opted-out group on some ranks only ----------------------------------------------
HEAD = 4  # the last weight: owned by rank 0 under params[rank::2], opted out of clipping
NAN_STEP = 3  # a NaN in the opted-out head: every rank must skip


def _optout_groups(params: list[torch.Tensor], owned: list[torch.Tensor], head: torch.Tensor) -> list[dict]:
    groups = [{"params": [p for p in owned if p is not head]}]
    if any(p is head for p in owned):
        groups.append({"params": [head], "clip": False})
    return groups


def _run_optout(model: nn.Module, opt, rank: int, world: int, sharded: bool, late_head: list[dict] | None = None):
    params = list(model.parameters())
    norms, skipped = [], []
    for step in range(5):
        if step == 1 and late_head:  # the head joins later, on the rank that owns it only
            opt.add_param_group(late_head[0])
        model.zero_grad()
        _loss(model, *_data(step)).backward()
        if step == NAN_STEP:
            params[HEAD].grad.view(-1)[0] = math.nan
        opt.step()
        if sharded:
            _broadcast_owned(params, world)
        norms.append(float(opt.state["clip"]["grad_norm"]))
        skipped.append(int(opt.state["clip"]["skipped_steps"]))
    return norms, skipped


def _optout_worker(rank: int, world: int) -> None:
    ref_model = _model()
    params = list(ref_model.parameters())
    ref_opt = ClippedOptimizer(torch.optim.SGD(_optout_groups(params, params, params[HEAD]), lr=0.1), max_norm=0.5)
    ref_norms, ref_skipped = _run_optout(ref_model, ref_opt, rank, world, sharded=False)
    assert ref_skipped[NAN_STEP] == 1

    model = _model()
    params = list(model.parameters())
    owned = params[rank::world]
    opt = ClippedOptimizer(
        torch.optim.SGD(_optout_groups(params, owned, params[HEAD]), lr=0.1),
        max_norm=0.5,
        process_group=dist.group.WORLD,
    )
    norms, skipped = _run_optout(model, opt, rank, world, sharded=True)
    assert skipped == ref_skipped
    for step, (got, want) in enumerate(zip(norms, ref_norms)):
        if step != NAN_STEP:
            assert math.isclose(got, want, rel_tol=1e-5), (step, norms, ref_norms)
    assert math.isnan(norms[NAN_STEP])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)

    # The opted-out head added by add_param_group after the first step, on its owner only:
    # nothing is re-planned or re-checked across the ranks (a collective rank 1 would not join).
    ref_model = _model()
    params = list(ref_model.parameters())
    groups = _optout_groups(params, params, params[HEAD])
    ref_opt = ClippedOptimizer(torch.optim.SGD(groups[:1], lr=0.1), max_norm=0.5)
    ref_norms, _ = _run_optout(ref_model, ref_opt, rank, world, sharded=False, late_head=groups[1:])
    model = _model()
    params = list(model.parameters())
    groups = _optout_groups(params, params[rank::world], params[HEAD])
    opt = ClippedOptimizer(torch.optim.SGD(groups[:1], lr=0.1), max_norm=0.5, process_group=dist.group.WORLD)
    norms, _ = _run_optout(model, opt, rank, world, sharded=True, late_head=groups[1:])
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6, equal_nan=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_opt_out_group_on_one_rank_only_matches_one_process():
    _spawn(_optout_worker, 2)


# -- 2. full-state resume, broadcast from rank 0 -------------------------------------------
ZCLIP = dict(mode="zclip", warmup_steps=3, max_norm=None)
SPIKE_STEP = 7


def _train_spiky(model, opt, rank: int, world: int, steps) -> list[tuple[float, float]]:
    seen = []
    for step in steps:
        opt.zero_grad()
        x, y = _data(step)
        factor = 30.0 if step == SPIKE_STEP else 1.0
        (_loss(model, _half(x, rank, world), _half(y, rank, world)) * factor).backward()
        opt.step()
        seen.append((float(opt.state["clip"]["threshold"]), float(opt.state["clip"]["clip_coef"])))
    return seen


def _broadcast_resume_worker(rank: int, world: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    model = _fsdp2_model(world)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **ZCLIP)
    _train_spiky(model, opt, rank, world, range(6))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Copies, as a checkpoint on disk would be: torch hands back AdamW's live 0-dim `step`
    # tensors, and a load keeps them, so two runs in one process would share them.
    model_sd = copy.deepcopy(get_model_state_dict(model, options=full))
    optim_sd = copy.deepcopy(cdist.get_optimizer_state_dict(model, opt, options=full))
    saved = {k: v.clone() for k, v in opt.state["clip"].items() if isinstance(v, torch.Tensor)}
    expected = _train_spiky(model, opt, rank, world, range(6, 9))
    expected_params = [p.detach().full_tensor() for p in model.parameters()]

    # As torch's helpers expect: rank 0 passes the full state, the others an empty dict.
    model2 = _fsdp2_model(world)
    opt2 = ClippedOptimizer(torch.optim.AdamW(model2.parameters(), lr=0.05), **ZCLIP)
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model2, model_sd if rank == 0 else {}, options=load)
    cdist.set_optimizer_state_dict(model2, opt2, optim_sd if rank == 0 else {}, options=load)
    clip = opt2.state["clip"]
    assert int(clip["steps"]) == 6, (rank, int(clip["steps"]))
    for key in ("zclip_mean", "zclip_var", "zclip_seen", "zclip_warmup", "history", "clipped_steps"):
        assert torch.equal(clip[key], saved[key]), (rank, key)
    assert _gather(float(clip["zclip_mean"]))[0] == _gather(float(clip["zclip_mean"]))[1]
    resumed = _train_spiky(model2, opt2, rank, world, range(6, 9))
    assert resumed[SPIKE_STEP - 6][1] < 1  # the spike is clipped, on every rank alike
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), **TOL)
    for p, q in zip(model2.parameters(), expected_params):
        torch.testing.assert_close(p.detach().full_tensor(), q, **TOL)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_full_state_resume_broadcast_from_rank0_restores_clip_state_on_every_rank():
    _spawn(_broadcast_resume_worker, 2)


# -- 3. the reduction's dtype does not depend on this rank's gradients -------------------
def _dtype_worker(rank: int, world: int) -> None:
    # Rank 0 owns a float64 parameter, rank 1 a float32 one; SGD(lr=1) from zero: p = -clipped grad.
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    mine = a if rank == 0 else b
    opt = ClippedOptimizer(torch.optim.SGD([mine], lr=1.0), max_norm=1.0, process_group=dist.group.WORLD)
    mine.grad = torch.ones_like(mine)
    opt.step()
    norm = float(opt.state["clip"]["grad_norm"])
    assert math.isclose(norm, math.sqrt(6), rel_tol=1e-6), norm
    torch.testing.assert_close(mine.detach(), torch.full_like(mine, -1 / (math.sqrt(6) + 1e-6)))

    # A step where rank 0 has no gradient at all: it still joins, with the same dtype.
    opt.zero_grad()
    if rank == 1:
        b.grad = torch.full_like(b, 2.0)
    opt.step()
    assert math.isclose(float(opt.state["clip"]["grad_norm"]), math.sqrt(12), rel_tol=1e-6)
    assert _gather(float(opt.state["clip"]["grad_norm"]))[0] == _gather(float(opt.state["clip"]["grad_norm"]))[1]

    # inf-norm, an inf on rank 1 only: the reduced norm is inf on both ranks, both skip.
    opt = ClippedOptimizer(torch.optim.SGD([mine], lr=1.0), norm_type=math.inf, process_group=dist.group.WORLD)
    mine.grad = torch.ones_like(mine)
    if rank == 1:
        mine.grad[0] = math.inf
    before = mine.detach().clone()
    opt.step()
    assert math.isinf(float(opt.state["clip"]["grad_norm"]))
    assert int(opt.state["clip"]["skipped_steps"]) == 1
    assert torch.equal(mine.detach(), before)
    # ... and a NaN there: NaN, as one process's max over the same values (MAX may drop a NaN).
    mine.grad = torch.ones_like(mine)
    if rank == 1:
        mine.grad[0] = math.nan
    opt.step()
    assert math.isnan(float(opt.state["clip"]["grad_norm"]))
    assert int(opt.state["clip"]["skipped_steps"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_reduction_dtype_is_the_same_on_every_rank():
    _spawn(_dtype_worker, 2)


# -- 4. DCP resume keeps the norm history --------------------------------------------------
def _history_worker(rank: int, world: int, ckpt_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = _fsdp2_model(world)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), max_norm=0.5, history_size=1000)
    _train_spiky(model, opt, rank, world, range(3))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": cdist.get_optimizer_state_dict(model, opt)},
        checkpoint_id=ckpt_dir,
    )

    model2 = _fsdp2_model(world)
    opt2 = ClippedOptimizer(torch.optim.AdamW(model2.parameters(), lr=0.05), max_norm=0.5, history_size=1000)
    state = {"model": get_model_state_dict(model2), "optim": cdist.get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model2, state["model"])
    cdist.set_optimizer_state_dict(model2, opt2, state["optim"])
    clip, saved = opt2.state["clip"], opt.state["clip"]
    assert "history" in clip, "the history was dropped"
    assert torch.equal(clip["history"], saved["history"])
    assert torch.equal(clip["history_start"], saved["history_start"])
    report = opt2.report()
    assert report.total_steps == 3 and report.steps == [0, 1, 2], report


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dcp_resume_keeps_the_norm_history():
    with tempfile.TemporaryDirectory() as ckpt_dir:
        _spawn(_history_worker, 2, ckpt_dir)


# -- 5. process_group= with a GradScaler ---------------------------------------------------
INF_STEP = 1


def _scaled_steps(model: nn.Module, opt, scaler, owned_by, world: int) -> list[float]:
    params = list(model.parameters())
    scales = []
    for step in range(4):
        model.zero_grad()
        scaler.scale(_loss(model, *_data(step))).backward()
        if step == INF_STEP:
            params[1].grad[0] = math.inf  # owned by rank 1 under params[rank::2]
        scaler.step(opt)
        scaler.update()
        if owned_by is not None:
            _broadcast_owned(params, world)
        scales.append(float(scaler.get_scale()))
    return scales


def _scaler_worker(rank: int, world: int) -> None:
    # torch.amp.GradScaler sees this rank's slice only: refused, saying what to use instead.
    model = _model()
    owned = list(model.parameters())[rank::world]
    opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), max_norm=0.5, process_group=dist.group.WORLD)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(_loss(model, *_data(0))).backward()
    with pytest.raises(ValueError, match="ClipGradScaler"):
        scaler.step(opt)

    # ClipGradScaler: the overflow flag is the global one; the scales agree with one process.
    ref = _model()
    ref_opt = ClippedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), max_norm=0.5)
    ref_scales = _scaled_steps(ref, ref_opt, ClipGradScaler("cpu", init_scale=2.0**10, growth_interval=2), None, world)
    assert ref_scales[INF_STEP] == 2.0**9
    model = _model()
    owned = list(model.parameters())[rank::world]
    opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), max_norm=0.5, process_group=dist.group.WORLD)
    scales = _scaled_steps(model, opt, ClipGradScaler("cpu", init_scale=2.0**10, growth_interval=2), rank, world)
    assert scales == ref_scales
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_process_group_with_grad_scaler_keeps_scales_equal_or_refuses():
    _spawn(_scaler_worker, 2)


# -- 6. misuse that used to go silent ------------------------------------------------------
def _misuse_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    # process_group= under DDP: every rank holds the same complete gradients.
    model = DDP(_model())
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), process_group=dist.group.WORLD)
    x, y = _data(0)
    _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
    with pytest.raises(ValueError, match="identical"):
        opt.step()
    # ... and without it, the on-demand check finds the replicas it expects.
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    cdist.check_ranks(opt)

    # Manual slices without process_group=: refused by the explicit check.
    model = _model()
    owned = list(model.parameters())[rank::world]
    opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1))
    _loss(model, *_data(0)).backward()
    with pytest.raises(ValueError, match="process_group"):
        cdist.check_ranks(opt)

    # Options that differ between ranks.
    opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), max_norm=0.5 + rank, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="options"):
        opt.step()

    # A clip state loaded on rank 0 only.
    opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), process_group=dist.group.WORLD)
    opt.step()
    if rank == 0:
        saved = opt.state_dict()
        opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), process_group=dist.group.WORLD)
        opt.load_state_dict(saved)
    else:
        opt = ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), process_group=dist.group.WORLD)
    with pytest.raises(RuntimeError, match="steps"):
        opt.step()

    # A group this rank is not in.
    alone = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="not a member"):
            ClippedOptimizer(torch.optim.SGD(owned, lr=0.1), process_group=alone)

    # FSDP1 with use_orig_params=True: slices nothing marks as such; check_ranks finds them.
    sliced = FSDP(_model(), use_orig_params=True, device_id=torch.device("cpu"))
    opt = ClippedOptimizer(torch.optim.SGD(sliced.parameters(), lr=0.1))
    _loss(sliced, *_data(0)).backward()
    with pytest.raises(ValueError, match="process_group"):
        cdist.check_ranks(opt)

    # FSDP1 flat parameters are shards: without process_group= refused at construction.
    sharded = FSDP(_model(), use_orig_params=False, device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match="process_group"):
        ClippedOptimizer(torch.optim.SGD(sharded.parameters(), lr=0.1))
    ClippedOptimizer(torch.optim.SGD(sharded.parameters(), lr=0.1), process_group=dist.group.WORLD)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_misuse_of_process_group_is_detected():
    _spawn(_misuse_worker, 2)
