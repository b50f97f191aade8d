"""The fixed clip modes as pure functions over lists of gradient tensors.

Each function measures the gradients, decides the coefficient and (unless ``apply=False``)
clips in place. None of them reads a tensor value on the host: the decision is made with
``clamp``/``where`` on the device, so a step costs no device-to-host synchronisation.

``grad_scale`` is the loss scale still applied to the gradients (GradScaler's scale, or
``None`` when they are already unscaled). The norms are taken of the scaled gradients and
divided by the scale, and the unscale is merged into the clip multiply: one pass over the
gradients instead of two.

References:
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
    ICML 2013 (global-norm clipping).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._tensors import flag, scalar_like
from .norms import GradBatch, as_batch, clamp_, scale_, scale_each_, tensor_norms, total_norm

__all__ = [
    "ClipResult",
    "Gate",
    "clip_grad_norm",
    "clip_grad_value",
    "clip_grad_norm_per_param",
    "held",
    "EPS",
    "global_norm_coef_host",
    "rounded_as",
]

#: Added to the norm before dividing, as ``torch.nn.utils.clip_grads_with_norm_`` does:
#: it keeps an all-zero gradient from producing 0/0, and makes parity with torch exact.
EPS = 1e-6


class ClipResult(NamedTuple):
    """What one clip measured and did.

    Attributes:
        total_norm: pre-clip global norm of the (unscaled) gradients, 0-dim.
        clip_coef: factor the gradients were multiplied by (<= 1); for per-parameter clipping
            the smallest one, for value clipping the ratio of the post- to the pre-clip norm.
        param_norms: pre-clip norm of each gradient, 1-D, in input order.
        threshold: the bound in effect (``max_norm``, or ``clip_value``), 0-dim.

    Whether the step proceeds is not the mode's to say: the gate it is handed decides (see
    :data:`Gate`), and the mode only holds the gradients when told to.
    """

    total_norm: Tensor
    clip_coef: Tensor
    param_norms: Tensor
    threshold: Tensor


#: Called by a mode once it has measured, before it changes any gradient: from the step's
#: pre-clip total norm, ``(hold, accept)``. ``hold`` (0-dim bool, or ``None``) is True when the
#: step will not proceed, and the mode then leaves the gradients as they are (it multiplies by
#: 1, which is exact); ``accept`` says whether the norm may enter an adaptive history. The
#: wrapper's gate (clipped_optim.decision) folds in the non-finite policy, GradScaler's
#: overflow flag and the spike detector, all on the device.
Gate = Callable[[Tensor], "tuple[Tensor | None, Tensor]"]


def open_gate(gate: Gate | None, total: Tensor) -> tuple[Tensor | None, Tensor]:
    """``gate(total)``, or no hold and "accept every finite norm" without a gate."""
    return (None, torch.isfinite(total)) if gate is None else gate(total)


def open_gate_on_host(gate: Gate | None, total: Tensor, value: float) -> tuple[Tensor | None, Tensor]:
    """:func:`open_gate` for a total norm whose value was read on the host (a CPU step): a gate
    that can take the value (``gate.on_host``) decides without a tensor op."""
    if gate is None:  # a norm is >= 0 or NaN: finite exactly where below inf
        return None, flag(value < math.inf, total.device)
    host_call = getattr(gate, "on_host", None)
    return host_call(total, value) if host_call is not None else gate(total)


def held(coef: Tensor, hold: Tensor | None) -> Tensor:
    """``coef``, or 1 where ``hold``: the coefficient of a step that will not proceed, which
    leaves the gradients bit-identical (a ``where`` on the device, not a host branch)."""
    return coef if hold is None else torch.where(hold, 1.0, coef)


def unscaled(factor: Tensor, grad_scale: Tensor | None, device: torch.device) -> Tensor:
    """The multiplier that clips by ``factor`` and removes GradScaler's scale in the same pass."""
    return factor if grad_scale is None else factor / grad_scale.to(device)


