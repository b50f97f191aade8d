"""Clip statistics kept in ``optimizer.state["clip"]``.

They live in the optimizer's state, not in attributes, so ``state_dict()`` carries them into a
checkpoint. Every value is a tensor on the gradients' device and is updated in place with
tensor arithmetic: recording a step costs no device-to-host sync. ``float()``/``int()`` on a
value syncs, so read them when logging, not every step.

Keys:
    grad_norm: pre-clip global norm of the last step's (unscaled) gradients.
    clip_coef: factor the last step's gradients were multiplied by (<= 1).
    threshold: the bound in effect at the last step (with one bound per parameter, that of
        the parameter clipped hardest, whose coefficient is ``clip_coef``).
    The adaptive modes keep their own state beside these keys (see clipped_optim.adaptive).
    param_norms: pre-clip norm of each parameter's gradient at the last step, 1-D, in the
        optimizer's parameter order (the order of ``state_dict()["param_groups"]``); 0 where
        a parameter had no gradient. See :meth:`ClippedOptimizer.named_grad_norms`.
    steps: calls of ``step()``.
    clipped_steps: steps whose gradients were scaled down (``clip_coef < 1``, not skipped).
    skipped_steps: steps whose update was skipped (non-finite gradients, or a GradScaler
        overflow), leaving parameters and optimizer state untouched.
    nonfinite_steps: steps whose gradients held NaN/Inf, whatever the policy did with them.
    history: (only with ``history_size > 0``) a ring buffer of shape
        ``(history_size, 4 + 2 * top_k)``, one row per step with the columns of
        :func:`history_columns`: :data:`HISTORY_COLUMNS`, then the step's ``top_k`` largest
        parameter norms (``top_norm_0`` first) and those parameters' indices in optimizer order
        (``top_index_0``..., float32, exact below 2**24; -1 where nothing was recorded: fewer
        parameters than ``top_k``, sharded gradients, rows of a checkpoint written without
        them). Step ``k`` (0-based) is row ``k % history_size``. Written every step on the
        device, read by :mod:`clipped_optim.diagnostics` only when a report is asked for.
    param_names: (only once names were given, see
        :meth:`ClippedOptimizer.name_parameters`) each parameter's name in optimizer order,
        ``None`` where unknown; plain strings, so a checkpoint carries them.
    param_shapes: (in ``state_dict()`` only) each parameter's shape in optimizer order, as
        tuples of ints, so that a report read from a checkpoint alone can describe them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STATE_KEY",
    "COUNTERS",
    "HISTORY_COLUMNS",
    "history_columns",
    "top_k_of",
    "top_row",
    "relayout_history",
    "NO_INDEX",
    "new_clip_state",
    "restore_clip_state",
    "check_tensor",
    "pack_counters",
    "Recorder",
    "record",
]

STATE_KEY = "clip"
COUNTERS = ("steps", "clipped_steps", "skipped_steps", "nonfinite_steps")
HISTORY_COLUMNS = ("grad_norm", "threshold", "clip_coef", "skipped")
#: The index recorded where no parameter is (padding, or a row written without attribution).
NO_INDEX = -1.0


def history_columns(top_k: int) -> tuple[str, ...]:
    """The names of a history row's columns with ``top_k`` attributed parameters."""
    return (
        HISTORY_COLUMNS + tuple(f"top_norm_{i}" for i in range(top_k)) + tuple(f"top_index_{i}" for i in range(top_k))
    )


def top_k_of(history: Tensor) -> int:
    """How many top contributors the rows of ``history`` hold (from its width)."""
    return (history.shape[1] - len(HISTORY_COLUMNS)) // 2


def _empty_history(history_size: int, top_k: int, device: torch.device) -> Tensor:
    history = torch.zeros(history_size, len(history_columns(top_k)), dtype=torch.float32, device=device)
    history[:, len(HISTORY_COLUMNS) + top_k :] = NO_INDEX
    return history


def new_clip_state(mode: str, device: torch.device, history_size: int = 0, top_k: int = 0) -> dict[str, Any]:
    def zero(dtype: torch.dtype) -> Tensor:
        return torch.zeros((), dtype=dtype, device=device)

    state: dict[str, Any] = {"mode": mode}
    state.update(grad_norm=zero(torch.float32), clip_coef=zero(torch.float32) + 1, threshold=zero(torch.float32))
    state["param_norms"] = torch.zeros(0, dtype=torch.float32, device=device)
    state.update(zip(COUNTERS, torch.zeros(len(COUNTERS), dtype=torch.int64, device=device).unbind()))
    if history_size > 0:
        state["history"] = _empty_history(history_size, top_k, device)
        state["history_start"] = zero(torch.int64)  # the first step the buffer recorded
    return state


