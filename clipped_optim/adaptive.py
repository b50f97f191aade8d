"""The built-in adaptive policies (AGC, AutoClip, ZClip) and spike skipping (SpikeSkip).

Each is a :class:`~clipped_optim.policy.ClipPolicy`, written against exactly the interface a
user's own policy has: typed hyper-parameters validated at construction, an ``init_state`` and
a ``rule`` from this step's norms and the state to the coefficient and the next state. The
optimizer measures, gates, commits and checkpoints (see :mod:`clipped_optim.policy`): a step
that does not proceed (its norm is NaN/Inf, a GradScaler overflow, a NaN in an opted-out
group, a spike) never enters a history or an EMA, so one bad batch cannot poison the threshold
of every later step, as it does in the reference packages. No rule reads a tensor value on the
host: every decision is a ``torch.where``/``clamp`` on the device.

State keys (tensors on the gradients' device, in ``optimizer.state["clip"]``):
    autoclip_ring, autoclip_sorted, autoclip_count: the norm history of AutoClip, as a
        ring buffer in arrival order and the same values kept sorted (``+inf`` = empty
        slot), with the number of norms accepted so far; one row per parameter when
        ``per_param=True``, and then ``autoclip_thresholds``, each parameter's last bound;
        ``autoclip_per_param`` (a bool) says which.
    zclip_warmup, zclip_seen, zclip_mean, zclip_var: ZClip's warm-up norms (float64), the
        number of norms accepted, and the EMA of the mean and variance (float64).
    spike_ring, spike_count: the rolling window of the spike detector.

References:
    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021 (AGC).
    Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks", MLSP 2020.
    Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025.
    OLMo-core's ``SkipStepOptimizer`` (spike skipping).
"""

from __future__ import annotations

import bisect
import ctypes
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from . import _checks as check
from ._tensors import arange, flag, host_memory, on_device, scalar_like
from .modes import EPS, HOST_DTYPES, global_norm_coef, global_norm_coef_host, rounded_as
from .norms import GradBatch, _stack_on, tensor_norms
from .policy import ClipDecision, ClipPolicy, StepNorms, check_like

__all__ = [
    "AGC",
    "AutoClip",
    "ZClip",
    "SpikeSkip",
    "POLICIES",
    "agc_coefs",
    "quantile_sorted",
    "sorted_ring_push",
    "ZClipState",
    "zclip_update",
    "spike_test",
]

#: ZClip's ``eps`` (added to the standard deviation of the z-score), as the package's default.
ZCLIP_EPS = 1e-6
ZCLIP_OPTIONS = ("adaptive_scaling", "mean", "percentile")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen: normalise once, in __post_init__


# ---------------------------------------------------------------------------------------
# AGC
# ---------------------------------------------------------------------------------------
class _Units(NamedTuple):
    """Where the units of a list of tensors are: the <= 1-D tensors (one unit each) first,
    then the rows of the >= 2-D ones, in one flat vector of unit norms."""

    small: list[int]  # positions of <= 1-D tensors
    big: list[int]  # positions of >= 2-D tensors
    rows: list[int]  # rows of each big tensor


def _units(tensors: list[Tensor]) -> _Units:
    small = [i for i, t in enumerate(tensors) if t.ndim <= 1]
    big = [i for i, t in enumerate(tensors) if t.ndim > 1]
    return _Units(small, big, [tensors[i].shape[0] for i in big])


def _unit_norms(tensors: Sequence[Tensor], units: _Units, norm_type: float, device) -> Tensor:
    """Norm of each unit, flat (float32 or wider): the whole of each <= 1-D tensor (one foreach
    launch), then the rows (output units) of each >= 2-D one, whose reduction over all but the
    first dimension foreach kernels cannot do. (Concatenating the rows of small tensors of one
    width into one kernel was measured: 7% less on nanoGPT-2L's norms, 5% more on a d256
    transformer's, so it is not done.)"""
    parts: list[Tensor] = []
    if units.small:
        parts.append(_stack_on(tensor_norms(GradBatch([tensors[i] for i in units.small]), norm_type), device))
    for i in units.big:
        t = tensors[i]
        acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
        dims = 1 if t.ndim == 2 else tuple(range(1, t.ndim))  # the same reduction; an int is cheaper to parse
        parts.append(on_device(torch.linalg.vector_norm(t, norm_type, dim=dims, dtype=acc), device))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def agc_coefs(param_units: Tensor, grad_units: Tensor, clip_factor: float, eps: float) -> Tensor:
    """Per-unit AGC coefficients: ``1`` where ``|g| < clip_factor * max(|w|, eps)``, else the
    ratio that brings ``|g|`` to that bound (as ``timm.utils.agc.adaptive_clip_grad``)."""
    max_norm = param_units.clamp(min=eps).mul_(clip_factor)
    ratio = max_norm / grad_units.clamp(min=1e-6)
    return torch.where(grad_units < max_norm, torch.ones_like(ratio), ratio)


