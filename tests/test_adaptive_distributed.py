"""The adaptive modes on sharded gradients (FSDP2, 2 gloo processes): the thresholds are
identical on every rank and the run matches a single process on the full batch.

Uses the spawn harness of test_distributed.py (see there for the gloo exit flake).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from clipped_optim import ClippedOptimizer
from test_distributed import _data, _fsdp2_model, _full, _half, _loss, _model, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS = 8
SCALAR = [
    dict(mode="zclip", warmup_steps=3, max_norm=None),
    dict(mode="autoclip", history_length=4, quantile=0.5),
    dict(mode="norm", max_norm=0.5, skip_spikes=True, spike_window=3),
]
TOL = dict(rtol=1e-5, atol=1e-6)


def _factor(step: int) -> float:
    return 30.0 if step == 6 else 1.0  # a spike once the warm-ups are over


def _single(kw: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kw)
    thresholds = []
    for step in range(STEPS):
        opt.zero_grad()
        (_loss(model, *_data(step)) * _factor(step)).backward()
        opt.step()
        thresholds.append(opt.state["clip"]["threshold"].clone())
    return thresholds, [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int) -> None:
    for kw in SCALAR:
        ref_thresholds, ref_params = _single(kw)
        model = _fsdp2_model(world)
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kw)
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _data(step)
            (_loss(model, _half(x, rank, world), _half(y, rank, world)) * _factor(step)).backward()
            opt.step()
            mine = opt.state["clip"]["threshold"].reshape(1)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            assert all(torch.equal(t, every[0]) for t in every), (kw, step, every)  # bit-identical
            torch.testing.assert_close(mine[0], ref_thresholds[step], **TOL)
        for p, q in zip(model.parameters(), ref_params):
            torch.testing.assert_close(_full(p.detach()), q, **TOL)
    # the non-scalar adaptive modes say plainly that they do not shard
    for kw in (dict(mode="agc"), dict(mode="autoclip", per_param=True)):
        model = _fsdp2_model(world)
        opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kw)
        x, y = _data(0)
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        with pytest.raises(NotImplementedError, match="sharded"):
            opt.step()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_adaptive_thresholds_identical_on_every_rank_under_fsdp2():
    _spawn(_worker, 2)
