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

import math
from typing import Any

import torch
from torch import Tensor

from . import distributed, policy
from ._tensors import flag
from .amp_scaler import report_found_inf
from .config import ClipConfig

__all__ = ["StepGate"]


class StepGate:
    """The :data:`clipped_optim.modes.Gate` of one step; after the call it holds the decision.

    Attributes (set by the call):
        finite: 0-dim bool, whether every gradient (opted-out groups included) is finite.
        hold: 0-dim bool, whether the update is skipped.
        skip: the same as float32 1.0/0.0 (the fused kernels' ``found_inf``), made when read.

    Args:
        config: the wrapper's options (the non-finite policy, spike skipping).
        clip_state: the step's pending clip state; the spike window is updated there.
        found_inf: GradScaler's overflow flag, or ``None``.
        reporter: the optimizer a :class:`~clipped_optim.ClipGradScaler` waits on for the
            overflow flag (it is written when the gate is called), or ``None``.
        spikes: whether to run the spike detector (not for a closure's re-evaluations).
    """

    __slots__ = (
        "config",
        "clip_state",
        "found_inf",
        "reporter",
        "spikes",
        "poison",
        "sharding",
        "finite",
        "hold",
        "nonfinite",
        "proceeded",
        "_skip",
        "_held",
    )

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
        #: sharded: the poison arrives with the mode's all-reduce (distributed.attach_unclipped)
        self.sharding: Any = None
        self.finite: Tensor | None = None
        self.hold: Tensor | None = None
        #: ``~finite`` and ``finite & ~hold`` where the call had them for free, else None
        self.nonfinite: Tensor | None = None
        self.proceeded: Tensor | None = None
        self._skip: Tensor | None = None
        #: ``hold`` as a bool, where the gate read it on the host (a CPU step), else None
        self._held: bool | None = None

    def __call__(self, total: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(hold, accept)`` for the pre-clip total norm ``total`` (see ``modes.Gate``)."""
        return self._decide(total, None)

    def on_host(self, total: Tensor, value: float) -> tuple[Tensor | None, Tensor]:
        """The call for ``total``, whose value the caller read on the host (a CPU step): the
        common case then costs no tensor op at all."""
        return self._decide(total, value)

    def _decide(self, total: Tensor, value: float | None) -> tuple[Tensor | None, Tensor]:
        if self.sharding is not None:
            self.poison = distributed.unclipped_poison(total, self.sharding)
        everything = total if self.poison is None else total + self.poison
        # A norm is >= 0 or NaN (the poison is 0 or NaN), so it is finite exactly where it is
        # below inf: one op, where isfinite is three; none when the caller read the value.
        known = None if value is None or self.poison is not None else value < math.inf
        finite = torch.lt(everything, math.inf) if known is None else flag(known, total.device)
        total_finite = finite if self.poison is None else torch.lt(total, math.inf)
        found = self.found_inf
        if self.reporter is not None:  # under ClipGradScaler: the overflow flag is ours to write
            found = report_found_inf(self.reporter, everything, found)
        self.finite = finite
        cfg = self.config
        spikes = self.spikes and cfg.skip_spikes
        spike = None
        if spikes and found is None and self.poison is None:
            # nothing but the norm itself can hold the step: it enters the window when finite
            spike = self._spike(total, finite)
            spikes = False  # asked; None if it decided on the host that this is no spike
        if cfg.nonfinite != "propagate" and found is None and not spikes and spike is None:
            # the common case: the step is held exactly when it is not finite (with opted-out
            # groups, a held step's norm may be finite: it must not enter an adaptive history)
            self.proceeded = finite
            if known is not None:
                return self._decided_on_host(finite, not known)
            if policy.on_host(finite.device):
                return self._decided_on_host(finite, not bool(finite))
            self.hold = self.nonfinite = ~finite
            return self.hold, finite
        # hold is None when nothing can stop the step (propagate, no GradScaler, no spikes)
        hold = self.nonfinite = None if cfg.nonfinite == "propagate" else ~finite
        if found is not None:  # GradScaler sums it over devices: it can exceed 1
            overflow = found.to(finite.device) > 0
            hold = overflow if hold is None else hold | overflow
        if spike is not None:
            hold = spike if hold is None else hold | spike
        elif spikes:
            blocked = torch.zeros_like(finite) if hold is None else hold
            spike = self._spike(total, total_finite & ~blocked)
            hold = blocked if spike is None else blocked | spike
        self.hold = torch.zeros_like(finite) if hold is None else hold
        if hold is None:
            self.proceeded = finite
            return None, total_finite
        accept = total_finite & ~hold
        if self.poison is None:  # then total_finite is finite: accept is finite & ~hold
            self.proceeded = accept
        return hold, accept

    def _decided_on_host(self, finite: Tensor, held: bool) -> tuple[Tensor | None, Tensor]:
        """The common case on a CPU, where reading ``finite`` is a load from memory (and the
        wrapper reads the decision anyway): the flags are constants, and a step that proceeds
        hands the mode no ``hold`` at all, so it multiplies by its coefficient with no where().
        ``held`` is ``not finite``, read on the host."""
        self._held = held
        self.hold = self.nonfinite = flag(held, finite.device)
        self._skip = flag(held, finite.device, torch.float32)
        return (self.hold if held else None), finite

    def _spike(self, total: Tensor, enter: Tensor) -> Tensor | None:
        """Ask the spike detector (see :func:`clipped_optim.policy.skip_gate`)."""
        cfg = self.config
        assert cfg.skip is not None  # skip_spikes is True exactly when it is set
        return policy.skip_gate(cfg.skip, cfg.skip_keys, self.clip_state, total, enter, cfg.norm_type)

    def held_on_host(self) -> bool | None:
        """Whether the step is held, where the gate decided on the host (a CPU step), else
        None. Only non-finite gradients hold a step decided there: held is also not finite."""
        return self._held

    def held(self) -> bool:
        """Whether the step is held, read on the host (once: the gate may have read it)."""
        assert self.hold is not None, "the gate was not asked"
        return self._held if self._held is not None else bool(self.hold)

    def settle(self, total: Tensor) -> None:
        """Decide now if the mode never asked (it had nothing to hold)."""
        if self.hold is None:
            self(total)

    @property
    def skip(self) -> Tensor:
        """``hold`` as float32 1.0/0.0: the fused kernels' ``found_inf`` (made when asked)."""
        if self._skip is None:
            assert self.hold is not None, "the gate was not asked"
            self._skip = self.hold.float()  # exactly 1.0: the CPU fused kernels skip on nothing else
        return self._skip

    def decided(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(finite, hold, skip)`` once the gate has been called (see the attributes)."""
        assert self.finite is not None and self.hold is not None, "the gate was not asked"
        return self.finite, self.hold, self.skip

    def mark_nonfinite(self) -> None:
        """A closure's re-evaluation produced NaN/Inf: the step is skipped after all."""
        finite, hold, _ = self.decided()
        self.finite, self.hold, self._skip = torch.zeros_like(finite), torch.ones_like(hold), None
        self.nonfinite, self.proceeded = self.hold, self.finite
        if self._held is not None:  # decided on the host: it stays so (the device path reads nothing)
            self._held = True