@dataclass(frozen=True)
class AGC(ClipPolicy):
    """Adaptive gradient clipping: each output unit's gradient to a ratio of its weight's norm.

    ``grad * min(1, clip_factor * max(|w|, eps) / |grad|)`` per unit (a row of a >= 2-D weight,
    the whole of a <= 1-D one). Equal to ``timm.utils.agc.adaptive_clip_grad(params,
    clip_factor, eps, norm_type)``. Not one scalar coefficient: never folded into a fused kernel.
    Stateless. Not supported on sharded gradients (a unit's norms would need their own reduction).

    Attributes:
        clip_factor: the bound as a fraction of the weight's norm (default 0.01).
        eps: floor on the weight norm, so zero-initialised units can move (default 0.001).
    """

    clip_factor: float = 0.01
    eps: float = 1e-3
    name: ClassVar[str] = "agc"

    def __post_init__(self) -> None:
        _set(self, "clip_factor", check.positive_finite("AGC", "clip_factor", self.clip_factor))
        _set(self, "eps", check.positive_finite("AGC", "eps", self.eps))

    def is_scalar(self) -> bool:
        return False

    def rule(self, norms: StepNorms, state: Mapping[str, Any]) -> ClipDecision:
        dev = norms.device
        grads, params = list(norms.grads), _agc_params(norms)
        units = _units(grads)
        g_units = _unit_norms(grads, units, norms.norm_type, dev)
        if norms.grad_scale is not None:
            g_units = g_units / norms.grad_scale.to(dev)
        coefs = agc_coefs(_unit_norms(params, units, norms.norm_type, dev), g_units, self.clip_factor, self.eps)
        smallest = coefs.min() if coefs.numel() else torch.ones((), device=dev)
        threshold = torch.full((), self.clip_factor, device=dev)
        return ClipDecision(coef=_unit_factors(coefs, grads, units), threshold=threshold, clip_coef=smallest)


def _unit_factors(factors: Tensor, grads: list[Tensor], units: _Units) -> list[Tensor]:
    """Each gradient's multiplier, shaped to broadcast over it: 0-dim, or one per row."""
    out: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    n_small = len(units.small)
    for i, f in zip(units.small, factors[:n_small].unbind()):
        out[i] = f
    for i, f in zip(units.big, factors[n_small:].unsqueeze(1).split(units.rows)):
        ndim = grads[i].ndim
        out[i] = f if ndim == 2 else f.reshape((-1,) + (1,) * (ndim - 1))
    return out


def _agc_params(norms: StepNorms) -> list[Tensor]:
    if norms.sharded:
        raise NotImplementedError(
            "ClippedOptimizer: mode=AGC() on sharded gradients (FSDP, DTensor, process_group=) is not "
            "supported: a unit's weight and gradient norms would need their own reduction. DDP works."
        )
    params = list(norms.params)
    if len(params) != len(norms.grads):
        raise ValueError("mode=AGC() needs the parameters beside the gradients")
    for p, g in zip(params, norms.grads):
        if p.shape != g.shape:  # a sparse gradient's values: no rows to measure
            raise ValueError(
                f"mode=AGC() needs dense gradients; got a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}"
            )
    return params


# ---------------------------------------------------------------------------------------
# AutoClip: a quantile of the norm history, kept sorted so a step needs no sort
# ---------------------------------------------------------------------------------------
def sorted_ring_push(ring: Tensor, sorted_: Tensor, count: Tensor, value: Tensor, accept: Tensor | None = None):
    """Push ``value`` (one per row) into each row's ring buffer, evicting the oldest, and keep
    ``sorted_`` the same values in ascending order. Rows where ``accept`` is False are left alone
    (``None``: every row takes its value).

    A row of ``ring``/``sorted_`` holds ``L`` slots, ``+inf`` where still empty. The evicted
    value leaves the sorted row at ``d`` and the new one enters at ``i``: every other slot
    takes its own value or a neighbour's, so the update is a few ``where``s over the row, O(L),
    instead of the O(L log L) sort a quantile of the raw history costs every step.
    Shapes: ``ring``, ``sorted_``: ``(R, L)``; ``count``, ``value``, ``accept``: ``(R,)``.
    """
    length = ring.shape[1]
    pos = (count % length).unsqueeze(1)
    evicted = ring.gather(1, pos)
    # a norm beyond the history's range (a float64 norm over float32's largest) enters it as
    # that largest value: an inf in the history would make its quantiles NaN (lerp(inf, inf))
    new = value.unsqueeze(1).to(ring.dtype).clamp(max=torch.finfo(ring.dtype).max)
    if accept is not None:
        new = torch.where(accept.unsqueeze(1), new, evicted)
    d = torch.searchsorted(sorted_, evicted)  # where the evicted value sits
    i = torch.searchsorted(sorted_, new) - (evicted < new).long()  # where the new one goes once it is gone
    j = arange(length, ring.device)
    pad = sorted_.new_full((sorted_.shape[0], 1), math.inf)
    next_ = torch.cat([sorted_[:, 1:], pad], 1)
    prev = torch.cat([pad, sorted_[:, :-1]], 1)
    below = torch.where(j < d, sorted_, next_)  # slot j of the row without the evicted value
    above = torch.where(j <= d, prev, sorted_)  # slot j - 1 of it
    new_sorted = torch.where(j < i, below, torch.where(j == i, new, above))
    return ring.scatter(1, pos, new), new_sorted, count + (1 if accept is None else accept.long())


