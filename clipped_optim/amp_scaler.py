"""``ClipGradScaler``: a GradScaler that lets :class:`~clipped_optim.ClippedOptimizer` find
the overflow itself, saving GradScaler's own pass over the gradients.

``GradScaler.step(opt)`` on an optimizer that unscales by itself (``_step_supports_amp_scaling``)
first runs ``_check_inf_per_device``: ``torch._amp_foreach_non_finite_check_and_unscale_`` with
``inv_scale = 1.0``, which reads every gradient *and writes it back* (the CPU and CUDA kernels
store ``val * inv_scale`` whatever the scale). The wrapper measures the norm of the same
gradients anyway, and a norm is NaN/Inf exactly when an element is (or when the sum of squares
overflows float32, which also skips, as ``clip_grad_norm_(error_if_nonfinite=True)`` would
complain). So this scaler hands the wrapper a zero ``found_inf`` tensor instead, and the step
writes its own non-finite flag into it, on the device, before ``update()`` reads it: one read
and one write of all gradients fewer per step, no host sync.

Any other optimizer stepped by this scaler gets GradScaler's usual behaviour.

It overrides a private GradScaler method (``_check_inf_per_device``), checked against torch
2.6-2.13 by ``tests/test_fused.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ClipGradScaler", "report_found_inf", "fills_found_inf"]

_ATTR = "_clip_found_inf"


class ClipGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` without the extra inf-check pass for ``ClippedOptimizer``.

    Use it exactly like ``torch.amp.GradScaler`` (same arguments, same ``scale``/``step``/
    ``update``); the scale grows and backs off identically.
    """

    def _check_inf_per_device(self, optimizer: Optimizer) -> dict[Any, Tensor]:
        if not getattr(optimizer, "reports_found_inf", False):
            return super()._check_inf_per_device(optimizer)
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        setattr(optimizer, _ATTR, found_inf)  # filled by the step: report_found_inf
        per_device = {scale.device: found_inf}
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = per_device
        return per_device


def report_found_inf(opt: Optimizer, total_norm: Tensor, found_inf: Tensor | None) -> Tensor | None:
    """Under :class:`ClipGradScaler`, the overflow flag of this step, taken from the norm.

    Writes it where ``update()`` will read it, and returns it as the ``found_inf`` the step
    goes on with (GradScaler handed a zero one). Anywhere else ``found_inf`` is returned as is.
    """
    slot = opt.__dict__.pop(_ATTR, None)
    if slot is None:
        return found_inf
    flag = (~torch.isfinite(total_norm)).to(slot.device, slot.dtype)
    slot.copy_(flag)
    return flag if found_inf is None else found_inf + flag


def fills_found_inf(opt: Optimizer) -> bool:
    """Whether this step fills the overflow flag that the scaler's ``update()`` reads: under
    :class:`ClipGradScaler` the flag comes from the norm, which is global when sharded. Not
    after ``scaler.unscale_(opt)``, whose flag GradScaler computed from this rank's gradients."""
    return _ATTR in opt.__dict__
