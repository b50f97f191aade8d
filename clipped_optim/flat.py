"""Flat gradient buffers (``flat_grads=True``): every gradient is a view into one buffer.

With one contiguous buffer per ``(device, dtype)`` the clip multiply is one ``mul_`` (value
clipping one ``clamp_``) whatever the parameter count, instead of one launch per tensor; that
per-tensor dispatch (~2.4 us on CPU) is what makes ``clip_grad_norm_`` cost ~40x one read of
the gradients when a model has many small parameters.

The per-parameter norms (kept for the statistics, and the global norm is reduced from them
exactly as ``torch.nn.utils.get_total_norm`` does) come from a segmented reduction: inside a
buffer the gradients are laid out by size, so all gradients of one size form a 2-D block and
their norms are one ``vector_norm(block, dim=1)``. The norm therefore costs one kernel per
distinct gradient size (1 for 400 equal tensors, ~6 for a transformer), plus one
``_foreach_norm`` for sizes that occur once. Measured on CPU (400 x 2,500 fp32): 115 us for
the block norm against 790 us for ``_foreach_norm`` over the 400 views, and
``torch.segment_reduce`` or ``index_add_`` over squared values take 16-25 ms.

How the buffer lives with autograd: after adoption ``p.grad`` *is* a view of the buffer, and
``backward()`` accumulates into an existing ``p.grad`` in place, so the next gradients land in
the buffer with no copy. The wrapper's ``zero_grad()`` zeroes the buffer (one fill) and keeps
the views, whatever ``set_to_none`` says: a parameter that gets no gradient in a step then
has a zero gradient, as after torch's ``zero_grad(set_to_none=False)`` (an optimizer with
momentum or weight decay still moves it). Anything that replaces ``p.grad`` by another tensor
(``model.zero_grad()`` with its default ``set_to_none=True``, ``p.grad = t``, a
``backward(create_graph=True)``, a new parameter group) or gives the view other storage
(``p.grad.data = t``, ``model.double()``, which keep the same Python object) is detected at
the next step, because the gradients are compared with the views by identity *and* by their
data pointer: the current gradients are then copied into the buffer (re-adopted) before
clipping. It is never silently wrong, only slower (one copy) on such a step. Sparse gradients
are never flattened: a step that has one falls back to the per-tensor path.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .gather import Gathered
from .norms import _HALF, GradBatch

__all__ = ["FlatGrads", "FlatLayout"]


class _Block:
    """``count`` same-sized gradients, contiguous in one buffer: their norms are one kernel."""

    __slots__ = ("matrix", "positions")

    def __init__(self, matrix: Tensor, positions: list[int]) -> None:
        self.matrix = matrix  # (count, numel) view of the buffer
        self.positions = positions  # where each row sits in the batch order


class FlatLayout:
    """The buffers of one adoption: what :mod:`clipped_optim.norms` delegates to.

    ``norms.tensor_norms``, ``norms.scale_`` and ``norms.clamp_`` call the methods of
    ``batch.flat`` when a :class:`~clipped_optim.norms.GradBatch` carries one.
    """

    def __init__(self, buffers: dict[tuple[torch.device, torch.dtype], Tensor], blocks, singles, n: int) -> None:
        self.buffers = buffers
        self.blocks: list[_Block] = blocks
        self.singles: list[tuple[list[Tensor], list[int]]] = singles  # per key: views, positions
        order = [i for b in blocks for i in b.positions] + [i for _, pos in singles for i in pos]
        # index of each batch position within the concatenated results (None: already in order)
        self._gather = None if order == list(range(n)) else _inverse(order)
        self._device = next(iter(buffers))[0] if buffers else torch.device("cpu")

    def tensor_norms(self, norm_type: float, foreach: bool | None = None) -> Tensor:
        """Per-gradient norms as one 1-D float tensor, in batch order."""
        parts = []
        for b in self.blocks:
            acc = torch.float32 if b.matrix.dtype in _HALF else None
            parts.append(torch.linalg.vector_norm(b.matrix, norm_type, dim=1, dtype=acc).to(self._device))
        for views, _ in self.singles:
            acc = torch.float32 if views[0].dtype in _HALF else None
            if foreach is not False:
                norms: list[Tensor] | tuple[Tensor, ...] = torch._foreach_norm(views, norm_type, dtype=acc)
            else:
                norms = [torch.linalg.vector_norm(v, norm_type, dtype=acc) for v in views]
            parts.append(torch.stack(norms).to(self._device))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # promotes as torch.stack does
        if self._gather is not None:
            if self._gather.device != out.device:  # once: later steps reuse the device copy
                self._gather = self._gather.to(out.device)
            out = out.index_select(0, self._gather)
        return out

    def scale_(self, coef: Tensor) -> None:
        """One in-place multiply per buffer (exact when ``coef`` is 1)."""
        for (device, _), buf in self.buffers.items():
            buf.mul_(coef.to(device, non_blocking=True))

    def clamp_(self, clip_value: float | Tensor) -> None:
        for (device, dtype), buf in self.buffers.items():
            real = torch.view_as_real(buf) if dtype.is_complex else buf
            if isinstance(clip_value, Tensor):
                bound = clip_value.to(device, dtype.to_real())
                real.clamp_(-bound, bound)
            else:
                real.clamp_(-clip_value, clip_value)


@torch.compiler.disable  # dynamo cannot trace data_ptr(): a graph break, run eagerly
def _pointers(views: list[Tensor]) -> list[int]:
    """The data pointers of ``views``: a ``.data`` swap keeps the object and changes this."""
    return [v.data_ptr() for v in views]


def _inverse(order: list[int]) -> Tensor:
    inv = [0] * len(order)
    for k, i in enumerate(order):
        inv[i] = k
    return torch.tensor(inv, dtype=torch.long)


def _layout(grads: Sequence[Tensor]) -> tuple[FlatLayout, list[Tensor]]:
    """New buffers for ``grads`` (zero-filled), and one view per gradient, in input order."""
    keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        keys.setdefault((g.device, g.dtype), []).append(i)
    views: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    buffers, blocks, singles = {}, [], []
    for key, idx in keys.items():
        idx = sorted(idx, key=lambda i: grads[i].numel())  # equal sizes side by side
        buf = torch.zeros(sum(grads[i].numel() for i in idx), dtype=key[1], device=key[0])
        buffers[key] = buf
        lone_views, lone_pos, offset = [], [], 0
        for size, run_iter in itertools.groupby(idx, key=lambda i: grads[i].numel()):
            run = list(run_iter)
            for j, i in enumerate(run):
                views[i] = buf[offset + j * size : offset + (j + 1) * size].view(grads[i].shape)
            if len(run) > 1:
                blocks.append(_Block(buf[offset : offset + len(run) * size].view(len(run), size), run))
            else:
                lone_views.append(views[run[0]])
                lone_pos.append(run[0])
            offset += len(run) * size
        if lone_views:
            singles.append((lone_views, lone_pos))
    return FlatLayout(buffers, blocks, singles, len(grads)), views


class FlatGrads:
    """Keeps the adopted parameters' gradients as views into flat buffers, across steps."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.views: list[Tensor] = []
        self.batch_: GradBatch | None = None
        self.adoptions = 0  # how many times the buffers were (re)filled from foreign gradients
        self._last: Gathered | None = None  # the last gather, while it still holds
        self._flags: list[bool] = []
        self._seen: list[Tensor | None] = []
        self._ptrs: list[int] = []  # each view's data pointer when it was made

    def gather(self, gather_fn: Callable[[], Gathered], param_groups: list[dict[str, Any]], foreach: bool | None):
        """The wrapper's gather (``gather_fn``) and the step's batch, without the gather when
        every gradient is still what the last step left (the views, or ``None``).

        That check is one ``is`` per parameter; the full gather costs ~0.3 us per parameter.
        """
        if self._last is not None and self._unchanged(param_groups):
            return self._last, self.batch_
        gathered = gather_fn()
        batch = self.batch(gathered[0], gathered[4], foreach)
        self._last = None
        if batch is self.batch_ and not gathered[1]:  # flat, and no opted-out group to re-read
            self._last = gathered._replace(clipped=list(self.views))
            self._flags = [g.get("clip", True) for g in param_groups]
            self._seen = [p.grad for g in param_groups for p in g["params"]]
        return gathered if self._last is None else self._last, batch

    def _unchanged(self, param_groups: list[dict[str, Any]]) -> bool:
        if [g.get("clip", True) for g in param_groups] != self._flags:
            return False
        now = [p.grad for g in param_groups for p in g["params"]]
        return len(now) == len(self._seen) and all(map(operator.is_, now, self._seen)) and self._intact()

    def _intact(self) -> bool:
        """Whether every view still points into its buffer: ``p.grad.data = t`` (and
        ``model.double()``) keeps the Python object but swaps its storage."""
        return _pointers(self.views) == self._ptrs

    def batch(self, grads: list[Tensor], params: list[Tensor], foreach: bool | None) -> GradBatch:
        """The step's :class:`GradBatch`, flat when ``grads`` are (or can become) the views.

        ``grads`` are the gradients the wrapper gathered, in optimizer order, and ``params``
        their parameters; the cheap case (every one is still its view) costs one identity
        comparison per parameter.
        """
        if not grads:  # nothing to clip this step: nothing to flatten
            return GradBatch([], foreach)
        if (
            self.batch_ is not None
            and len(grads) == len(self.views)
            and all(map(operator.is_, grads, self.views))
            and self._intact()
        ):
            return self.batch_
        # A sparse gradient is gathered as its values, which are not ``p.grad``.
        if not all(p.grad is g for p, g in zip(params, grads)):
            return GradBatch(grads, foreach)  # sparse gradients among them: not flattened
        self._adopt(params, grads, foreach)
        assert self.batch_ is not None
        return self.batch_

    def _adopt(self, params: list[Tensor], grads: list[Tensor], foreach: bool | None) -> None:
        same = (
            len(params) == len(self.params)
            and self._intact()
            and all(
                p is q and g.shape == v.shape and g.dtype == v.dtype and g.device == v.device
                for p, q, g, v in zip(params, self.params, grads, self.views)
            )
        )
        if not same:
            layout, self.views = _layout(grads)
            self._ptrs = _pointers(self.views)
            self.params = params
            self.batch_ = GradBatch(self.views, foreach)
            self.batch_.flat = layout
        for p, g, v in zip(params, grads, self.views):
            if g is not v:
                v.copy_(g)
                p.grad = v
        self.adoptions += 1

    def zero_grad(self, param_groups: Iterable[dict[str, Any]], set_to_none: bool) -> None:
        """Zero the buffers; every other gradient is zeroed or dropped as ``set_to_none`` says."""
        if self.batch_ is not None and self.batch_.flat is not None:
            for buf in self.batch_.flat.buffers.values():
                buf.zero_()
        mine = {id(v) for v, now, ptr in zip(self.views, _pointers(self.views), self._ptrs) if now == ptr}
        for group in param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None or id(g) in mine:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()