def check_tensor(key: str, value: Any, ndim: int, kind: str, shape: tuple[int | None, ...] | None = None) -> None:
    """Refuse a checkpoint's ``key`` unless it is a tensor of ``ndim`` dimensions, of a
    ``kind`` ("float" or "int") dtype, and of ``shape`` (``None`` entries: any size)."""
    ok = isinstance(value, Tensor) and value.ndim == ndim
    if ok:
        ok = value.is_floating_point() if kind == "float" else value.dtype in _INTEGERS
    if ok and shape is not None:
        ok = all(want is None or want == got for want, got in zip(shape, value.shape))
    if not ok:
        got = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        want = f"a {ndim}-dim {kind} tensor" + (
            "" if shape is None else f" of shape {tuple('*' if d is None else d for d in shape)}"
        )
        raise ValueError(
            f"ClippedOptimizer: the checkpoint's clip state has an invalid {key!r}: expected {want}, got {got}"
        )


_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: the statistics' own keys: (ndim, kind, shape)
_KEYS: dict[str, tuple[int, str, tuple[int | None, ...] | None]] = {
    "grad_norm": (0, "float", None),
    "clip_coef": (0, "float", None),
    "threshold": (0, "float", None),
    "param_norms": (1, "float", None),
    **dict.fromkeys(COUNTERS, (0, "int", None)),
    "history": (2, "float", None),  # its width is checked by _check_history_width
    "history_start": (0, "int", None),
}


def restore_clip_state(
    loaded: dict[str, Any] | None, mode: str, device: torch.device, history_size: int = 0, top_k: int = 0
) -> dict[str, Any]:
    """A clip state from a checkpoint, as the step expects it, or a clear error.

    Every key the statistics use is checked before anything is built, and the tensors are
    copied (``load_state_dict`` copies string-keyed state shallowly: without the copy, the
    in-place counter updates of later steps would edit the caller's checkpoint). The keys of a
    clip policy's state are checked by :func:`clipped_optim.policy.check_policy_state`.

    A history written with another number of top contributors (older checkpoints have none)
    keeps its rows: the columns this optimizer records are filled from it, and the others
    marked unknown (index -1).
    """
    state = new_clip_state(mode, device, history_size, top_k)
    if loaded is None:
        return state
    if not isinstance(loaded, dict):
        raise ValueError(f"ClippedOptimizer: the checkpoint's clip state must be a dict, got {type(loaded).__name__}")
    if loaded.get("mode", mode) != mode:
        raise ValueError(
            f"ClippedOptimizer: the checkpoint's clip state was written with mode={loaded['mode']!r}, "
            f"but this optimizer uses mode={mode!r}; construct it with the checkpoint's mode"
        )
    for key, (ndim, kind, shape) in _KEYS.items():
        if key in loaded:
            check_tensor(key, loaded[key], ndim, kind, shape)
    if "history" in loaded:
        _check_history_width(loaded["history"])
    _check_names(loaded.get("param_names"))
    for key, value in loaded.items():
        if key != "param_shapes":  # a snapshot of the saving optimizer's, redone at each state_dict()
            state[key] = value.detach().to(device, copy=True) if isinstance(value, Tensor) else copy.deepcopy(value)
    if history_size > 0 and "history" in loaded:
        state["history"] = relayout_history(state["history"], top_k)
    if history_size == 0:
        state.pop("history", None)
        state.pop("history_start", None)
    elif "history" not in loaded or state["history"].shape[0] != history_size:
        # new or resized: keep nothing rather than misplace rows, and say where it starts
        state["history"] = new_clip_state(mode, device, history_size, top_k)["history"]
        state["history_start"] = state["steps"].clone()
    pack_counters(state)
    return state


def _check_history_width(history: Tensor) -> None:
    extra = history.shape[1] - len(HISTORY_COLUMNS)
    if extra < 0 or extra % 2:
        raise ValueError(
            "ClippedOptimizer: the checkpoint's clip state has an invalid 'history': expected a 2-dim "
            f"float tensor of shape ('*', {len(HISTORY_COLUMNS)} + 2 * top_k), got a {history.dtype} tensor "
            f"of shape {tuple(history.shape)}"
        )


def _check_names(names: Any) -> None:
    if names is not None and not (
        isinstance(names, (list, tuple)) and all(n is None or isinstance(n, str) for n in names)
    ):
        raise ValueError(
            "ClippedOptimizer: the checkpoint's clip state has an invalid 'param_names': expected a list "
            f"of str (or None), got {type(names).__name__}"
        )