def quantile_sorted(sorted_: Tensor, count: Tensor, q: float) -> Tensor:
    """Per row, ``torch.quantile(history, q)`` (linear interpolation) of the ``min(count, L)``
    values at the front of each ascending row; ``+inf`` for an empty row (clip nothing).

    The ranks are computed in the history's dtype as ``torch.quantile`` computes them, so the
    result is bit-identical to it.
    """
    length = sorted_.shape[1]
    n = count.clamp(max=length)
    ranks = scalar_like(q, sorted_) * (n - 1).clamp(min=0)
    below = ranks.long()
    above = ranks.ceil().long()
    # An empty row reads +inf slots: lerp(inf, inf) is NaN, which inductor refuses to fold
    # ("sympy expression is NaN") when the history is new inside a compiled step, so empty rows
    # interpolate zeros and are replaced by +inf afterwards. Rows with values read only values.
    some = n > 0
    lo = torch.where(some, sorted_.gather(1, below.unsqueeze(1)).squeeze(1), 0)
    hi = torch.where(some, sorted_.gather(1, above.unsqueeze(1)).squeeze(1), 0)
    value = torch.lerp(lo, hi, ranks - below)
    return torch.where(some, value, torch.full_like(value, math.inf))


def quantile_sorted_host(row: Tensor, count: int, q: float) -> Tensor:
    """:func:`quantile_sorted` of one ascending row in host memory (:attr:`StepNorms.host`;
    shape ``(L,)`` or ``(1, L)``), 0-dim: the rank is computed on the host, rounded to the row's
    dtype as on the device (an exact product, rounded once), the two values it falls between
    are read from memory (:func:`~clipped_optim._tensors.host_memory`) and interpolated by the
    same ``lerp`` kernel. A new tensor: never a view of the history."""
    row = row.contiguous()  # kept alive while its memory is read
    values, dtype = host_memory(row), row.dtype
    n = min(count, len(values))
    if n == 0:
        return torch.full((), math.inf, dtype=dtype, device="cpu")
    rank = _rounded(_rounded(q, dtype) * (n - 1), dtype)
    below = int(rank)
    lo = torch.full((), values[below], dtype=dtype, device="cpu")
    if rank == below:
        return lo
    # a float weight is lerp's other overload: the same kernel, checked to give the same bits
    return torch.lerp(lo, torch.full((), values[below + 1], dtype=dtype, device="cpu"), rank - below)


