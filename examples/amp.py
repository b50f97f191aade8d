"""Mixed precision: bf16 autocast, and fp16-style loss scaling with ``GradScaler``.

    python examples/amp.py            # CPU: bf16 autocast, then GradScaler("cpu")
    python examples/amp.py --cuda     # the same on a GPU (fp16 autocast + GradScaler); needs CUDA

With a ``GradScaler``, call ``scaler.step(opt)`` on the ClippedOptimizer itself and do **not**
call ``scaler.unscale_`` first: the scaler hands the wrapper the scale, and the wrapper clips
the *unscaled* gradients (unscale and clip in one multiply) and skips the step on overflow.
(``scaler.unscale_(opt)`` then ``scaler.step(opt)`` on the same object also works; unscaling
the inner optimizer and stepping the wrapper would unscale twice.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

try:
    from clipped_optim import ClippedOptimizer
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer


def _model_and_data(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    x = torch.randn(256, 16, device=device)
    return model, x, x.sum(1, keepdim=True) * 5


def bf16_autocast(device: str = "cpu", steps: int = 30) -> ClippedOptimizer:
    """bf16 has fp32's range: no loss scaling needed, the wrapper clips as usual."""
    model, x, y = _model_and_data(device)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=1.0)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
    return opt


def grad_scaler(device: str = "cpu", steps: int = 30, dtype: torch.dtype = torch.bfloat16) -> ClippedOptimizer:
    """Loss scaling: the wrapper sees the scale and clips the unscaled gradients."""
    model, x, y = _model_and_data(device)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=1.0)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**16)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # no scaler.unscale_ needed: the wrapper unscales and clips
        scaler.update()
    return opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        parser.error(
            f"--cuda needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none here. "
            "Run without --cuda for the CPU version (bf16 autocast, then GradScaler('cpu'))."
        )
    device = "cuda" if args.cuda else "cpu"
    print("bf16 autocast:", bf16_autocast(device).stats())
    half = torch.float16 if args.cuda else torch.bfloat16
    print("GradScaler:   ", grad_scaler(device, dtype=half).stats())


if __name__ == "__main__":
    main()
