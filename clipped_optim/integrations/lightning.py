"""PyTorch Lightning: the clip statistics in ``self.log`` at the Trainer's logging interval.

.. code-block:: python

    from clipped_optim.integrations.lightning import ClipStatsCallback

    trainer = pl.Trainer(callbacks=[ClipStatsCallback()], log_every_n_steps=50)
    trainer.fit(model)  # configure_optimizers returns a ClippedOptimizer

On each step where Lightning writes its logs (every ``log_every_n_steps`` optimizer steps, and
when training stops), the callback reads ``stats()`` of every ``ClippedOptimizer`` in
``trainer.optimizers`` (one device-to-host copy each) and logs it with
``pl_module.log_dict(..., on_step=True, on_epoch=False)``: the values reach every logger of
the Trainer (CSV, TensorBoard, W&B, ...) and ``trainer.logged_metrics``. On the other steps it
does nothing, so it adds no host sync to them.

When training starts it also gives each ``ClippedOptimizer`` the module's parameter names
(:meth:`~clipped_optim.ClippedOptimizer.name_parameters`), so ``report()`` and the checkpoints
Lightning saves name the parameters behind outlier steps (``python -m clipped_optim report
last.ckpt``).

Needs ``pytorch_lightning`` (or the unified ``lightning`` package, used when
``pytorch_lightning`` is absent): ``pip install "clipped_optim[lightning]"``.
"""

from __future__ import annotations

from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified "lightning" package
    import lightning.pytorch as pl

from ._common import collect, name_parameters

__all__ = ["ClipStatsCallback"]


class ClipStatsCallback(pl.Callback):
    """Log ``ClippedOptimizer.stats()`` through ``pl_module.log_dict`` when Lightning logs.

    Args:
        prefix: prepended to every key (``"clip/"``: ``clip/grad_norm``, ``clip/clip_coef``, ...).
            With several ClippedOptimizers, their index follows it (``clip/1/grad_norm``).
        per_parameter: also log each parameter's pre-clip gradient norm as
            ``clip/grad_norm/<parameter name>`` (one key per parameter).
        prog_bar: show the values in the progress bar as well.

    Attributes:
        logged_steps: the ``trainer.global_step`` of every step the statistics were read at.
    """

    def __init__(self, prefix: str = "clip/", per_parameter: bool = False, prog_bar: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        self.per_parameter = per_parameter
        self.prog_bar = prog_bar
        self.logged_steps: list[int] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        name_parameters(trainer.optimizers, pl_module.named_parameters)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _logs_this_step(trainer):
            return
        names = pl_module.named_parameters if self.per_parameter else None
        stats = collect(trainer.optimizers, self.prefix, names)
        if stats:
            self.logged_steps.append(trainer.global_step)
            # batch_size=1: nothing to infer from the batch, the values are not averaged over it
            pl_module.log_dict(stats, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)


def _logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes its step logs after this batch: the test its own logger
    connector makes right after ``on_train_batch_end`` (``log_every_n_steps``, or the last
    step; not while accumulating gradients)."""
    connector = getattr(trainer, "_logger_connector", None)
    fit_loop = getattr(trainer, "fit_loop", None)
    if connector is None or not hasattr(connector, "should_update_logs"):  # another Lightning: the public rule
        every = trainer.log_every_n_steps
        return bool(every) and trainer.global_step % every == 0
    accumulating = fit_loop is not None and fit_loop._should_accumulate()
    return not accumulating and bool(connector.should_update_logs or trainer.fast_dev_run)