def _measure(batch: GradBatch, norm_type: float, grad_scale: Tensor | None, device: torch.device):
    total, stacked = total_norm(tensor_norms(batch, norm_type), norm_type, device, batch.sharding)
    if grad_scale is not None:
        # GradScaler's scale is a power of two, so dividing the norms by it is exact.
        scale = grad_scale.to(device)
        total, stacked = total / scale, stacked / scale
    return total, stacked


def _device(batch: GradBatch, device: torch.device | None) -> torch.device:
    if device is not None:  # pragma: no mutate (equivalent on one device)
        return device
    return batch.tensors[0].device if len(batch) else torch.device("cpu")


def global_norm_coef(total: Tensor, max_norm: float | Tensor) -> Tensor:
    """``min(1, max_norm / (total + EPS))`` on the device, as torch computes it."""
    return torch.clamp(max_norm / (total + EPS), max=1.0)


#: The dtypes whose arithmetic the host paths reproduce exactly (Python floats are doubles,
#: and float32 is one rounding of the double result away).
HOST_DTYPES = (torch.float32, torch.float64)


def rounded_as(value: float, dtype: torch.dtype) -> float:
    """``value`` as a 0-dim tensor of ``dtype`` (float32 or float64) holds it: rounded to the
    nearest float32 (``inf`` past its range), or unchanged for float64."""
    # native "f" packs as a C cast: to nearest, inf beyond the range
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]


def global_norm_coef_host(
    total: float, max_norm: float, dtype: torch.dtype, out_dtype: torch.dtype | None = None
) -> float:
    """:func:`global_norm_coef` of a total norm of ``dtype`` whose value was read on the host
    (a CPU step), in Python floats: the same bits, with no tensor op.

    torch computes ``max_norm / (total + EPS)`` as ``(total + EPS).reciprocal() * max_norm``,
    each op rounded to ``dtype`` with the Python numbers converted to it first. ``+ * /`` are
    correctly rounded in double, and double has more than twice float32's precision, so
    rounding the double result once gives the float32 op's result. ``out_dtype``: for a bound
    held in a tensor of another dtype, the dtype the product is promoted to.
    """
    out = dtype if out_dtype is None else out_dtype
    x = rounded_as(rounded_as(total, dtype) + rounded_as(EPS, dtype), dtype)
    coef = rounded_as(rounded_as(1.0 / x, dtype) * rounded_as(max_norm, out), out)
    return coef if not coef > 1.0 else 1.0  # NaN stays NaN, as in clamp


def clip_grad_norm(
    grads: Tensor | Sequence[Tensor] | GradBatch,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    grad_scale: Tensor | None = None,
    apply: bool = True,
    device: torch.device | None = None,
    gate: Gate | None = None,
    host: bool = False,
) -> ClipResult:
    """Scale the gradients so that their global ``norm_type``-norm is at most ``max_norm``.

    Equal to ``torch.nn.utils.clip_grad_norm_``: the direction is kept and only the length
    shrinks. With ``apply=False`` the gradients are left alone and the caller applies
    ``clip_coef`` (e.g. folded into a fused optimizer's ``grad_scale``). ``grads`` may be one
    tensor (one gradient) and ``norm_type`` the string ``"inf"``, as in torch.

    ``host=True`` says the norms are in host memory (a CPU step): the total is then read once
    and the coefficient computed in Python floats (the same bits, see
    :func:`global_norm_coef_host`), and a coefficient of exactly 1 multiplies nothing.

    References:
        Pascanu et al., "On the difficulty of training recurrent neural networks", ICML 2013.
    """
    batch = as_batch(grads, foreach)
    dev = _device(batch, device)
    total, stacked = _measure(batch, float(norm_type), grad_scale, dev)
    if host and total.dtype in HOST_DTYPES and not isinstance(max_norm, Tensor):
        return _clip_on_host(batch, total, stacked, max_norm, grad_scale, apply, gate)
    hold, _ = open_gate(gate, total)
    coef = global_norm_coef(total, max_norm)
    if apply:
        scale_(batch, unscaled(held(coef, hold), grad_scale, dev))
    return ClipResult(total, coef, stacked, scalar_like(max_norm, total))


