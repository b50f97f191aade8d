"""Hugging Face ``Trainer``: the clip statistics in the Trainer's logs at its logging interval.

.. code-block:: python

    from clipped_optim.integrations.hf import ClipStatsCallback

    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)
    args = TrainingArguments(..., max_grad_norm=0, logging_steps=50)  # the Trainer's own clip off
    trainer = Trainer(model, args, optimizers=(opt, scheduler), callbacks=[ClipStatsCallback()])

On each training log (every ``logging_steps`` steps) the callback reads ``stats()`` of the
``ClippedOptimizer`` behind the Trainer's optimizer (one device-to-host copy) and adds
``clip/grad_norm``, ``clip/clip_coef``, ... to that log line: to ``trainer.state.log_history``
and to the ``logs`` every later callback receives. On the other steps it does nothing, so it
adds no host sync to them. When training begins it gives the ``ClippedOptimizer`` the model's
parameter names (:meth:`~clipped_optim.ClippedOptimizer.name_parameters`), so ``report()`` and
the ``optimizer.pt`` of the Trainer's checkpoints name the parameters behind outlier steps
(``python -m clipped_optim report out/checkpoint-500``).

The Trainer calls the callbacks in order, and it puts its reporting callbacks (``report_to``:
TensorBoard, W&B, MLflow, ...) *before* the ones passed in ``callbacks=``. For them to see the
statistics, put this callback first with :func:`add_to`::

    trainer = Trainer(model, args, optimizers=(opt, scheduler))
    add_to(trainer)

Needs ``transformers``: ``pip install "clipped_optim[transformers]"``.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from ._common import collect, name_parameters

__all__ = ["ClipStatsCallback", "add_to"]


class ClipStatsCallback(TrainerCallback):
    """Add ``ClippedOptimizer.stats()`` to the Trainer's log line, once per logged step.

    Args:
        prefix: prepended to every key (``"clip/"``: ``clip/grad_norm``, ``clip/clip_coef``, ...).
        per_parameter: also log each parameter's pre-clip gradient norm as
            ``clip/grad_norm/<parameter name>`` (one key per parameter).

    Attributes:
        logged_steps: the ``state.global_step`` of every log line the statistics were added to.
    """

    def __init__(self, prefix: str = "clip/", per_parameter: bool = False) -> None:
        self.prefix = prefix
        self.per_parameter = per_parameter
        self.logged_steps: list[int] = []
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            name_parameters([kwargs.get("optimizer")], model.named_parameters)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        # The first log line of a step is its training log; an evaluation logged at the same
        # step (after it) gets nothing, so the statistics are read once per logged step.
        if logs is None or (self.logged_steps and self.logged_steps[-1] == state.global_step):
            return
        model = kwargs.get("model")
        names = model.named_parameters if self.per_parameter and model is not None else None
        stats = collect([kwargs.get("optimizer")], self.prefix, names)
        if not stats:
            if not self._warned:
                warnings.warn(
                    "ClipStatsCallback: the Trainer's optimizer is not a ClippedOptimizer; nothing is logged. "
                    "Pass Trainer(optimizers=(ClippedOptimizer(...), scheduler)).",
                    stacklevel=2,
                )
                self._warned = True
            return
        self.logged_steps.append(state.global_step)
        logs.update(stats)
        # Trainer.log appended its own copy of this line to log_history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


def add_to(trainer: Any, callback: ClipStatsCallback | None = None) -> ClipStatsCallback:
    """Put a ClipStatsCallback first among ``trainer``'s callbacks, so the reporting callbacks
    (``report_to``) that come after it see the statistics; return it."""
    callback = ClipStatsCallback() if callback is None else callback
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