def relayout_history(history: Tensor, top_k: int) -> Tensor:
    """``history`` with ``top_k`` top contributors a row: the rows kept, the first ``top_k``
    recorded contributors copied, the missing ones marked unknown (index -1, norm 0)."""
    have = top_k_of(history)
    if have == top_k:
        return history
    out = _empty_history(history.shape[0], top_k, history.device)
    base, keep = len(HISTORY_COLUMNS), min(have, top_k)
    out[:, :base] = history[:, :base]
    out[:, base : base + keep] = history[:, base : base + keep]
    out[:, base + top_k : base + top_k + keep] = history[:, base + have : base + have + keep]
    return out


def pack_counters(state: dict[str, Any]) -> Tensor:
    """The four counters as one int64 tensor whose elements ``state[k]`` are views of, so that
    one ``add_`` advances them all. A state whose counters are not such views (a checkpoint's
    copies, a user's assignment) is packed: the values are copied, the keys keep them."""
    first = state[COUNTERS[0]]
    base = first._base
    if (
        base is not None
        and base.shape == (len(COUNTERS),)
        and base.dtype == torch.int64
        and all(state[k]._base is base and state[k].storage_offset() == i for i, k in enumerate(COUNTERS))
    ):
        return base
    packed = torch.stack([state[k].to(first.device, torch.int64) for k in COUNTERS])
    state.update(zip(COUNTERS, packed.unbind()))
    return packed


