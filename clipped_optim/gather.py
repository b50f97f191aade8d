"""The gradients a step clips, gathered from the optimizer's param groups.

A loop that sets the gradients to ``None`` (``zero_grad()``'s default) hands every step new
gradient tensors in the same layout: the same parameters, each with a dense gradient or none,
in groups that are clipped or not. The layout (which positions are clipped, which opted out,
which parameters own them) is worked out once and reused while a per-step check passes: the
same parameter objects, the same groups' ``"clip"`` flags, and the same parameters with a
dense gradient. The ``(device, dtype)`` grouping is not part of the layout: it is redone every
step (:class:`~clipped_optim.norms.GradBatch`), so a gradient whose dtype or device changed
under the same object (``p.grad.data = ...``) is grouped right.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["Gathered", "Gatherer", "gather_grads"]


class Gathered(NamedTuple):
    """One step's gradients, split by whether their group is clipped.

    Attributes:
        clipped: the gradients to clip (a sparse one as its coalesced values).
        unclipped: those of ``{"clip": False}`` groups (measured for NaN/Inf only).
        positions: the index of each clipped gradient's parameter in optimizer order.
        n_params: the number of parameters in optimizer order.
        params: the parameter of each clipped gradient.
    """

    clipped: list[Tensor]
    unclipped: list[Tensor]
    positions: list[int]
    n_params: int
    params: list[Tensor]


def gather_grads(param_groups: Sequence[dict[str, Any]]) -> Gathered:
    """The gradients of ``param_groups``, by one pass over every parameter. Empty gradients
    are left out; a sparse gradient is coalesced (``p.grad`` is replaced by its coalesced
    form) and its values are clipped."""
    clipped: list[Tensor] = []
    unclipped: list[Tensor] = []
    positions: list[int] = []
    params: list[Tensor] = []
    n = 0
    for group in param_groups:
        target = clipped if group.get("clip", True) else unclipped
        for p in group["params"]:
            g = p.grad
            if g is not None and g.numel() > 0:
                if g.is_sparse:  # norms and in-place scaling act on the coalesced values
                    p.grad = g = g.coalesce()
                    g = g._values()
                target.append(g)
                if target is clipped:
                    positions.append(n)
                    params.append(p)
            n += 1
    return Gathered(clipped, unclipped, positions, n, params)


class Gatherer:
    """:func:`gather_grads` with the layout of the last step reused while it still holds.

    The check costs two attribute reads and two identity comparisons per parameter; the full
    gather about twice that, and more with opted-out groups. A layout with a sparse gradient is
    not reused (it is coalesced afresh every step).
    """

    __slots__ = ("_params", "_flags", "_pattern", "_clipped", "_unclipped", "_last")

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._flags: list[bool] | None = None
        self._pattern: list[bool | None] = []
        self._clipped: list[int] = []
        self._unclipped: list[int] = []
        self._last: Gathered | None = None

    def __call__(self, param_groups: Sequence[dict[str, Any]]) -> Gathered:
        flags = [g.get("clip", True) for g in param_groups]
        params = [p for g in param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        # None where there is no gradient, False where it is dense, True where sparse
        pattern = [None if g is None else g.is_sparse for g in grads]
        last = self._last
        if (
            last is not None
            and flags == self._flags
            and pattern == self._pattern
            and len(params) == len(self._params)
            and all(map(operator.is_, params, self._params))
        ):
            clipped = [grads[i] for i in self._clipped]
            return Gathered(clipped, [grads[i] for i in self._unclipped], last.positions, last.n_params, last.params)
        gathered = gather_grads(param_groups)
        self._last = None
        if not any(pattern):  # no sparse gradient: the layout holds while the check passes
            self._adopt(gathered, flags, params, grads, pattern)
        return gathered

    def _adopt(
        self,
        gathered: Gathered,
        flags: list[bool],
        params: list[Tensor],
        grads: list[Tensor | None],
        pattern: list[bool | None],
    ) -> None:
        """Remember where each gathered gradient sits in optimizer order (empty ones are not
        gathered, so the positions are read from identities, not recomputed from the pattern)."""
        where = {id(g): i for i, g in enumerate(grads) if g is not None}
        self._clipped = [where[id(g)] for g in gathered.clipped]
        self._unclipped = [where[id(g)] for g in gathered.unclipped]
        self._params, self._flags, self._pattern, self._last = params, flags, pattern, gathered
