"""The wrapper's distributed cost against world size (CPU, gloo, loopback).

    python benchmarks/bench_distributed.py [--worlds 1 2 4] [--iters 60]

Each rank holds the same workload, W1 (400 fp32 gradients of 2,500 elements:
many small tensors, where a clip costs most per element), and times, interleaved in every
iteration after a barrier:

    inner      SGD(foreach).step() alone
    local      ClippedOptimizer step, no collective (the DDP case)
    reduced    ClippedOptimizer step with process_group=WORLD: one all-reduce of two numbers
    allreduce  a bare dist.all_reduce of one float32 scalar

Then, on an FSDP2 model (24 sharded Linear(256, 256) blocks: 48 DTensor gradients), the
wrapper's step against ``torch.nn.utils.clip_grad_norm_`` on the DTensors plus the same
inner step.

Reported: rank 0's medians, the paired ratio reduced/local (the price of the collective),
and each variant's median against the single-process (world 1) median of ``local``.
With more processes than the 2 cores of this machine the ranks share cores, so the ratio to
world 1 also holds that oversubscription; reduced/local, measured in the same iteration, does
not.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipped_optim import ClippedOptimizer

N_TENSORS, NUMEL = 400, 2_500
VARIANTS = ("inner", "local", "reduced", "allreduce")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    torch.manual_seed(rank)
    params = [torch.zeros(NUMEL, requires_grad=True) for _ in range(N_TENSORS)]
    grads = [torch.randn(NUMEL) for _ in params]

    for p, g in zip(params, grads):
        p.grad = g.clone()

    def fresh():  # unclipped gradients for every variant (the clip scales them in place);
        # copied into the same buffers: fresh allocations would time page faults, not clips
        torch._foreach_copy_([p.grad for p in params], grads)

    inner = torch.optim.SGD(params, lr=1e-6, foreach=True)
    local = ClippedOptimizer(torch.optim.SGD(params, lr=1e-6, foreach=True), max_norm=1.0)
    reduced = ClippedOptimizer(
        torch.optim.SGD(params, lr=1e-6, foreach=True), max_norm=1.0, process_group=dist.group.WORLD
    )
    scalar = torch.ones(())
    steps = {
        "inner": inner.step,
        "local": local.step,
        "reduced": reduced.step,
        "allreduce": lambda: dist.all_reduce(scalar),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(iters + 5):
        for v in VARIANTS:
            fresh()
            t = _timed(steps[v])
            if i >= 5:  # warm-up
                times[v].append(t)
    times.update(_fsdp2_times(world, iters))
    if rank == 0:
        out.put(times)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _fsdp2_times(world: int, iters: int) -> dict[str, list[float]]:
    """FSDP2: 24 Linear(256, 256) blocks, each sharded (48 DTensor gradients); the wrapper's
    step against torch's ``clip_grad_norm_`` on the DTensors followed by the same inner step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(24)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(8, 256)).square().mean().backward()
    params = list(model.parameters())
    grads = [p.grad.to_local().clone() for p in params]
    inner = torch.optim.SGD(params, lr=1e-6, foreach=True)
    wrapped = ClippedOptimizer(torch.optim.SGD(params, lr=1e-6, foreach=True), max_norm=1e-3)

    def torch_clip():
        torch.nn.utils.clip_grad_norm_(params, 1e-3)
        inner.step()

    steps = {"fsdp2 inner": inner.step, "fsdp2 torch clip": torch_clip, "fsdp2 wrapper": wrapped.step}
    times: dict[str, list[float]] = {v: [] for v in steps}
    for i in range(iters + 5):
        for v, fn in steps.items():
            torch._foreach_copy_([p.grad.to_local() for p in params], grads)
            t = _timed(fn)
            if i >= 5:
                times[v].append(t)
    return times


def run(world: int, iters: int) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), iters, out), nprocs=world, join=False, start_method="spawn")
    times = out.get()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, W1 = {N_TENSORS} x {NUMEL} fp32, gloo, 1 thread/rank")
    results = {w: run(w, args.iters) for w in args.worlds}
    base = statistics.median(results[args.worlds[0]]["local"])
    print(f"\nmedians in microseconds (rank 0); x = ratio to world {args.worlds[0]} 'local'")
    print(f"{'world':>5} " + " ".join(f"{v:>17}" for v in VARIANTS) + f" {'reduced/local':>14}")
    for w, times in results.items():
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        paired = statistics.median(r / loc for r, loc in zip(times["reduced"], times["local"]))
        cells = " ".join(f"{med[v] * 1e6:9.0f} ({med[v] / base:4.2f}x)" for v in VARIANTS)
        print(f"{w:>5} {cells} {paired:13.3f}x")
    fsdp = ("fsdp2 inner", "fsdp2 torch clip", "fsdp2 wrapper")
    base = statistics.median(results[args.worlds[0]]["fsdp2 wrapper"])
    print(
        f"\nFSDP2, 48 DTensor gradients: medians in microseconds (rank 0); x = ratio to world {args.worlds[0]} wrapper"
    )
    print(f"{'world':>5} " + " ".join(f"{v:>18}" for v in fsdp) + f" {'wrapper/torch':>14}")
    for w, times in results.items():
        med = {v: statistics.median(times[v]) for v in fsdp}
        paired = statistics.median(a / b for a, b in zip(times["fsdp2 wrapper"], times["fsdp2 torch clip"]))
        cells = " ".join(f"{med[v] * 1e6:10.0f} ({med[v] / base:4.2f}x)" for v in fsdp)
        print(f"{w:>5} {cells} {paired:13.3f}x")


if __name__ == "__main__":
    main()
