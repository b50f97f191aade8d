"""The adaptive clip modes (AGC, AutoClip, ZClip) and spike skipping, as pure state updates.

Each mode is a function of the gradients and of its state tensors that returns a new state;
the runners at the bottom read that state from, and write it back to, the ``clip_state``
dict (``optimizer.state["clip"]``), so a checkpoint carries it and a resumed run continues
bit-identically. No function reads a tensor value on the host: every decision is a
``torch.where``/``clamp`` on the device, so a step costs no device-to-host sync.

A step that does not proceed (its norm is NaN/Inf, a GradScaler overflow, a NaN in an
opted-out group, a spike) never enters a history or an EMA: the wrapper's gate says so
through ``accept`` (see ``modes.Gate``), so one bad batch cannot poison the threshold of every later step,
as it does in the reference packages.

State keys (tensors on the gradients' device, in ``optimizer.state["clip"]``):
    autoclip_ring, autoclip_sorted, autoclip_count: the norm history of AutoClip, as a
        ring buffer in arrival order and the same values kept sorted (``+inf`` = empty
        slot), with the number of norms accepted so far; one row per parameter when
        ``per_param=True``, and then ``autoclip_thresholds``, each parameter's last bound.
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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._tensors import index_tensor
from .config import ClipConfig
from .modes import EPS, ClipResult, Gate, _device, _measure, global_norm_coef, held, open_gate, unscaled
from .norms import GradBatch, scale_, scale_each_, tensor_norms
from .stats import check_tensor

__all__ = [
    "agc_coefs",
    "quantile_sorted",
    "sorted_ring_push",
    "ZClipState",
    "zclip_update",
    "spike_test",
    "run_agc",
    "run_autoclip",
    "run_zclip",
    "spike_gate",
    "check_adaptive_state",
]

#: ZClip's ``eps`` (added to the standard deviation of the z-score), as the package's default.
ZCLIP_EPS = 1e-6


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
    first dimension foreach kernels cannot do."""
    parts: list[Tensor] = []
    if units.small:
        parts.append(
            torch.stack([n.to(device) for n in tensor_norms(GradBatch([tensors[i] for i in units.small]), norm_type)])
        )
    for i in units.big:
        t = tensors[i]
        acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
        parts.append(torch.linalg.vector_norm(t, norm_type, dim=tuple(range(1, t.ndim)), dtype=acc).to(device))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def agc_coefs(param_units: Tensor, grad_units: Tensor, clip_factor: float, eps: float) -> Tensor:
    """Per-unit AGC coefficients: ``1`` where ``|g| < clip_factor * max(|w|, eps)``, else the
    ratio that brings ``|g|`` to that bound (as ``timm.utils.agc.adaptive_clip_grad``)."""
    max_norm = param_units.clamp(min=eps).mul_(clip_factor)
    ratio = max_norm / grad_units.clamp(min=1e-6)
    return torch.where(grad_units < max_norm, torch.ones_like(ratio), ratio)


