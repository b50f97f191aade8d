"""Clipped training under DDP or FSDP2, launched with torchrun (CPU/gloo or CUDA/NCCL).

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py            # DDP
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --fsdp2    # FSDP2 (DTensor gradients)

The wrapper needs no distributed option for either: under DDP the gradients are already
averaged, under FSDP2 it reduces the DTensor shards' norms with one all-reduce per step. Rank 0
prints the pre-clip global norm, the same number a single process would record on the
whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from clipped_optim import ClippedOptimizer


def build(fsdp2: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    if not fsdp2:
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp2", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build(args.fsdp2, device)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=1.0)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own shard of the data
    for step in range(args.steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = x[:, :1] * 3 + 0.1 * torch.randn(16, 1, generator=gen).to(device)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            clip = opt.state["clip"]  # reading the tensors syncs: do it when logging only
            print(
                f"step {step:3d}  loss {loss.item():.4f}  grad_norm {float(clip['grad_norm']):.4f}  "
                f"clipped {int(clip['clipped_steps'])}/{int(clip['steps'])}"
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
