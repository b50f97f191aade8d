"""Logging callbacks for training frameworks: the clip statistics in the framework's own logs.

* :mod:`clipped_optim.integrations.lightning`: ``ClipStatsCallback``, a PyTorch Lightning
  ``Callback`` (``Trainer(callbacks=[ClipStatsCallback()])``).
* :mod:`clipped_optim.integrations.hf`: ``ClipStatsCallback``, a Hugging Face
  ``transformers.TrainerCallback`` (``Trainer(callbacks=[ClipStatsCallback()])``).

Each reads :meth:`ClippedOptimizer.stats() <clipped_optim.ClippedOptimizer.stats>` (one
device-to-host copy) only on the steps where the framework writes its logs (Lightning's
``log_every_n_steps``, the Trainer's ``logging_steps``), never on the other steps, and adds
``clip/grad_norm``, ``clip/clip_coef``, ``clip/threshold``, the counters and ``clip/clip_rate`` to
that log line.

The framework is imported by the submodule, not here: ``import clipped_optim`` (and this
package) works without Lightning or transformers installed.
"""

__all__: list[str] = []