@torch.no_grad()
def run_agc(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    """Adaptive gradient clipping (unit-wise ratio of gradient norm to weight norm).

    ``grad * min(1, clip_factor * max(|w|, eps) / |grad|)`` per output unit. Equal to
    ``timm.utils.agc.adaptive_clip_grad(params, clip_factor, eps, norm_type)``. Not a scalar
    coefficient: always applied here (``apply`` is ignored), never folded.
    """
    assert (
        cfg.clip_factor is not None and cfg.eps is not None
    )  # ClipConfig fills the options of its mode (narrows the types)
    dev = _device(batch, device)
    grads, params = batch.tensors, _agc_params(batch)
    units = _units(grads)
    g_units = _unit_norms(grads, units, cfg.norm_type, dev)
    if grad_scale is not None:
        g_units = g_units / grad_scale.to(dev)
    coefs = agc_coefs(_unit_norms(params, units, cfg.norm_type, dev), g_units, cfg.clip_factor, cfg.eps)
    stacked = _tensor_norms_from_units(g_units, units, len(grads), cfg.norm_type, dev)
    total = torch.linalg.vector_norm(stacked, cfg.norm_type) if grads else torch.zeros((), device=dev)
    hold, _ = open_gate(gate, total)
    scale_each_(batch, _unit_factors(unscaled(held(coefs, hold), grad_scale, dev), grads, units))
    smallest = coefs.min() if coefs.numel() else torch.ones((), device=dev)
    return ClipResult(total, smallest, stacked, torch.full((), cfg.clip_factor, device=dev))


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


def _agc_params(batch: GradBatch) -> Sequence[Tensor]:
    if batch.sharding is not None:
        raise NotImplementedError(
            "ClippedOptimizer: mode='agc' on sharded gradients (FSDP, DTensor, process_group=) is not "
            "supported: a unit's weight and gradient norms would need their own reduction. DDP works."
        )
    params = batch.params
    if params is None:
        raise ValueError("mode='agc' needs the parameters beside the gradients (GradBatch(..., params=...))")
    for p, g in zip(params, batch.tensors):
        if p.shape != g.shape:  # a sparse gradient's values: no rows to measure
            raise ValueError(
                f"mode='agc' needs dense gradients; got a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}"
            )
    return params


@functools.lru_cache(maxsize=64)
def _segments(n_small: int, rows: tuple[int, ...]) -> tuple[int, ...]:
    """Which tensor each unit belongs to: the small tensors' own units, then each big
    tensor's rows (built once per layout: an index made on the host, not per step)."""
    return tuple(range(n_small)) + tuple(n_small + j for j, r in enumerate(rows) for _ in range(r))


def _tensor_norms_from_units(units: Tensor, where: _Units, n: int, norm_type: float, device) -> Tensor:
    """Per-tensor norms (in batch order) from their units' norms: a second full pass over the
    gradients saved. A <= 1-D tensor is its own unit; a >= 2-D one reduces its rows' norms."""
    if n == 0:
        return units.new_zeros(0)
    n_small = len(where.small)
    order = index_tensor(where.small + where.big, device)
    seg = index_tensor(_segments(n_small, tuple(where.rows)), device)
    if math.isinf(norm_type):
        per = units.new_zeros(n).scatter_reduce_(0, seg, units, "amax", include_self=False)
    else:
        per = units.new_zeros(n).index_add_(0, seg, units.pow(norm_type)).pow(1.0 / norm_type)
    return per.new_empty(n).index_copy_(0, order, per)


# ---------------------------------------------------------------------------------------
# AutoClip: a quantile of the norm history, kept sorted so a step needs no sort
# ---------------------------------------------------------------------------------------
def sorted_ring_push(ring: Tensor, sorted_: Tensor, count: Tensor, value: Tensor, accept: Tensor):
    """Push ``value`` (one per row) into each row's ring buffer, evicting the oldest, and keep
    ``sorted_`` the same values in ascending order. Rows where ``accept`` is False are left alone.

    A row of ``ring``/``sorted_`` holds ``L`` slots, ``+inf`` where still empty. The evicted
    value leaves the sorted row at ``d`` and the new one enters at ``i``: every other slot
    takes its own value or a neighbour's, so the update is a few ``where``s over the row, O(L),
    instead of the O(L log L) sort a quantile of the raw history costs every step.
    Shapes: ``ring``, ``sorted_``: ``(R, L)``; ``count``, ``value``, ``accept``: ``(R,)``.
    """
    length = ring.shape[1]
    pos = (count % length).unsqueeze(1)
    evicted = ring.gather(1, pos)
    new = torch.where(accept.unsqueeze(1), value.unsqueeze(1).to(ring.dtype), evicted)
    d = torch.searchsorted(sorted_, evicted)  # where the evicted value sits
    i = torch.searchsorted(sorted_, new) - (evicted < new).long()  # where the new one goes once it is gone
    j = torch.arange(length, device=ring.device)
    pad = sorted_.new_full((sorted_.shape[0], 1), math.inf)
    next_ = torch.cat([sorted_[:, 1:], pad], 1)
    prev = torch.cat([pad, sorted_[:, :-1]], 1)
    below = torch.where(j < d, sorted_, next_)  # slot j of the row without the evicted value
    above = torch.where(j <= d, prev, sorted_)  # slot j - 1 of it
    new_sorted = torch.where(j < i, below, torch.where(j == i, new, above))
    return ring.scatter(1, pos, new), new_sorted, count + accept.long()


def quantile_sorted(sorted_: Tensor, count: Tensor, q: float) -> Tensor:
    """Per row, ``torch.quantile(history, q)`` (linear interpolation) of the ``min(count, L)``
    values at the front of each ascending row; ``+inf`` for an empty row (clip nothing).

    The ranks are computed in the history's dtype as ``torch.quantile`` computes them, so the
    result is bit-identical to it.
    """
    length = sorted_.shape[1]
    n = count.clamp(max=length)
    ranks = torch.full((), q, dtype=sorted_.dtype, device=sorted_.device) * (n - 1).clamp(min=0)
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


def _autoclip_state(cfg: ClipConfig, clip_state: dict[str, Any], rows: int, device) -> tuple[Tensor, Tensor, Tensor]:
    assert cfg.history_length is not None  # ClipConfig fills the options of its mode (narrows the types)
    ring = clip_state.get("autoclip_ring")
    if ring is None:
        ring = torch.full((0, cfg.history_length), math.inf, device=device)
        clip_state.update(
            autoclip_ring=ring,
            autoclip_sorted=ring.clone(),
            autoclip_count=torch.zeros(0, dtype=torch.int64, device=device),
        )
    clip_state.setdefault("autoclip_per_param", bool(cfg.per_param))
    grow = rows - ring.shape[0]
    if grow > 0:  # first step, or a param group was added
        pad = torch.full((grow, cfg.history_length), math.inf, device=device)
        clip_state["autoclip_ring"] = torch.cat([ring, pad])
        clip_state["autoclip_sorted"] = torch.cat([clip_state["autoclip_sorted"], pad])
        clip_state["autoclip_count"] = torch.cat(
            [clip_state["autoclip_count"], torch.zeros(grow, dtype=torch.int64, device=device)]
        )
    return clip_state["autoclip_ring"], clip_state["autoclip_sorted"], clip_state["autoclip_count"]


def _coef(norm: Tensor, threshold: Tensor) -> Tensor:
    """``min(1, threshold / (norm + EPS))`` computed as ``clip_grad_norm_`` computes it for
    the package: it converts the threshold to a float, and ``float / tensor`` is
    ``tensor.reciprocal() * float`` in torch, which can differ from a division in the last bit."""
    return torch.clamp((norm + EPS).reciprocal() * threshold, max=1.0)


def run_autoclip(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    """AutoClip: clip to the ``quantile`` of the last ``history_length`` pre-clip norms.

    Global (one history of global norms; ``torch.nn.utils.clip_grad_norm_`` to it) or, with
    ``per_param=True``, one history per parameter and each gradient clipped to its own.
    Equal to ``autoclip``'s ``QuantileClip.as_optimizer(opt, quantile, history_length,
    global_threshold=not per_param)``, whose first step clips nothing.
    """
    assert cfg.quantile is not None  # ClipConfig fills the options of its mode (narrows the types)
    dev = _device(batch, device)
    total, stacked = _measure(batch, cfg.norm_type, grad_scale, dev)
    hold, accept = open_gate(gate, total)
    if cfg.per_param:
        return ClipResult(total, *_autoclip_per_param(cfg, batch, grad_scale, stacked, hold, accept, clip_state, dev))
    ring, sorted_, count = _autoclip_state(cfg, clip_state, 1, dev)
    threshold = quantile_sorted(sorted_, count, cfg.quantile)[0]
    coef = _coef(total, threshold)
    if apply:
        scale_(batch, unscaled(held(coef, hold), grad_scale, dev))
    ring, sorted_, count = sorted_ring_push(ring, sorted_, count, total.reshape(1), accept.reshape(1))
    clip_state.update(autoclip_ring=ring, autoclip_sorted=sorted_, autoclip_count=count)
    return ClipResult(total, coef, stacked, threshold)


def _autoclip_per_param(
    cfg: ClipConfig, batch: GradBatch, grad_scale, stacked: Tensor, hold, accept: Tensor, clip_state, dev
) -> tuple[Tensor, Tensor, Tensor]:
    assert cfg.quantile is not None  # ClipConfig fills the options of its mode (narrows the types)
    if batch.sharding is not None:
        raise NotImplementedError(
            "ClippedOptimizer: mode='autoclip' with per_param=True on sharded gradients (FSDP, DTensor, "
            "process_group=) is not supported: the per-parameter norms are of local pieces. "
            "Use per_param=False (its global norm is reduced over the group)."
        )
    n_total = batch.n_total if batch.n_total is not None else len(batch)
    ring, sorted_, count = _autoclip_state(cfg, clip_state, n_total, dev)
    thresholds = quantile_sorted(sorted_, count, cfg.quantile)  # one call for every parameter
    row_accept = accept.expand(len(batch)) & torch.isfinite(stacked)
    if len(batch) == n_total:  # every parameter has a gradient: no row gather
        coefs = _coef(stacked, thresholds)
        ring, sorted_, count = sorted_ring_push(ring, sorted_, count, stacked, row_accept)
    else:  # a parameter's history grows only on the steps it has a gradient, as in autoclip
        positions = range(len(batch)) if batch.positions is None else batch.positions
        rows = index_tensor(positions, dev)
        coefs = _coef(stacked, thresholds[rows])
        r, s, c = sorted_ring_push(ring[rows], sorted_[rows], count[rows], stacked, row_accept)
        ring, sorted_, count = ring.index_copy(0, rows, r), sorted_.index_copy(0, rows, s), count.index_copy(0, rows, c)
    scale_each_(batch, unscaled(held(coefs, hold), grad_scale, dev).unbind())
    clip_state.update(autoclip_ring=ring, autoclip_sorted=sorted_, autoclip_count=count, autoclip_thresholds=thresholds)
    if not len(batch):
        return torch.ones((), device=dev), stacked, torch.full((), math.inf, device=dev)
    # the statistics keep one number: the parameter clipped hardest, its coefficient and bound
    hardest = coefs.argmin()
    bound = thresholds[hardest] if len(batch) == n_total else thresholds[rows][hardest]
    return coefs[hardest], stacked, bound


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


def _zclip_state(cfg: ClipConfig, clip_state: dict[str, Any], device) -> ZClipState:
    assert cfg.warmup_steps is not None  # ClipConfig fills the options of its mode (narrows the types)
    if "zclip_mean" not in clip_state:
        dtype = _wide(device)
        zero = torch.zeros((), dtype=dtype, device=device)
        clip_state.update(
            zclip_warmup=torch.zeros(cfg.warmup_steps, dtype=dtype, device=device),
            zclip_seen=torch.zeros((), dtype=torch.int64, device=device),
            zclip_mean=zero,
            zclip_var=zero.clone(),
        )
    return ZClipState(
        clip_state["zclip_warmup"], clip_state["zclip_seen"], clip_state["zclip_mean"], clip_state["zclip_var"]
    )


def _wide(device: torch.device) -> torch.dtype:
    # The package computes in Python floats (float64); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def zclip_update(cfg: ClipConfig, state: ZClipState, norm: Tensor, accept: Tensor) -> tuple[Tensor, Tensor, ZClipState]:
    """One ZClip step: ``(bound, spike, new_state)``, as ``zclip.ZClip.step``.

    ``norm`` is the pre-clip global L2 norm. During the warm-up the bound is ``max_norm``
    (``inf`` without a cap) and the norms are collected; then the mean and variance are
    initialised from them and updated as an EMA of the *clip value* (the adaptive bound on a
    spike, else the norm), before the ``max_norm`` cap, as the package does.
    """
    assert (
        cfg.warmup_steps is not None and cfg.alpha is not None and cfg.skip_update_on_spike is not None
    )  # ClipConfig fills the options of its mode (narrows the types)
    g = norm.to(state.mean.dtype)
    warm = state.seen < cfg.warmup_steps
    cap = math.inf if cfg.max_norm is None else cfg.max_norm
    clip_val, spike = _zclip_clip_value(cfg, state, g)
    bound = torch.where(
        warm, torch.full_like(g, cap), torch.clamp(torch.where(spike, clip_val, g.new_tensor(math.inf)), max=cap)
    )
    spike = spike & ~warm
    # the EMA, fed the clip value; skipped on a spike with skip_update_on_spike
    alpha, beta = cfg.alpha, 1 - cfg.alpha
    mean = alpha * state.mean + beta * clip_val
    var = alpha * state.var + beta * (clip_val - mean) * (clip_val - mean)
    ema_ok = accept & ~warm & ~(spike & cfg.skip_update_on_spike)
    # the warm-up: collect, and initialise at the last warm-up norm
    slot = torch.nn.functional.one_hot(state.seen.clamp(max=cfg.warmup_steps - 1), cfg.warmup_steps).bool()
    warmup = torch.where(slot & warm & accept, g, state.warmup)
    seen = state.seen + accept.long()
    init = warm & (seen >= cfg.warmup_steps)
    mean0, var0 = _warmup_moments(warmup)
    new = ZClipState(
        warmup,
        seen,
        torch.where(init, mean0, torch.where(ema_ok, mean, state.mean)),
        torch.where(init, var0, torch.where(ema_ok, var, state.var)),
    )
    return bound, spike, new


def _zclip_clip_value(cfg: ClipConfig, state: ZClipState, g: Tensor) -> tuple[Tensor, Tensor]:
    """The package's ``_compute_clip_val``: the clip value (``g`` itself when no spike), and
    whether it is a spike. The operations follow the package's order, so the float64
    arithmetic gives its numbers to the bit."""
    assert (
        cfg.z_thresh is not None and cfg.clip_factor is not None
    )  # ClipConfig fills the options of its mode (narrows the types)
    std = state.var.sqrt()
    if cfg.clip_option == "percentile":
        threshold = state.mean + cfg.z_thresh * std
        spike = g > threshold
    else:
        z = (g - state.mean) / (std + ZCLIP_EPS)
        spike = z > cfg.z_thresh
        if cfg.clip_option == "adaptive_scaling":
            eta = z / cfg.z_thresh  # a larger outlier is clipped harder
            threshold = (state.mean + (cfg.z_thresh * std) / eta) * cfg.clip_factor
        else:  # "mean"
            threshold = state.mean
    return torch.where(spike, threshold, g), spike


def _warmup_moments(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance, each summed left to right as Python's ``sum`` (3.11) does:
    ``cumsum`` accumulates sequentially, a plain ``sum`` would reduce pairwise."""
    n = values.shape[0]
    mean = values.cumsum(0)[-1] / n
    dev = values - mean
    return mean, (dev * dev).cumsum(0)[-1] / n


def run_zclip(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    """ZClip: clip the global norm to an adaptive bound when its z-score against the EMA of
    past norms exceeds ``z_thresh``; ``max_norm`` caps the bound (and is the bound of the
    warm-up). Equal to ``zclip.ZClip(alpha, z_thresh, max_grad_norm=max_norm, warmup_steps,
    mode, clip_option, clip_factor, skip_update_on_spike).step(model)``.
    """
    assert cfg.warmup_steps is not None  # ClipConfig fills the options of its mode (narrows the types)
    dev = _device(batch, device)
    total, stacked = _measure(batch, cfg.norm_type, grad_scale, dev)
    hold, accept = open_gate(gate, total)
    state = _zclip_state(cfg, clip_state, dev)
    # the package's own norm: sqrt(sum(norms ** 2)), which can differ from total in the last
    # bit; sharded, the per-tensor norms are of local pieces and only the total is global
    exact = cfg.norm_type == 2 and batch.sharding is None
    znorm = torch.sqrt(torch.sum(torch.pow(stacked, 2))) if exact else total
    bound, _spike, new = zclip_update(cfg, state, znorm, accept)
    g = znorm.to(bound.dtype)
    zcoef = torch.where(g > bound, bound / (g + 1e-6), torch.ones_like(g)).to(total.dtype)
    # the package's warm-up clips with torch.nn.utils.clip_grad_norm_ (its norm, its formula)
    warm = state.seen < cfg.warmup_steps
    cap = math.inf if cfg.max_norm is None else cfg.max_norm  # a float, as the package passes it
    coef = torch.where(warm, global_norm_coef(total, cap), zcoef)
    if apply:
        scale_(batch, unscaled(held(coef, hold), grad_scale, dev))
    clip_state.update(zclip_warmup=new.warmup, zclip_seen=new.seen, zclip_mean=new.mean, zclip_var=new.var)
    return ClipResult(total, coef, stacked, bound.to(total.dtype))


# ---------------------------------------------------------------------------------------
# Spike skipping: drop the whole update when the norm is an outlier against its window
# ---------------------------------------------------------------------------------------
def spike_test(window: Tensor, count: Tensor, norm: Tensor, sigma: float, min_count: int) -> tuple[Tensor, Tensor]:
    """``(spike, bound)``: whether ``norm > mean + sigma * std`` of the ``min(count, W)``
    norms in ``window`` (unbiased std), once at least ``min_count`` are in."""
    length = window.shape[0]
    n = count.clamp(max=length)
    valid = torch.arange(length, device=window.device) < n
    nf = n.to(window.dtype)
    mean = torch.where(valid, window, 0).sum() / nf.clamp(min=1)
    dev = torch.where(valid, window - mean, 0)
    std = ((dev * dev).sum() / (nf - 1).clamp(min=1)).sqrt()
    bound = mean + sigma * std
    return (n >= min_count) & (norm.to(window.dtype) > bound), bound


def spike_gate(cfg: ClipConfig, clip_state: dict[str, Any], total: Tensor, enter: Tensor) -> Tensor:
    """Whether this step's norm is a spike (0-dim bool), and the window updated in ``clip_state``.

    ``enter`` (0-dim bool) says whether the norm may enter the window at all: not when it is
    NaN/Inf, nor when the step is skipped for another reason (an overflow, a NaN elsewhere).
    """
    assert (
        cfg.spike_window is not None and cfg.spike_sigma is not None
    )  # ClipConfig fills the options of its mode (narrows the types)
    device = total.device
    if "spike_ring" not in clip_state:
        clip_state.update(
            spike_ring=torch.zeros(cfg.spike_window, dtype=_wide(device), device=device),
            spike_count=torch.zeros((), dtype=torch.int64, device=device),
        )
    ring, count = clip_state["spike_ring"], clip_state["spike_count"]
    min_count = min(cfg.spike_window, max(20, cfg.spike_window // 2))  # as OLMo-core
    spike, bound = spike_test(ring, count, total, cfg.spike_sigma, min_count)
    spike = spike & enter
    # A skipped norm enters the window as the bound it broke (winsorised): one spike cannot
    # inflate the window, and a lasting rise of the norm level is still learned, instead of
    # every later step being skipped.
    value = torch.where(spike, bound, total.to(ring.dtype))
    slot = torch.nn.functional.one_hot(count % cfg.spike_window, cfg.spike_window).bool() & enter
    clip_state.update(spike_ring=torch.where(slot, value, ring), spike_count=count + enter.long())
    return spike


# ---------------------------------------------------------------------------------------
# Checkpoints: the adaptive state is checked when it is loaded, not at the step that reads it
# ---------------------------------------------------------------------------------------
def check_adaptive_state(cfg: ClipConfig, clip_state: dict[str, Any]) -> None:
    """Refuse, with the key and what was expected, adaptive state that ``cfg`` cannot continue
    from (called by ``load_state_dict`` before anything is changed)."""
    if cfg.mode == "autoclip" and "autoclip_ring" in clip_state:
        _check_autoclip(cfg, clip_state)
    if cfg.mode == "zclip" and "zclip_mean" in clip_state:
        for key, ndim, kind, shape in (
            ("zclip_warmup", 1, "float", (cfg.warmup_steps,)),
            ("zclip_seen", 0, "int", None),
            ("zclip_mean", 0, "float", None),
            ("zclip_var", 0, "float", None),
        ):
            _check_key(clip_state, key, ndim, kind, shape, f"warmup_steps={cfg.warmup_steps}")
    if cfg.skip_spikes and "spike_ring" in clip_state:
        _check_key(clip_state, "spike_ring", 1, "float", (cfg.spike_window,), f"spike_window={cfg.spike_window}")
        _check_key(clip_state, "spike_count", 0, "int", None, "")


def _check_autoclip(cfg: ClipConfig, clip_state: dict[str, Any]) -> None:
    # One global history or one per parameter: a checkpoint of the other kind would be read
    # as the wrong rows, so it is refused.
    kept = clip_state.get("autoclip_per_param", bool(cfg.per_param))
    if kept != bool(cfg.per_param):
        raise ValueError(
            f"ClippedOptimizer: the checkpoint's AutoClip history was kept with per_param={kept}, "
            f"but this optimizer uses per_param={cfg.per_param}"
        )
    hint = f"history_length={cfg.history_length}"
    _check_key(clip_state, "autoclip_ring", 2, "float", (None, cfg.history_length), hint)
    rows = clip_state["autoclip_ring"].shape[0]
    _check_key(clip_state, "autoclip_sorted", 2, "float", (rows, cfg.history_length), hint)
    _check_key(clip_state, "autoclip_count", 1, "int", (rows,), hint)


def _check_key(clip_state: dict[str, Any], key: str, ndim: int, kind: str, shape, hint: str) -> None:
    if key not in clip_state:
        raise ValueError(f"ClippedOptimizer: the checkpoint's clip state lacks {key!r}")
    try:
        check_tensor(key, clip_state[key], ndim, kind, shape)
    except ValueError as err:
        raise ValueError(f"{err}{f' (this optimizer uses {hint})' if hint else ''}") from None