def _clip_on_host(
    batch: GradBatch,
    total: Tensor,
    stacked: Tensor,
    max_norm: float,
    grad_scale: Tensor | None,
    apply: bool,
    gate: Gate | None,
) -> ClipResult:
    """:func:`clip_grad_norm` with the total read on the host: four 0-dim ops (and the gate's
    compare) become Python arithmetic, and only the recorded coefficient is made a tensor."""
    value = total.item()
    hold_flag, _ = open_gate_on_host(gate, total, value)
    hold = hold_flag is not None and bool(hold_flag)
    c = global_norm_coef_host(value, max_norm, total.dtype)
    # a new tensor every step, as on the device path: the recorded coefficient is the user's
    coef = torch.full((), c, dtype=total.dtype, device=total.device)
    if apply and grad_scale is not None:  # unscaled even when held (by 1, a kept constant), as on the device
        scale_(batch, unscaled(flag(True, total.device, total.dtype) if hold else coef, grad_scale, total.device))
    elif apply and not hold and c != 1.0:  # x * 1.0 is x: such a step need not multiply
        # by the tensor: the foreach multiply by a Python number is ~4x slower on a CPU
        scale_(batch, coef)
    return ClipResult(total, coef, stacked, scalar_like(max_norm, total))


def clip_grad_norm_per_param(
    grads: Tensor | Sequence[Tensor] | GradBatch,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    grad_scale: Tensor | None = None,
    device: torch.device | None = None,
    gate: Gate | None = None,
) -> ClipResult:
    """Clip each gradient tensor to norm ``max_norm`` on its own.

    Equal to ``clip_grad_norm_([p], max_norm, norm_type)`` for every parameter, with one
    norm launch and one multiply launch per ``(device, dtype)`` group instead of per tensor.
    """
    batch = as_batch(grads, foreach)
    dev = _device(batch, device)
    total, stacked = _measure(batch, float(norm_type), grad_scale, dev)
    hold, _ = open_gate(gate, total)
    coefs = torch.clamp(max_norm / (stacked + EPS), max=1.0)
    scale_each_(batch, unscaled(held(coefs, hold), grad_scale, dev).unbind())
    smallest = coefs.min() if len(batch) else torch.ones((), dtype=total.dtype, device=dev)
    return ClipResult(total, smallest, stacked, scalar_like(max_norm, total))


def clip_grad_value(
    grads: Tensor | Sequence[Tensor] | GradBatch,
    clip_value: float,
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    grad_scale: Tensor | None = None,
    device: torch.device | None = None,
    gate: Gate | None = None,
) -> ClipResult:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    The pre- and post-clip norms are measured for the statistics; value clipping changes the
    direction, and their ratio (``clip_coef``) says by how much the length shrank.
    """
    batch = as_batch(grads, foreach)
    dev = _device(batch, device)
    norm_type = float(norm_type)
    total, stacked = _measure(batch, norm_type, grad_scale, dev)
    hold, _ = open_gate(gate, total)
    if grad_scale is not None:
        scale_(batch, grad_scale.to(dev).reciprocal())
    clamp_(batch, clip_value if hold is None else _held_bound(clip_value, hold))
    after, _ = total_norm(tensor_norms(batch, norm_type), norm_type, dev, batch.sharding)
    coef = torch.where(total > 0, after / total.clamp(min=torch.finfo(total.dtype).tiny), 1.0)
    return ClipResult(total, coef, stacked, scalar_like(clip_value, total))


def _held_bound(clip_value: float, hold: Tensor) -> Tensor:
    """The clamp bound on the device: ``inf`` for a held step, which leaves every element (inf
    and NaN too) as it is. float64, so that each gradient dtype rounds ``clip_value`` as it
    rounds the Python number in ``clip_grad_value_``."""
    return torch.where(hold, math.inf, torch.full((), clip_value, dtype=torch.float64, device=hold.device))
