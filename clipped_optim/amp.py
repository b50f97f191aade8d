"""The GradScaler contract, and the fold of the clip into fused optimizer kernels.

``torch.amp.GradScaler.step(opt)`` treats an optimizer whose ``_step_supports_amp_scaling``
is true as one that unscales by itself: it checks the *scaled* gradients for inf/NaN, then
sets ``opt.grad_scale`` (the scale still applied to the gradients, or ``None`` after a
user's ``scaler.unscale_(opt)``) and ``opt.found_inf`` (a float tensor, > 0 on overflow),
calls ``opt.step()`` and deletes both attributes. ``GradScaler.update()`` then grows or
backs off exactly as it would for any optimizer: it only reads ``found_inf``.

:class:`~clipped_optim.ClippedOptimizer` takes that role, so it sees the scale and can merge
the unscale into the clip multiply, and hand both to a fused inner optimizer (Adam, AdamW,
SGD, Adagrad with ``fused=True``), whose kernel divides the gradients by ``grad_scale`` and
skips the update when ``found_inf == 1`` without a host sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["scaler_args", "folds_into_kernel", "fused_kernel_args"]


def scaler_args(opt: Optimizer) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_scale, found_inf)`` as GradScaler left them on ``opt`` for this step."""
    return getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)


def folds_into_kernel(inner: Optimizer) -> bool:
    """Whether ``inner`` consumes ``grad_scale``/``found_inf`` itself (the fused optimizers)."""
    return bool(getattr(inner, "_step_supports_amp_scaling", False))


@contextlib.contextmanager
def fused_kernel_args(inner: Optimizer, grad_scale: Tensor | None, found_inf: Tensor) -> Iterator[None]:
    """Set the attributes a fused ``inner.step()`` reads, and remove them afterwards.

    ``grad_scale`` must be float32 (the fused kernels assert it) and is the number the
    gradients are *divided* by: the loss scale divided by the clip coefficient.
    """
    inner.grad_scale = None if grad_scale is None else grad_scale.to(torch.float32)  # type: ignore[attr-defined]
    inner.found_inf = found_inf.to(torch.float32)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