class Recorder:
    """Folds each step's :class:`~clipped_optim.modes.ClipResult` into one clip state, sync-free.

    Six small ops a step, whatever the mode (the counters are advanced by one ``add_``, the
    history row is stacked into a buffer kept here and written by one ``index_copy_``), and
    two more with attribution (a ``topk`` of the parameter norms written into the same row,
    and a copy of its indices): these ops run on every step, so on a small model they are
    most of what the wrapper adds to a step. On a CPU step decided on the host (``held``
    given) two are left: the counters advance by one ``add_`` of a kept increment, and the
    row is stacked straight into its row of the history, whose index is read from memory. A
    state dict it has not seen (fresh, loaded, replaced) is re-packed on first use.
    """

    __slots__ = (
        "_state",
        "_views",
        "_counters",
        "_steps",
        "_true",
        "_row",
        "_columns",
        "_index",
        "_top",
        "_top_k",
        "_increments",
    )

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._views: tuple[Tensor, ...] = ()
        self._counters: Tensor | None = None
        self._top: tuple[Tensor, Tensor, Tensor] | None = None
        self._top_k = -1  # how many contributors the row's views hold (-1: none made yet)

    def _bind(self, state: dict[str, Any]) -> Tensor | None:
        if self._state is state and all(state[k] is v for k, v in zip(COUNTERS, self._views)):
            return self._counters
        if torch.compiler.is_compiling():  # the packing check reads storage offsets: not traceable
            return None
        counters = pack_counters(state)
        device = counters.device
        self._state, self._views, self._counters = state, tuple(state[k] for k in COUNTERS), counters
        self._steps = counters[:1]  # the step number as a 1-element index: no host read
        self._true = torch.ones((), dtype=torch.bool, device=device)
        history = state.get("history")
        self._new_row(0 if history is None else top_k_of(history), device)
        self._index = torch.zeros(1, dtype=torch.int64, device=device)
        self._increments: dict[tuple[bool, bool], Tensor] = {}
        return counters

    def _new_row(self, top_k: int, device: torch.device) -> None:
        """The row buffer each step is stacked into, for a history of ``top_k`` contributors."""
        self._row = _empty_history(1, top_k, device)
        self._columns = self._row[0, : len(HISTORY_COLUMNS)]
        self._top, self._top_k = None, -1

    def __call__(
        self,
        state: dict[str, Any],
        result: Any,
        finite: Tensor,
        skipped: Tensor,
        nonfinite: Tensor | None = None,
        proceeded: Tensor | None = None,
        skip: Tensor | None = None,
        attribute: bool = True,
        held: bool | None = None,
    ) -> None:
        """Record one step. ``finite``/``skipped`` are 0-dim bools; ``nonfinite`` (``~finite``),
        ``proceeded`` (``finite & ~skipped``) and ``skip`` (``skipped`` as a float) may be
        passed when the caller has them. ``attribute=False`` records no top contributors
        (their columns say "unknown"): for norms that are not those of whole parameters.
        ``held``: ``skipped`` read on the host, for a step whose only reason to be skipped was
        non-finite gradients (a CPU step's common case; then ``nonfinite`` is ``skipped``)."""
        counters = self._bind(state)
        on_host = held is not None and counters is not None
        if "history" in state:
            self._write_history(state, counters, result, skipped, skip, attribute, on_host)
        state["grad_norm"] = result.total_norm
        state["clip_coef"] = result.clip_coef
        state["threshold"] = result.threshold
        state["param_norms"] = result.param_norms
        if on_host:  # the values are in host memory: one add of a kept increment, no compare
            assert held is not None and counters is not None
            counters.add_(self._increment(not held and result.clip_coef.item() < 1.0, held))
            return
        nonfinite = ~finite if nonfinite is None else nonfinite
        proceeded = finite & ~skipped if proceeded is None else proceeded
        # "clipped" is coef < 1 on a step that proceeded: a bool compares as 0/1, and a
        # coefficient is >= 0 (or NaN), so coef < proceeded is exactly that, in one op.
        clipped = torch.lt(result.clip_coef, proceeded)
        if counters is None:  # compiled: the compiler fuses the per-counter adds anyway
            state["steps"].add_(1)
            for key, increment in zip(COUNTERS[1:], (clipped, skipped, nonfinite)):
                state[key].add_(increment)
        else:
            counters.add_(torch.stack([self._true, clipped, skipped, nonfinite]))

    def _increment(self, clipped: bool, held: bool) -> Tensor:
        """The counters' increment ``[1, clipped, skipped, nonfinite]`` of a step decided on
        the host, made once per value (read-only)."""
        key = (clipped, held)
        if key not in self._increments:
            assert self._counters is not None
            self._increments[key] = torch.tensor([1, clipped, held, held], dtype=torch.int64).to(self._counters.device)
        return self._increments[key]

    def _write_history(
        self,
        state: dict[str, Any],
        counters: Tensor | None,
        result: Any,
        skipped: Tensor,
        skip: Tensor | None,
        attribute: bool,
        on_host: bool = False,
    ) -> None:
        """Write this step's row (:func:`history_columns`) at row ``steps % history_size``."""
        history = state["history"]
        # one dtype stacks in one copy; a bool column would take the slow mixed path
        skip = skipped.to(history.dtype) if skip is None else skip
        columns = (result.total_norm, result.threshold, result.clip_coef, skip)
        top_k = top_k_of(history)
        # without attribution (top_k=0, or norms of pieces) no view of the norms is made: a dispatch a step
        norms = result.param_norms if attribute or not top_k else result.param_norms[:0]
        if counters is None:  # compiled: no kept buffers
            row = torch.cat([torch.stack([c.to(history.dtype) for c in columns]), top_row(norms, top_k)])
            history.index_copy_(0, (state["steps"] % history.shape[0]).view(1), row.view(1, -1))
            return
        if self._row.shape[1] != history.shape[1]:  # a history swapped for one of another width
            self._new_row(top_k, history.device)
        if on_host and not top_k:  # the row's index read on the host: stacked straight into it
            torch.stack(columns, out=history[self._steps.item() % history.shape[0]])
            return
        torch.stack(columns, out=self._columns)
        if top_k:
            self._write_top(norms, top_k)
        torch.remainder(self._steps, history.shape[0], out=self._index)
        history.index_copy_(0, self._index, self._row)

    def _write_top(self, norms: Tensor, top_k: int) -> None:
        """The ``top_k`` largest of ``norms`` and their indices into the row: a NaN sorts
        above every number and inf above the finite ones, so a non-finite step names the
        parameters that held NaN/Inf first. Views made when the count changes (a shape, never
        a value: no host sync), so a step adds two ops."""
        k = min(top_k, norms.shape[0])
        if k != self._top_k:
            base = len(HISTORY_COLUMNS)
            self._row[0, base:].copy_(_empty_history(1, top_k, self._row.device)[0, base:])
            values = self._row[0, base : base + k]
            indices = self._row[0, base + top_k : base + top_k + k]
            self._top = (values, torch.zeros(k, dtype=torch.int64, device=self._row.device), indices)
            self._top_k = k
        if k == 0:
            return
        assert self._top is not None
        values, scratch, indices = self._top
        torch.topk(norms.to(values.dtype), k, out=(values, scratch))
        indices.copy_(scratch)


def top_row(norms: Tensor, top_k: int) -> Tensor:
    """The ``top_k`` attribution columns of a row for the 1-D ``norms`` (a new tensor: the
    compiled path's and the reference's form of what :class:`Recorder` writes in place)."""
    k = min(top_k, norms.shape[0])
    values, indices = torch.topk(norms.to(torch.float32), k)
    pad = top_k - k
    return torch.cat(
        [
            values,
            values.new_zeros(pad),
            indices.to(torch.float32),
            values.new_full((pad,), NO_INDEX),
        ]
    )


def record(state: dict[str, Any], result: Any, finite: Tensor, skipped: Tensor) -> None:
    """Fold one step's :class:`~clipped_optim.modes.ClipResult` into the statistics, sync-free
    (a :class:`Recorder` of its own; the wrapper keeps one across steps)."""
    Recorder()(state, result, finite, skipped)
