"""PyTorch Lightning: return a ClippedOptimizer from ``configure_optimizers``.

    pip install "clipped_optim[lightning]"
    python examples/lightning_example.py

Lightning's own clipping stays off (``gradient_clip_val=None``, the default): the optimizer
clips inside its ``step()``, which Lightning calls with its training closure. The clip
statistics reach Lightning's logger (here a CSV file) through
``clipped_optim.integrations.lightning.ClipStatsCallback``, every ``log_every_n_steps`` steps,
with one host sync each time and none on the other steps.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import pytorch_lightning as pl
except ImportError:  # the unified "lightning" package
    import lightning.pytorch as pl

try:
    from clipped_optim import ClippedOptimizer
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer
from clipped_optim.integrations.lightning import ClipStatsCallback


class Regressor(pl.LightningModule):
    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.max_norm = max_norm

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=1e-2)
        opt = ClippedOptimizer(inner, max_norm=self.max_norm)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": scheduler}


def data(n: int = 256, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(1, keepdim=True) * 10  # large targets: the first steps' gradients exceed max_norm
    return DataLoader(TensorDataset(x, y), batch_size=32)


def main(max_epochs: int = 3, root: str = "out/lightning", log_every_n_steps: int = 5) -> tuple[pl.Trainer, Regressor]:
    model = Regressor()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=None,  # Lightning's clipping off: the optimizer clips
        logger=pl.loggers.CSVLogger(root),
        log_every_n_steps=log_every_n_steps,
        callbacks=[ClipStatsCallback(per_parameter=True)],  # clip/grad_norm, ... in the CSV log
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data())
    print(trainer.optimizers[0].report())  # the ClippedOptimizer (self.optimizers() wraps it)
    return trainer, model


if __name__ == "__main__":
    main()
