"""Whether a step proceeds, decided on the device before any gradient is changed.

A step does not proceed when its gradients hold NaN/Inf (unless ``nonfinite="propagate"``),
when GradScaler found an overflow, or when the spike detector flags its norm. The mode asks
the :class:`StepGate` as soon as it has measured the norm, before it clips; a step that will
not proceed is then multiplied by 1 (or clamped at ``inf``), so its gradients stay
bit-identical, and an adaptive history is fed only the norms of steps that proceed. Deciding is
tensor arithmetic, so it costs no host sync: the wrapper reads the decision on the host once,
where it must (see :meth:`clipped_optim.ClippedOptimizer.step`), and a fused kernel reads it
on the device as its ``found_inf``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import adaptive
from .amp_scaler import report_found_inf
from .config import ClipConfig

__all__ = ["StepGate"]


class StepGate:
    """The :data:`clipped_optim.modes.Gate` of one step; after the call it holds the decision.

    Attributes (set by the call):
        finite: 0-dim bool, whether every gradient (opted-out groups included) is finite.
        skip: 0-dim float32, 1.0 when the update is skipped (the fused kernels' ``found_inf``).

    Args:
        config: the wrapper's options (the non-finite policy, spike skipping).
        clip_state: the step's pending clip state; the spike window is updated there.
        found_inf: GradScaler's overflow flag, or ``None``.
        reporter: the optimizer a :class:`~clipped_optim.ClipGradScaler` waits on for the
            overflow flag (it is written when the gate is called), or ``None``.
        spikes: whether to run the spike detector (not for a closure's re-evaluations).
    """

    __slots__ = ("config", "clip_state", "found_inf", "reporter", "spikes", "poison", "finite", "skip")

    def __init__(
        self,
        config: ClipConfig,
        clip_state: dict[str, Any],
        found_inf: Tensor | None = None,
        reporter: Any = None,
        spikes: bool = True,
    ) -> None:
        self.config, self.clip_state, self.found_inf = config, clip_state, found_inf
        self.reporter, self.spikes = reporter, spikes
        #: 0 (or NaN) from the groups that are not clipped: their NaN/Inf must hold the step too
        self.poison: Tensor | None = None
        self.finite: Tensor | None = None  # pragma: no mutate (the gate sets it; every built-in mode calls it)
        self.skip: Tensor | None = None  # pragma: no mutate (likewise)

    def __call__(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """``(hold, accept)`` for the pre-clip total norm ``total`` (see ``modes.Gate``)."""
        everything = total if self.poison is None else total + self.poison
        finite = torch.isfinite(everything)
        found = self.found_inf
        if self.reporter is not None:  # under ClipGradScaler: the overflow flag is ours to write
            found = report_found_inf(self.reporter, everything, found)
        blocked = torch.zeros_like(finite) if self.config.nonfinite == "propagate" else ~finite
        if found is not None:
            blocked = blocked | (found.to(finite.device) > 0)
        hold = blocked
        if self.spikes and self.config.skip_spikes:
            enter = torch.isfinite(total) & ~blocked
            hold = blocked | adaptive.spike_gate(self.config, self.clip_state, total, enter)
        self.finite, self.skip = finite, hold.float()
        return hold, torch.isfinite(total) & ~hold

    def settle(self, total: Tensor) -> None:
        """Decide now if the mode never asked (it had nothing to hold)."""
        if self.skip is None:
            self(total)  # pragma: no mutate (every built-in mode calls the gate itself)

    def mark_nonfinite(self) -> None:
        """A closure's re-evaluation produced NaN/Inf: the step is skipped after all."""
        assert self.skip is not None
        self.finite = torch.zeros_like(self.finite)
        self.skip = torch.ones_like(self.skip)