def sorted_ring_push_host(ring: Tensor, sorted_: Tensor, count: int, value: float) -> tuple[Tensor, Tensor]:
    """:func:`sorted_ring_push` of one row in host memory (:attr:`StepNorms.host`), for a
    finite ``value``: new copies of ``ring`` and ``sorted_`` (``(1, L)``; the originals stay as
    they were, for a step whose state is not kept), changed in their memory
    (:func:`~clipped_optim._tensors.host_memory`): ``bisect`` finds the evicted slot and the new
    one as ``searchsorted`` does, and the values between them move by one ``memmove``."""
    ring = ring.clone(memory_format=torch.contiguous_format)
    sorted_ = sorted_.clone(memory_format=torch.contiguous_format)
    slots, values = host_memory(ring), host_memory(sorted_)
    pos = count % len(slots)
    new = _rounded(value, ring.dtype)
    d = bisect.bisect_left(values, slots[pos])  # where the evicted value sits
    at = bisect.bisect_left(values, new)
    # where the new one goes once the evicted is gone: one slot lower when the evicted value was
    # below it, which is exactly when the new one's slot is past the evicted one's
    i = at - (at > d)
    if d != i:  # the values between shift by one, towards the evicted slot (memmove: they overlap)
        lo, size, base = min(d, i), sorted_.element_size(), sorted_.data_ptr()
        ctypes.memmove(base + (lo + (d > i)) * size, base + (lo + (d < i)) * size, abs(d - i) * size)
    values[i] = slots[pos] = new
    return ring, sorted_


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` (>= 0) rounded to ``dtype`` (float32 or float64) as a tensor of that dtype
    holds it, and at most its largest finite value (see :func:`sorted_ring_push`)."""
    return min(rounded_as(value, dtype), _LARGEST[dtype])


_LARGEST = {dtype: torch.finfo(dtype).max for dtype in HOST_DTYPES}


def _coef_host(total: Tensor, norm: float, threshold: Tensor) -> Tensor:
    """:func:`_coef` of ``total`` (whose value is ``norm``) computed on the host
    (:attr:`StepNorms.host`) by :func:`~clipped_optim.modes.global_norm_coef_host`, with the
    threshold's dtype taking part in the product as the tensor op promotes it, then made a
    tensor once."""
    dtype = torch.promote_types(total.dtype, threshold.dtype)
    c = global_norm_coef_host(norm, float(threshold), total.dtype, dtype)
    return torch.full((), c, dtype=dtype, device=total.device)


def _coef(norm: Tensor, threshold: Tensor) -> Tensor:
    """``min(1, threshold / (norm + EPS))`` computed as ``clip_grad_norm_`` computes it for
    the package: it converts the threshold to a float, and ``float / tensor`` is
    ``tensor.reciprocal() * float`` in torch, which can differ from a division in the last bit."""
    return torch.clamp((norm + EPS).reciprocal() * threshold, max=1.0)


@dataclass(frozen=True)
class AutoClip(ClipPolicy):
    """AutoClip: clip to the ``quantile`` of the last ``history_length`` pre-clip norms.

    Global (one history of global norms; ``torch.nn.utils.clip_grad_norm_`` to it) or, with
    ``per_param=True``, one history per parameter and each gradient clipped to its own (a
    parameter's history grows only on the steps it has a gradient). Equal to ``autoclip``'s
    ``QuantileClip.as_optimizer(opt, quantile, history_length, global_threshold=not per_param)``,
    whose first step clips nothing. The histories are kept sorted, so a step needs no sort.

    Attributes:
        quantile: the bound is this quantile of the past norms, in [0, 1] (default 0.9).
        history_length: how many past norms are kept (default 1000).
        per_param: one history and one bound per parameter tensor (default False; then not
            scalar, and not supported on sharded gradients or with ``flat_grads=True``).
    """

    quantile: float = 0.9
    history_length: int = 1000
    per_param: bool = False
    name: ClassVar[str] = "autoclip"

    def __post_init__(self) -> None:
        _set(self, "quantile", check.unit_interval("AutoClip", "quantile", self.quantile, True, True))
        _set(self, "history_length", check.positive_int("AutoClip", "history_length", self.history_length))
        check.flag("AutoClip", "per_param", self.per_param)

    def is_scalar(self) -> bool:
        return not self.per_param

    def init_state(self, n_params: int, device: torch.device) -> dict[str, Any]:
        rows = n_params if self.per_param else 1
        ring = torch.full((rows, self.history_length), math.inf, device=device)
        state: dict[str, Any] = dict(
            autoclip_ring=ring,
            autoclip_sorted=ring.clone(),
            autoclip_count=torch.zeros(rows, dtype=torch.int64, device=device),
            autoclip_per_param=self.per_param,
        )
        if self.per_param:
            state["autoclip_thresholds"] = torch.full((rows,), math.inf, device=device)
        return state

    def resize_state(self, state: dict[str, Any], n_params: int) -> dict[str, Any]:
        grow = n_params - state["autoclip_ring"].shape[0] if self.per_param else 0
        if grow <= 0:
            return state
        # a param group was added: its parameters start with empty histories
        more = self.init_state(grow, state["autoclip_ring"].device)
        return {k: torch.cat([v, more[k]]) if isinstance(v, Tensor) else v for k, v in state.items()}

    def rule(self, norms: StepNorms, state: Mapping[str, Any]) -> ClipDecision:
        ring, sorted_, count = state["autoclip_ring"], state["autoclip_sorted"], state["autoclip_count"]
        if not self.per_param and norms.host and ring.dtype in HOST_DTYPES and ring.is_cpu:
            return self._rule_on_host(norms.total_norm, ring, sorted_, count)
        if not self.per_param:
            threshold = quantile_sorted(sorted_, count, self.quantile)[0]
            ring, sorted_, count = sorted_ring_push(ring, sorted_, count, norms.total_norm.reshape(1))
            new = dict(autoclip_ring=ring, autoclip_sorted=sorted_, autoclip_count=count)
            return ClipDecision(coef=_coef(norms.total_norm, threshold), threshold=threshold, state=new)
        if norms.sharded:
            raise NotImplementedError(
                "ClippedOptimizer: AutoClip(per_param=True) on sharded gradients (FSDP, DTensor, "
                "process_group=) is not supported: the per-parameter norms are of local pieces. "
                "Use per_param=False (its global norm is reduced over the group)."
            )
        stacked = norms.param_norms
        thresholds = quantile_sorted(sorted_, count, self.quantile)  # one call for every parameter
        finite = torch.isfinite(stacked)
        if norms.complete:  # every parameter has a gradient: no row gather
            bounds = thresholds
            ring, sorted_, count = sorted_ring_push(ring, sorted_, count, stacked, finite)
        else:  # a parameter's history grows only on the steps it has a gradient, as in autoclip
            rows = norms.rows()
            bounds = thresholds[rows]
            r, s, c = sorted_ring_push(ring[rows], sorted_[rows], count[rows], stacked, finite)
            ring, sorted_, count = (
                ring.index_copy(0, rows, r),
                sorted_.index_copy(0, rows, s),
                count.index_copy(0, rows, c),
            )
        new = dict(autoclip_ring=ring, autoclip_sorted=sorted_, autoclip_count=count, autoclip_thresholds=thresholds)
        return ClipDecision(coef=_coef(stacked, bounds), threshold=bounds, state=new)

    def _rule_on_host(self, total: Tensor, ring: Tensor, sorted_: Tensor, count: Tensor) -> ClipDecision:
        """The global :meth:`rule` deciding on the host (:attr:`StepNorms.host`): the same numbers."""
        seen, norm = int(count), float(total)
        threshold = quantile_sorted_host(sorted_, seen, self.quantile)
        new = {}
        if math.isfinite(norm):  # else the step is not accepted, and its state not kept
            ring, sorted_ = sorted_ring_push_host(ring, sorted_, seen, norm)
            new = dict(autoclip_ring=ring, autoclip_sorted=sorted_, autoclip_count=torch.full_like(count, seen + 1))
        exact = total.dtype in HOST_DTYPES and threshold.dtype in HOST_DTYPES
        coef = _coef_host(total, norm, threshold) if exact else _coef(total, threshold)
        return ClipDecision(coef=coef, threshold=threshold, state=new)

    def check_state(self, state: Mapping[str, Any], n_params: int) -> None:
        # One global history or one per parameter: a checkpoint of the other kind would be read
        # as the wrong rows, so it is refused.
        kept = state.get("autoclip_per_param", self.per_param)
        if kept != self.per_param:
            raise ValueError(
                f"ClippedOptimizer: the checkpoint's AutoClip history was kept with per_param={kept}, "
                f"but this optimizer uses per_param={self.per_param}"
            )
        want = self.init_state(1, torch.device("meta"))
        for key in ("autoclip_ring", "autoclip_sorted", "autoclip_count", "autoclip_thresholds"):
            if key not in want or (key == "autoclip_thresholds" and key not in state):
                continue  # per_param=True checkpoints before the first per-parameter step lack it
            if key not in state:
                raise ValueError(f"ClippedOptimizer: the checkpoint's clip state lacks {key!r}")
            check_like(key, state[key], want[key], f"history_length={self.history_length}", any_rows=True)
        rows = {state[k].shape[0] for k in want if k in state and isinstance(state[k], Tensor)}
        if len(rows) > 1 or (not self.per_param and rows != {1}):
            raise ValueError(
                f"ClippedOptimizer: the checkpoint's AutoClip history has rows {sorted(rows)} across its keys; "
                f"expected {'one per parameter' if self.per_param else 'one'} in each"
            )


# ---------------------------------------------------------------------------------------
# ZClip: z-score of the norm against an EMA of its mean and variance
# ---------------------------------------------------------------------------------------
class ZClipState(NamedTuple):
    """ZClip's state. ``warmup``: the first ``warmup_steps`` accepted norms (float64, the
    package keeps Python floats); ``seen``: accepted norms so far; ``mean``/``var``: the EMA."""

    warmup: Tensor
    seen: Tensor
    mean: Tensor
    var: Tensor


def _wide(device: torch.device) -> torch.dtype:
    # The package computes in Python floats (float64); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def zclip_update(policy: ZClip, state: ZClipState, norm: Tensor) -> tuple[Tensor, Tensor, ZClipState]:
    """One ZClip step: ``(bound, spike, new_state)``, as ``zclip.ZClip.step``.

    ``norm`` is the pre-clip global L2 norm. During the warm-up the bound is ``max_norm``
    (``inf`` without a cap) and the norms are collected; then the mean and variance are
    initialised from them and updated as an EMA of the *clip value* (the adaptive bound on a
    spike, else the norm), before the ``max_norm`` cap, as the package does. The new state is
    that of an accepted step (the optimizer keeps the old one otherwise).
    """
    g = norm.to(state.mean.dtype)
    warm = state.seen < policy.warmup_steps
    cap = math.inf if policy.max_norm is None else policy.max_norm
    clip_val, spike = _zclip_clip_value(policy, state, g)
    spike = spike & ~warm
    # the cap during the warm-up and on a step that is no spike; on a spike, the capped clip value
    bound = torch.where(spike, clip_val.clamp(max=cap), cap)
    # the EMA, fed the clip value; skipped on a spike with skip_update_on_spike
    alpha, beta = policy.alpha, 1 - policy.alpha
    mean = alpha * state.mean + beta * clip_val
    var = alpha * state.var + beta * (clip_val - mean) * (clip_val - mean)
    ema_ok = ~(warm | spike) if policy.skip_update_on_spike else ~warm
    # the warm-up: collect, and initialise at the last warm-up norm
    # the warm-up slot of this norm: none once ``seen >= warmup_steps`` (the warm-up is over)
    slot = torch.eq(arange(policy.warmup_steps, g.device), state.seen)
    warmup = torch.where(slot, g, state.warmup)
    seen = state.seen + 1
    init = warm & (seen >= policy.warmup_steps)
    mean0, var0 = _warmup_moments(warmup)
    new = ZClipState(
        warmup,
        seen,
        torch.where(init, mean0, torch.where(ema_ok, mean, state.mean)),
        torch.where(init, var0, torch.where(ema_ok, var, state.var)),
    )
    return bound, spike, new


def _zclip_clip_value(policy: ZClip, state: ZClipState, g: Tensor) -> tuple[Tensor, Tensor]:
    """The package's ``_compute_clip_val``: the clip value (``g`` itself when no spike), and
    whether it is a spike. The operations follow the package's order, so the float64
    arithmetic gives its numbers to the bit."""
    std = state.var.sqrt()
    if policy.clip_option == "percentile":
        threshold = state.mean + policy.z_thresh * std
        spike = g > threshold
    else:
        z = (g - state.mean) / (std + ZCLIP_EPS)
        spike = z > policy.z_thresh
        if policy.clip_option == "adaptive_scaling":
            eta = z / policy.z_thresh  # a larger outlier is clipped harder
            threshold = (state.mean + (policy.z_thresh * std) / eta) * policy.clip_factor
        else:  # "mean"
            threshold = state.mean
    return torch.where(spike, threshold, g), spike


def zclip_update_host(policy: ZClip, state: ZClipState, g: float, seen: int) -> tuple[float, bool, ZClipState]:
    """:func:`zclip_update` for a state in host memory (a CPU step, :attr:`StepNorms.host`),
    deciding in Python: the same IEEE double arithmetic in the same order (``+ - * /`` are
    correctly rounded in both, and the square root is torch's), so the same bits, at a few
    microseconds where the device path dispatches some 40 tensor ops. Only the tensors that
    change are new. ``seen`` is ``state.seen``, read by the caller."""
    mean, var = float(state.mean), float(state.var)
    std = float(state.var.sqrt())  # torch's sqrt, as on the device (see spike_test_host)
    warm = seen < policy.warmup_steps
    cap = math.inf if policy.max_norm is None else policy.max_norm
    clip_val, spike = _zclip_clip_value_host(policy, mean, std, g)
    spike = spike and not warm
    bound = min(clip_val, cap) if spike else cap  # min(nan, cap) is nan, as clamp
    alpha, beta = policy.alpha, 1 - policy.alpha
    ema_mean = alpha * mean + beta * clip_val
    ema_var = alpha * var + beta * (clip_val - ema_mean) * (clip_val - ema_mean)
    if not (warm or (spike and policy.skip_update_on_spike)):
        mean, var = ema_mean, ema_var
    warmup = state.warmup
    if warm:  # collect; the last warm-up norm initialises the moments, as on the device
        warmup = warmup.clone()
        warmup[seen] = g
        if seen + 1 >= policy.warmup_steps:
            mean0, var0 = _warmup_moments(warmup)
            mean, var = float(mean0), float(var0)
    like = state.mean
    new = ZClipState(warmup, _host_scalar(seen + 1, state.seen), _host_scalar(mean, like), _host_scalar(var, like))
    return bound, spike, new


def _zclip_clip_value_host(policy: ZClip, mean: float, std: float, g: float) -> tuple[float, bool]:
    """:func:`_zclip_clip_value` in Python floats (the package's own branches)."""
    if policy.clip_option == "percentile":
        threshold = mean + policy.z_thresh * std
        return (threshold, True) if g > threshold else (g, False)
    z = (g - mean) / (std + ZCLIP_EPS)
    if not z > policy.z_thresh:
        return g, False
    if policy.clip_option == "mean":
        return mean, True
    eta = z / policy.z_thresh  # > 1 here: no division by zero
    return (mean + (policy.z_thresh * std) / eta) * policy.clip_factor, True


def _host_scalar(value: float, like: Tensor) -> Tensor:
    """A new 0-dim tensor of ``like``'s dtype and device holding ``value`` (rounded as ``.to``)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _warmup_moments(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance, each summed left to right as Python's ``sum`` (3.11) does:
    ``cumsum`` accumulates sequentially, a plain ``sum`` would reduce pairwise."""
    n = values.shape[0]
    mean = values.cumsum(0)[-1] / n
    dev = values - mean
    return mean, (dev * dev).cumsum(0)[-1] / n


@dataclass(frozen=True)
class ZClip(ClipPolicy):
    """ZClip: clip the global norm to an adaptive bound when its z-score against an EMA of past
    norms exceeds ``z_thresh``; ``max_norm`` caps the bound (and is the bound of the warm-up).

    Equal to ``zclip.ZClip(alpha, z_thresh, max_grad_norm=max_norm, warmup_steps, mode="zscore",
    clip_option, clip_factor, skip_update_on_spike).step(model)``, with the package's defaults.

    Attributes:
        alpha: EMA factor of the norm's mean and variance, in (0, 1) (default 0.97).
        z_thresh: z-score above which a norm counts as a spike and is clipped (default 2.5).
        max_norm: the cap on the bound, and the bound of the warm-up (default 1.0, as the
            package's ``max_grad_norm``; ``None``: no cap).
        warmup_steps: norms collected before the EMA starts; until then only ``max_norm``
            clips (default 25).
        clip_option: the bound on a spike (default "adaptive_scaling"; or ``"mean"``, or
            ``"percentile"``: always ``mean + z_thresh * std``).
        clip_factor: multiplier of the adaptive-scaling bound (default 1.0).
        skip_update_on_spike: leave the EMA unchanged on a spike (default False).
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    max_norm: float | None = 1.0
    warmup_steps: int = 25
    clip_option: Literal["adaptive_scaling", "mean", "percentile"] = "adaptive_scaling"
    clip_factor: float = 1.0
    skip_update_on_spike: bool = False
    name: ClassVar[str] = "zclip"

    def __post_init__(self) -> None:
        _set(self, "alpha", check.unit_interval("ZClip", "alpha", self.alpha, False, False))
        _set(self, "z_thresh", check.positive_finite("ZClip", "z_thresh", self.z_thresh))
        if self.max_norm is not None:
            _set(self, "max_norm", check.positive_finite("ZClip", "max_norm", self.max_norm))
        _set(self, "warmup_steps", check.positive_int("ZClip", "warmup_steps", self.warmup_steps))
        check.choice("ZClip", "clip_option", self.clip_option, ZCLIP_OPTIONS)
        _set(self, "clip_factor", check.positive_finite("ZClip", "clip_factor", self.clip_factor))
        check.flag("ZClip", "skip_update_on_spike", self.skip_update_on_spike)

    def init_state(self, n_params: int, device: torch.device) -> dict[str, Any]:
        dtype = _wide(device)
        return dict(
            zclip_warmup=torch.zeros(self.warmup_steps, dtype=dtype, device=device),
            zclip_seen=torch.zeros((), dtype=torch.int64, device=device),
            zclip_mean=torch.zeros((), dtype=dtype, device=device),
            zclip_var=torch.zeros((), dtype=dtype, device=device),
        )

    def rule(self, norms: StepNorms, state: Mapping[str, Any]) -> ClipDecision:
        old = ZClipState(state["zclip_warmup"], state["zclip_seen"], state["zclip_mean"], state["zclip_var"])
        total = norms.total_norm
        # the package's own norm: sqrt(sum(norms ** 2)), which can differ from total in the last
        # bit; sharded, the per-parameter norms are of local pieces and only the total is global
        exact = norms.norm_type == 2 and not norms.sharded
        znorm = torch.sqrt(torch.sum(torch.pow(norms.param_norms, 2))) if exact else total
        if norms.host and old.mean.dtype == torch.float64:
            return self._rule_on_host(total, old, znorm)
        bound, _spike, new = zclip_update(self, old, znorm)
        g = znorm.to(bound.dtype)
        zcoef = torch.where(g > bound, bound / (g + 1e-6), torch.ones_like(g)).to(total.dtype)
        # the package's warm-up clips with torch.nn.utils.clip_grad_norm_ (its norm, its formula)
        warm = old.seen < self.warmup_steps
        cap = math.inf if self.max_norm is None else self.max_norm  # a float, as the package passes it
        coef = torch.where(warm, global_norm_coef(total, cap), zcoef)
        new_state = dict(zclip_warmup=new.warmup, zclip_seen=new.seen, zclip_mean=new.mean, zclip_var=new.var)
        return ClipDecision(coef=coef, threshold=bound, state=new_state)

    def _rule_on_host(self, total: Tensor, old: ZClipState, znorm: Tensor) -> ClipDecision:
        """:meth:`rule` deciding in Python floats (:attr:`StepNorms.host`): the same numbers."""
        g, seen = float(znorm), int(old.seen)
        bound, _spike, new = zclip_update_host(self, old, g, seen)
        if seen < self.warmup_steps:  # the warm-up: clip_grad_norm_'s float32 formula, as on the device
            coef = global_norm_coef(total, math.inf if self.max_norm is None else self.max_norm)
        else:
            coef = _host_scalar(bound / (g + 1e-6) if g > bound else 1.0, total)
        new_state = dict(zclip_seen=new.seen, zclip_mean=new.mean, zclip_var=new.var)
        if new.warmup is not old.warmup:
            new_state["zclip_warmup"] = new.warmup
        return ClipDecision(coef=coef, threshold=_host_scalar(bound, total), state=new_state)


# ---------------------------------------------------------------------------------------
# Spike skipping: drop the whole update when the norm is an outlier against its window
# ---------------------------------------------------------------------------------------
def spike_test(window: Tensor, count: Tensor, norm: Tensor, sigma: float, min_count: int) -> tuple[Tensor, Tensor]:
    """``(spike, bound)``: whether ``norm > mean + sigma * std`` of the ``min(count, W)``
    norms in ``window`` (unbiased std), once at least ``min_count`` are in."""
    length = window.shape[0]
    n = count.clamp(max=length)
    valid = torch.lt(arange(length, window.device), n)
    nf = n.to(window.dtype)
    # the slots not filled yet hold 0 (and a filled one a finite norm): multiplying by the mask
    # zeroes them exactly, in one op where a where() is two
    mean = window.mul(valid).sum() / nf.clamp(min=1)
    dev = (window - mean).mul_(valid)
    std = (dev.dot(dev) / (nf - 1).clamp(min=1)).sqrt()
    # a full window (every step once the first W are in) is one std_mean, as the host path takes it
    full_std, full_mean = torch.std_mean(window)
    full = n == length
    mean, std = torch.where(full, full_mean, mean), torch.where(full, full_std, std)
    bound = mean + std * sigma  # two roundings, as in Python (torch.add(alpha=) fuses a multiply-add)
    return (n >= min_count) & (norm.to(window.dtype) > bound), bound


def spike_test_host(window: Tensor, count: int, norm: float, sigma: float, min_count: int) -> tuple[bool, float]:
    """:func:`spike_test` for a window in host memory (:attr:`StepNorms.host`): its
    reductions stay tensor ops (the same ones, so the same bits) and the rest is Python. A full
    window takes one ``std_mean``; a partial one (the first W steps) the masked sums."""
    length = window.shape[0]
    n = min(count, length)
    if n == length:
        std_t, mean_t = torch.std_mean(window)
        mean, std = float(mean_t), float(std_t)
    else:
        valid = torch.lt(arange(length, window.device), n)
        mean = float(window.mul(valid).sum()) / max(n, 1)
        dev = (window - mean).mul_(valid)
        # torch's sqrt, not math.sqrt: on a CPU it is not always correctly rounded (1% of doubles
        # differ in the last bit), and the two paths must give the same bits
        std = float((dev.dot(dev) / max(n - 1, 1)).sqrt())
    bound = mean + std * sigma
    return n >= min_count and norm > bound, bound


@dataclass(frozen=True)
class SpikeSkip(ClipPolicy):
    """Skip the whole update when the pre-clip global norm is a spike: above the mean of its
    rolling window of ``window`` norms by ``sigma`` standard deviations (unbiased), once
    ``min(window, max(20, window // 2))`` norms are in (as OLMo-core's ``SkipStepOptimizer``).

    Pass it as ``ClippedOptimizer(..., skip_spikes=SpikeSkip(...))`` (``True``: the defaults),
    beside any mode. A skipped step is counted in ``skipped_steps`` and its norm enters the
    window as the bound it broke (winsorised): one spike cannot inflate the window, and a
    lasting rise of the norm level is still learned, instead of every later step being skipped.

    Attributes:
        sigma: the number of standard deviations (default 6.0).
        window: the norms in the rolling window, >= 3 (default 128).
    """

    sigma: float = 6.0
    window: int = 128
    name: ClassVar[str] = "spikes"

    def __post_init__(self) -> None:
        _set(self, "sigma", check.positive_finite("SpikeSkip", "sigma", self.sigma))
        _set(
            self, "window", check.positive_int("SpikeSkip", "window", self.window, 3, " (norms in the rolling window)")
        )

    def init_state(self, n_params: int, device: torch.device) -> dict[str, Any]:
        return dict(
            spike_ring=torch.zeros(self.window, dtype=_wide(device), device=device),
            spike_count=torch.zeros((), dtype=torch.int64, device=device),
        )

    def _min_count(self) -> int:
        return min(self.window, max(20, self.window // 2))  # as OLMo-core

    def rule(self, norms: StepNorms, state: Mapping[str, Any]) -> ClipDecision:
        ring, count = state["spike_ring"], state["spike_count"]
        if norms.host and ring.dtype == torch.float64 and ring.is_cpu:
            return self._rule_on_host(norms.total_norm, ring, count)
        total = norms.total_norm.to(ring.dtype)
        spike, bound = spike_test(ring, count, total, self.sigma, self._min_count())
        value = torch.where(spike, bound, total)
        slot = torch.eq(arange(self.window, ring.device), count % self.window)
        new = dict(spike_ring=torch.where(slot, value, ring), spike_count=count + 1)
        return ClipDecision(threshold=bound, skip=spike, state=new)

    def _rule_on_host(self, total: Tensor, ring: Tensor, count: Tensor) -> ClipDecision:
        """:meth:`rule` deciding in Python floats (:attr:`StepNorms.host`): the same numbers."""
        seen, norm = int(count), float(total)
        spike, bound = spike_test_host(ring, seen, norm, self.sigma, self._min_count())
        ring = ring.clone(memory_format=torch.contiguous_format)
        host_memory(ring)[seen % self.window] = bound if spike else norm
        new = dict(spike_ring=ring, spike_count=_host_scalar(seen + 1, count))
        # no threshold: a skip policy's is never read (it is never a mode=)
        return ClipDecision(skip=flag(spike, ring.device), state=new)


#: The built-in policies by the name ``mode=`` (and a checkpoint's ``"mode"``) gives them.
POLICIES: dict[str, type[ClipPolicy]] = {"agc": AGC, "autoclip": AutoClip, "zclip": ZClip}
