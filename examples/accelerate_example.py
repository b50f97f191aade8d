"""Hugging Face Accelerate: ``accelerator.prepare`` a ClippedOptimizer like any optimizer.

    pip install "clipped_optim[accelerate]"
    python examples/accelerate_example.py                       # one process, CPU or one GPU
    accelerate launch --num_processes 2 examples/accelerate_example.py   # DDP

``prepare`` wraps it in an ``AcceleratedOptimizer`` whose ``step()`` calls ours, which clips.
Do not also call ``accelerator.clip_grad_norm_``: that would clip twice. Under DDP the
gradients are already all-reduced when ``step()`` runs, so every rank clips by the same norm.
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


def main(steps_per_epoch: int = 8, epochs: int = 2, max_norm: float = 1.0, cpu: bool = True) -> dict[str, float]:
    accelerator = Accelerator(cpu=cpu)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=max_norm)
    x = torch.randn(32 * steps_per_epoch, 8)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True) * 10), batch_size=32)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            opt.step()  # AcceleratedOptimizer.step -> ClippedOptimizer.step: clips, then AdamW
    stats = opt.optimizer.stats()  # opt is the AcceleratedOptimizer; .optimizer is ours
    accelerator.print(stats)
    accelerator.print(opt.optimizer.report())
    return stats


if __name__ == "__main__":
    main()
