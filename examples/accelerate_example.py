"""Hugging Face Accelerate: ``accelerator.prepare`` a ClippedOptimizer like any optimizer.

    pip install "clipped_optim[accelerate]"
    python examples/accelerate_example.py                            # one process: CPU, or one GPU
    torchrun --nproc_per_node 2 examples/accelerate_example.py       # 2 processes, DDP (CPU: gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_example.py   # 2 GPUs

``prepare`` wraps it in an ``AcceleratedOptimizer`` whose ``step()`` calls ours, which clips.
Do not also call ``accelerator.clip_grad_norm_``: that would clip twice. Under DDP the
gradients are already all-reduced when ``step()`` runs, so every rank clips by the same norm;
the script prints that norm as each rank recorded it.

On CPU, start the processes with ``torchrun``: ``accelerate launch --cpu --num_processes 2``
(accelerate 1.15) starts *one* process, since its launcher runs several CPU processes only
through ``mpirun``. Accelerate picks up torchrun's ``RANK``/``WORLD_SIZE`` by itself, but on
CPU only with ``Accelerator(cpu=True)``: without it every process trains alone (the script
passes it when there is no GPU, and prints the number of processes).
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from clipped_optim import ClippedOptimizer
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer


def main(steps_per_epoch: int = 8, epochs: int = 2, max_norm: float = 1.0, cpu: bool | None = None) -> dict[str, float]:
    """Train a small regressor; return this rank's clip statistics.

    ``cpu=None``: the CPU when there is no GPU. Accelerate needs ``Accelerator(cpu=True)`` to
    join the processes torchrun started on CPU; without it each process trains alone.
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=max_norm)
    x = torch.randn(32 * steps_per_epoch, 8)
    # batch_size is per process: with N processes each epoch has steps_per_epoch / N steps
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True) * 10), batch_size=32)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            opt.step()  # AcceleratedOptimizer.step -> ClippedOptimizer.step: clips, then AdamW
    clipped = opt.optimizer  # opt is the AcceleratedOptimizer; .optimizer is ours
    stats = clipped.stats()
    # Every rank recorded the norm of the same all-reduced gradients: gather them to show it.
    norms = accelerator.gather(clipped.state["clip"]["grad_norm"].reshape(1).float()).tolist()
    accelerator.print(f"processes: {accelerator.num_processes}; last grad_norm on each rank: {norms}")
    accelerator.print(stats)
    accelerator.print(clipped.report())
    accelerator.end_training()  # destroys the process group, if any
    return stats


if __name__ == "__main__":
    main()
