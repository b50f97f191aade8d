"""Norm kernels: the one place where gradient norms are reduced.

Gradients are grouped once per step by ``(device, dtype)`` so that each group costs one
``torch._foreach_*`` launch instead of one launch per tensor. The plain per-tensor loop
(``foreach=False``) is kept as the ground truth the fast path is tested against.

Half-precision gradients are accumulated in float32: a GradScaler-scaled fp16 gradient has
entries up to 65504, and the sum of their squares overflows fp16 long before it overflows
float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support

from ._tensors import on_device
from .distributed import Sharding, reduce_total_norm

if TYPE_CHECKING:
    from .flat import FlatLayout

__all__ = ["GradBatch", "tensor_norms", "total_norm", "scale_", "scale_each_", "clamp_"]

_HALF = (torch.float16, torch.bfloat16)


class GradBatch:
    """A list of dense gradient tensors, grouped by ``(device, dtype)`` once.

    The grouping is reused by the norm, the clip and the statistics of one step, so a step
    pays for it once (``clip_grad_norm_`` groups twice).
    """

    __slots__ = ("tensors", "groups", "foreach", "sharding", "flat", "params", "positions", "n_total")

    def __init__(
        self,
        tensors: Sequence[Tensor],
        foreach: bool | None = None,
        sharding: Sharding | None = None,
        *,
        params: Sequence[Tensor] | None = None,
        positions: Sequence[int] | None = None,
        n_total: int | None = None,
    ) -> None:
        self.tensors = list(tensors)
        # Distributed (see clipped_optim.distributed): how the local norms combine into the
        # global one; None when the tensors are all there is.
        self.sharding = sharding
        # For the modes that need more than the gradients (clipped_optim.adaptive): the
        # parameters they belong to (AGC), their indices in optimizer order and the number of
        # parameters there (per-parameter histories). None when the caller did not give them.
        self.params: Sequence[Tensor] | None = params
        self.positions = positions
        self.n_total = n_total
        # torch's C++ helper called directly: its Python wrapper enters no_grad on every call
        grouped = torch._C._group_tensors_by_device_and_dtype([self.tensors], True) if self.tensors else {}  # type: ignore[list-item]
        # {(device, dtype): (tensors, positions in self.tensors)}
        self.groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {
            key: (cast(list[Tensor], lists[0]), idx) for key, (lists, idx) in grouped.items()
        }
        self.foreach = foreach
        # flat_grads=True: a clipped_optim.flat.FlatLayout whose buffers the tensors are views
        # of; the norm, scale and clamp below then act on the buffers (one kernel each).
        self.flat: FlatLayout | None = None

    def set_owners(self, params: Sequence[Tensor], positions: Sequence[int], n_total: int) -> None:
        """Record the parameters of the tensors, their positions in optimizer order and the
        number of parameters there (the adaptive modes read them; see ``__init__``)."""
        self.params, self.positions, self.n_total = params, positions, n_total

    def use_foreach(self, device: torch.device) -> bool:
        if self.foreach is None:
            return _has_foreach(device.type)
        if self.foreach and not _has_foreach(device.type):
            raise RuntimeError(f"foreach=True was passed, but foreach kernels are not supported on {device.type}")
        return self.foreach

    def __len__(self) -> int:
        return len(self.tensors)


@functools.lru_cache(maxsize=16)
def _has_foreach(device_type: str) -> bool:
    """Whether a device type has the foreach kernels (torch's check, asked once per type)."""
    return _device_has_foreach_support(torch.device(device_type))


def as_batch(grads: Tensor | Sequence[Tensor] | GradBatch, foreach: bool | None = None) -> GradBatch:
    """``grads`` as a :class:`GradBatch`; a single tensor is one gradient (as in torch's
    ``clip_grad_norm_``), not a sequence of rows."""
    if isinstance(grads, GradBatch):
        return grads
    return GradBatch([grads] if isinstance(grads, Tensor) else grads, foreach)


def tensor_norms(batch: GradBatch, norm_type: float) -> list[Tensor] | Tensor:
    """Per-tensor ``norm_type``-norms, in the order of ``batch.tensors``.

    float32 (or wider) results; half-precision inputs accumulate in float32. A flat batch
    returns them as one 1-D tensor (a sequence of 0-dim tensors too).
    """
    if batch.flat is not None:
        return batch.flat.tensor_norms(norm_type, batch.foreach)
    if len(batch.groups) == 1:  # one (device, dtype): the group is the batch, in its order
        ((device, dtype), (group, _)), *_ = batch.groups.items()
        return list(_group_norms(batch, device, dtype, group, norm_type))
    out: list[Tensor] = [None] * len(batch)  # type: ignore[list-item]
    for (device, dtype), (group, idx) in batch.groups.items():
        for i, n in zip(idx, _group_norms(batch, device, dtype, group, norm_type)):
            out[i] = n
    return out


def _group_norms(
    batch: GradBatch, device: torch.device, dtype: torch.dtype, group: list[Tensor], norm_type: float
) -> Sequence[Tensor]:
    """The norms of one ``(device, dtype)`` group: one foreach launch, or the per-tensor loop."""
    acc = torch.float32 if dtype in _HALF else None
    if batch.use_foreach(device):
        return torch._foreach_norm(group, norm_type, dtype=acc)
    return [torch.linalg.vector_norm(g, norm_type, dtype=acc) for g in group]


def total_norm(
    norms: Sequence[Tensor] | Tensor, norm_type: float, device: torch.device, sharding: Sharding | None = None
) -> tuple[Tensor, Tensor]:
    """Reduce per-tensor norms to the global norm, exactly as ``torch.nn.utils.get_total_norm``.

    Returns ``(total, stacked)``: ``stacked`` holds the per-tensor norms as one 1-D tensor
    (the statistics keep it, so logging per-layer norms costs no extra pass). With
    ``sharding`` the norms are of this rank's pieces and the total is reduced over its
    process group with one all-reduce (every rank of the group must call this).
    """
    if len(norms) == 0:
        stacked = torch.zeros(0, device=device)
        total = torch.zeros((), device=device)
        return (total if sharding is None else reduce_total_norm(stacked, norm_type, sharding)), stacked
    stacked = _stack_on(norms, device)
    if sharding is not None:
        return reduce_total_norm(stacked, norm_type, sharding), stacked
    return torch.linalg.vector_norm(stacked, norm_type), stacked


def _stack_on(norms: Sequence[Tensor] | Tensor, device: torch.device) -> Tensor:
    """``norms`` as one 1-D tensor on ``device``: one stack and one copy, not a ``.to()`` per
    norm (~0.3 us each in Python: 120 us of a 400-tensor step)."""
    if isinstance(norms, Tensor):  # already stacked (a flat batch)
        return norms.to(device)  # pragma: no mutate (equivalent on one device)
    try:
        return torch.stack(norms).to(device)  # type: ignore[arg-type]
    except RuntimeError:  # norms on several devices
        return torch.stack([n.to(device) for n in norms])  # pragma: no mutate (several devices only)


def scale_(batch: GradBatch, coef: Tensor) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``coef``.

    Always multiply, never ``if coef < 1``: reading ``coef`` on the host would be a
    device-to-host sync, and ``x * 1.0`` is exact, so unclipped gradients stay bit-identical.
    """
    if batch.flat is not None:
        return batch.flat.scale_(coef)
    for (device, _), (group, _) in batch.groups.items():
        c = coef.to(device, non_blocking=True)
        if batch.use_foreach(device):
            torch._foreach_mul_(group, c)
        else:
            for g in group:
                g.mul_(c)


def scale_each_(batch: GradBatch, coefs: Sequence[Tensor]) -> None:
    """Multiply ``batch.tensors[i]`` in place by ``coefs[i]`` (0-dim, or broadcast over it)."""
    for (device, _), (group, idx) in batch.groups.items():
        cs = [on_device(coefs[i], device, non_blocking=True) for i in idx]
        if batch.use_foreach(device):
            torch._foreach_mul_(group, cs)
        else:
            for g, c in zip(group, cs):
                g.mul_(c)


def clamp_(batch: GradBatch, clip_value: float | Tensor) -> None:
    """Clamp every element into ``[-clip_value, clip_value]`` (as ``clip_grad_value_``).

    ``clip_value`` may be a 0-dim tensor (``inf`` leaves the gradients as they are: the bound
    of a step that will not proceed, decided on the device). Complex tensors are clamped on
    their real and imaginary parts, which ``torch.clamp`` cannot do on a complex tensor directly.
    """
    if batch.flat is not None:
        return batch.flat.clamp_(clip_value)
    for (device, dtype), (group, _) in batch.groups.items():
        if dtype.is_complex:
            group = [torch.view_as_real(g) for g in group]
        bound = (
            clip_value.to(device, dtype.to_real(), non_blocking=True) if isinstance(clip_value, Tensor) else clip_value
        )
        if batch.use_foreach(device):
            # the foreach clamps take a Python number, or one tensor per input
            lo, hi = ([-bound] * len(group), [bound] * len(group)) if isinstance(bound, Tensor) else (-bound, bound)
            torch._foreach_clamp_min_(group, lo)
            torch._foreach_clamp_max_(group, hi)
        elif isinstance(bound, Tensor):
            for g in group:
                g.clamp_(-bound, bound)
        else:
            for g in group:
                g.clamp_(-bound, bound)
