"""Reading the clip statistics: a flat dict for loggers, a report with advice, a plot.

Every step writes its pre-clip norm, threshold, coefficient and skip flag into a ring buffer
on the device (``optimizer.state["clip"]["history"]``, see :mod:`clipped_optim.stats`),
without a host sync. The functions here copy what they need to the host **once per call**,
so call them when logging (every 50 or 100 steps), not every step.

* :func:`clip_stats` → ``dict[str, float]`` for ``SummaryWriter.add_scalars``, ``wandb.log``,
  Lightning's ``log_dict`` or ``print``; per-layer norms by parameter name on request.
* :func:`clip_report` → :class:`ClipReport`: fraction of steps clipped, norm percentiles,
  skipped steps and advice as plain sentences (``print(report)``).
* :func:`plot_history` draws the norm history with the threshold (matplotlib, imported
  inside the function: ``pip install clipped_optim[examples]``).

Nothing here needs a logging library or matplotlib at import time: ``plot_history`` is exported
from the package's top level (``from clipped_optim import plot_history``) and imports
matplotlib only when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import stats as _stats
from .attribution import Attribution, attribute, describe, explained_steps, parameter_label

__all__ = ["clip_stats", "clip_report", "state_report", "ClipReport", "Attribution", "plot_history", "advise"]

#: Below this fraction of steps clipped, clipping counts as "almost never active".
RARELY = 0.01
#: Above this fraction, "almost always active".
MOSTLY = 0.9
#: A norm this many times the window's median counts as an outlier.
OUTLIER_FACTOR = 10.0
#: Outliers on more than this fraction of steps, in both halves of the window, are a "stream".
STREAM = 0.02
#: Fewer steps than this in the window: no advice beyond "too few steps".
MIN_STEPS = 20


def _clip_state(optimizer: Any) -> dict[str, Any]:
    state = optimizer.state.get(_stats.STATE_KEY)
    if state is None:
        raise ValueError(
            "no clip statistics in optimizer.state['clip']: pass a ClippedOptimizer (or its state) "
            "that has been constructed"
        )
    return state


def _named(named_parameters: Any) -> Iterable[tuple[str, Tensor]]:
    if isinstance(named_parameters, Mapping):
        return named_parameters.items()
    return named_parameters


def names_in_order(params: Iterable[Tensor], named_parameters: Any) -> list[str | None]:
    """The name of each of ``params`` in ``named_parameters`` (``model.named_parameters()`` or a
    ``{name: parameter}`` map), matched by identity; ``None`` where it has none. A tied
    parameter keeps its first name."""
    by_id: dict[int, str] = {}
    for name, p in _named(named_parameters):
        by_id.setdefault(id(p), name)
    return [by_id.get(id(p)) for p in params]


def clip_stats(optimizer: Any, named_parameters: Any = None, prefix: str = "clip/") -> dict[str, float]:
    """The clip statistics as a flat ``dict[str, float]``, with one device-to-host copy.

    Every 0-dim tensor of ``optimizer.state["clip"]`` (``grad_norm``, ``clip_coef``,
    ``threshold``, the step counters, and whatever scalar state an adaptive mode keeps) is
    included under ``prefix + key``, plus ``clip_rate`` (``clipped_steps / steps``).

    Args:
        optimizer: a :class:`~clipped_optim.ClippedOptimizer`.
        named_parameters: ``model.named_parameters()`` or a ``{name: parameter}`` map: adds
            the last step's pre-clip norm of each parameter as ``prefix + "grad_norm/" + name``.
        prefix: prepended to every key (``"clip/"`` groups them in TensorBoard and wandb).

    Returns:
        ``{"clip/grad_norm": 0.83, "clip/steps": 100.0, ...}``: plain Python floats.
    """
    state = _clip_state(optimizer)
    scalars = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 0}
    if "steps" in scalars and "clipped_steps" in scalars:
        scalars["clip_rate"] = scalars["clipped_steps"].double() / scalars["steps"].clamp(min=1).double()
    if named_parameters is not None:
        per_layer = optimizer.named_grad_norms(_named(named_parameters))
        scalars.update({f"grad_norm/{name}": norm for name, norm in per_layer.items()})
    if not scalars:
        return {}
    device = next(iter(scalars.values())).device
    # One stack, one copy: float64 keeps the integer counters exact up to 2**53.
    values = torch.stack([v.detach().to(device, torch.float64) for v in scalars.values()]).tolist()
    return {prefix + key: value for key, value in zip(scalars, values)}


@dataclass
class ClipReport:
    """What clipping did over the last ``window`` steps, and what to make of it.

    Attributes:
        mode: the clip mode.
        total_steps: ``step()`` calls since construction (or the checkpoint's start).
        window: how many recent steps the figures below cover.
        clipped_fraction: share of the window's steps whose gradients were scaled down.
        clipped: number of such steps. skipped: steps whose update was skipped (non-finite
        gradients or a spike a mode chose to skip). nonfinite_total: all-time NaN/Inf steps.
        percentiles: pre-clip norm percentiles of the window's finite norms, ``{50: ..., 90:
        ..., 99: ..., 100: ...}``.
        threshold: the median threshold in effect over the window.
        advice: plain sentences, one per finding.
        attributions: the parameters behind the window's outlier, skipped and non-finite
            steps, one :class:`~clipped_optim.attribution.Attribution` per run of steps with
            the same finding (see :mod:`clipped_optim.attribution`).
        steps, norms, thresholds, coefs, skipped_mask: the window's per-step history (host
        lists), for :func:`plot_history`.
    """

    mode: str
    total_steps: int
    window: int
    clipped: int
    clipped_fraction: float
    skipped: int
    nonfinite_total: int
    percentiles: dict[int, float]
    threshold: float
    advice: list[str]
    steps: list[int] = field(default_factory=list, repr=False)
    norms: list[float] = field(default_factory=list, repr=False)
    thresholds: list[float] = field(default_factory=list, repr=False)
    coefs: list[float] = field(default_factory=list, repr=False)
    skipped_mask: list[bool] = field(default_factory=list, repr=False)
    attributions: list[Attribution] = field(default_factory=list)

    def __str__(self) -> str:
        pct = ", ".join(f"p{q} {v:.3g}" for q, v in self.percentiles.items()) or "n/a"
        lines = [
            f"clip report (mode={self.mode!r}, last {self.window} of {self.total_steps} steps)",
            f"  clipped: {self.clipped} steps ({100 * self.clipped_fraction:.1f}%), threshold {self.threshold:.3g}",
            f"  skipped: {self.skipped} steps; non-finite since start: {self.nonfinite_total}",
            f"  pre-clip norm: {pct}",
        ]
        lines += [f"  - {sentence}" for sentence in self.advice]
        if self.attributions:
            lines.append("  where the outlier, skipped and non-finite steps' gradient norm was:")
            lines += [f"    {line}" for line in describe(self.attributions)]
        return "\n".join(lines)


def _unroll(history: Tensor, total_steps: int, first_step: int = 0) -> tuple[list[int], Tensor]:
    """The ring buffer's rows in step order, and their 0-based step numbers. ``first_step``:
    the first step the buffer recorded (a buffer created or resized at a checkpoint load holds
    nothing of the steps before it)."""
    size = history.shape[0]
    begin = max(first_step, total_steps - size)
    order = [k % size for k in range(begin, total_steps)]
    return list(range(begin, total_steps)), history[order]


def clip_report(optimizer: Any, window: int | None = None, named_parameters: Any = None) -> ClipReport:
    """Summarise the recorded history of ``optimizer`` (one device-to-host copy).

    Args:
        optimizer: a :class:`~clipped_optim.ClippedOptimizer`.
        window: the number of most recent steps to cover (default: all the history holds,
            i.e. up to ``history_size``).
        named_parameters: ``model.named_parameters()`` or a ``{name: parameter}`` map, to name
            the parameters in the attributions (default: the names the optimizer was given,
            see :meth:`~clipped_optim.ClippedOptimizer.name_parameters`; else index and shape).
    """
    state = _clip_state(optimizer)
    params = [p for g in getattr(optimizer, "param_groups", ()) for p in g["params"]]
    names = state.get("param_names") if named_parameters is None else names_in_order(params, named_parameters)
    shapes = [tuple(p.shape) for p in params] if params else state.get("param_shapes")
    return state_report(state, window, names, shapes)


def state_report(
    state: dict[str, Any],
    window: int | None = None,
    names: Any = None,
    shapes: Any = None,
) -> ClipReport:
    """:func:`clip_report` of a clip state alone (``optimizer.state["clip"]``, or the one of a
    checkpoint): ``names``/``shapes`` describe the parameters in optimizer order."""
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ValueError(f"clip_report: invalid window={window!r}; expected a positive number of steps")
    counters = torch.stack([state[k].to(torch.float64) for k in _stats.COUNTERS])
    history = state.get("history")
    if history is None:  # counters only: the figures cover every step since the start
        total, clipped, skipped, nonfinite = (int(v) for v in counters.tolist())
        return _counters_only_report(state["mode"], total, clipped, skipped, nonfinite)
    start = state.get("history_start", torch.zeros((), dtype=torch.int64, device=counters.device))
    counters = torch.cat([counters, start.to(counters).view(1)])
    flat = torch.cat([counters, history.detach().to(torch.float64).flatten()]).cpu()  # the one sync
    total, _, _, nonfinite_total, first = (int(v) for v in flat[: len(counters)])
    steps, rows = _unroll(flat[len(counters) :].view(history.shape), total, first)
    if window is not None:
        steps, rows = steps[-window:], rows[-window:]
    base = len(_stats.HISTORY_COLUMNS)
    norms, thresholds, coefs, skip_flags = rows[:, :base].unbind(1)
    finite = torch.isfinite(norms)
    clipped_mask = (coefs < 1) & finite
    percentiles = _percentiles(norms[finite])
    threshold = float(thresholds[finite].median()) if bool(finite.any()) else math.nan
    report = ClipReport(
        mode=state["mode"],
        total_steps=total,
        window=len(steps),
        clipped=int(clipped_mask.sum()),
        clipped_fraction=float(clipped_mask.double().mean()) if steps else 0.0,
        skipped=int(skip_flags.sum()),
        nonfinite_total=nonfinite_total,
        percentiles=percentiles,
        threshold=threshold,
        advice=[],
        steps=steps,
        norms=norms.tolist(),
        thresholds=thresholds.tolist(),
        coefs=coefs.tolist(),
        skipped_mask=(skip_flags > 0).tolist(),
    )
    report.advice = advise(report)
    report.attributions = _attributions(report, rows[:, base:], names, shapes)
    return report


def _attributions(report: ClipReport, top: Tensor, names: Any, shapes: Any) -> list[Attribution]:
    """The parameters behind the report's outlier, skipped and non-finite steps; without
    attribution recorded (``top_k=0``), a sentence of advice when there are such steps."""
    k = top.shape[1] // 2
    if not report.steps:
        return []
    median = report.percentiles.get(50, math.nan)
    limit = OUTLIER_FACTOR * median if median > 0 else math.inf
    spike_bound = report.threshold if report.mode == "zclip" else None
    positions = explained_steps(report.norms, report.coefs, report.thresholds, report.skipped_mask, limit, spike_bound)
    if k == 0:
        if positions and report.window >= MIN_STEPS:
            report.advice.append(
                f"{len(positions)} outlier, skipped or non-finite steps were recorded without the parameters "
                "that carried their norm: construct the optimizer with top_k=3 to keep them (two small ops "
                "a step), and report(model.named_parameters()) names them."
            )
        return []
    return attribute(
        report.steps,
        report.norms,
        report.skipped_mask,
        top[:, :k].tolist(),
        top[:, k:].tolist(),
        positions,
        lambda i: parameter_label(i, names, shapes),
    )


def _percentiles(norms: Tensor) -> dict[int, float]:
    if norms.numel() == 0:
        return {}
    qs = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=norms.dtype)
    return dict(zip((50, 90, 99, 100), torch.quantile(norms, qs).tolist()))


def _counters_only_report(mode: str, total: int, clipped: int, skipped: int, nonfinite: int) -> ClipReport:
    report = ClipReport(
        mode=mode,
        total_steps=total,
        window=total,
        clipped=clipped,
        clipped_fraction=clipped / total if total else 0.0,
        skipped=skipped,
        nonfinite_total=nonfinite,
        percentiles={},
        threshold=math.nan,
        advice=[],
    )
    report.advice = ["No norm history is kept (history_size=0): only the counters are reported."]
    report.advice += advise(report)
    return report


def advise(report: ClipReport) -> list[str]:
    """The findings of a report as plain sentences (the rules are the module constants)."""
    if report.window < MIN_STEPS:
        return [f"Only {report.window} steps recorded: too few to judge the threshold (need {MIN_STEPS})."]
    advice = [_activity(report)]
    stream = _outlier_stream(report)
    if stream:
        advice.append(stream)
    if report.skipped:
        advice.append(
            f"{report.skipped} steps were skipped (non-finite gradients, a GradScaler overflow, or a "
            "spike the mode chose to skip). Under a GradScaler a few early skips calibrate the scale; "
            "more than that points at overflow (fp16), log(0) or a division by zero in the loss."
        )
    return advice


def _activity(r: ClipReport) -> str:
    share = f"{100 * r.clipped_fraction:.1f}% of the last {r.window} steps"
    p = r.percentiles
    if r.clipped_fraction <= RARELY:
        if r.clipped and p and p[100] > 5 * p[50]:
            return (
                f"Clipping was active on {share} ({r.clipped} steps), and the largest norm was "
                f"{p[100] / p[50]:.0f}x the median: it caught rare outliers and left the other steps "
                "alone, which is what a safety-net threshold is for."
            )
        top = f" (the largest norm was {p[100]:.3g}, the p99 {p[99]:.3g})" if p else ""
        return (
            f"Clipping was almost never active ({share}): the threshold {r.threshold:.3g} is above "
            f"nearly every norm{top}. Either it is too high to matter, or this run does not need "
            "clipping; a threshold near the p99 of the norms would cut only the outliers."
        )
    if r.clipped_fraction >= MOSTLY:
        median = f" (median norm {p[50]:.3g})" if p else ""
        suggest = f" to about the p90 of the norms ({p[90]:.3g})" if p else ""
        return (
            f"Clipping was active on {share}: the threshold {r.threshold:.3g} is below the typical "
            f"norm{median}, so nearly every update is rescaled. That throws away the gradient's size "
            f"and acts as a hidden learning-rate cut; raise the threshold{suggest}."
        )
    return f"Clipping was active on {share}: the threshold {r.threshold:.3g} sits inside the range of norms seen."


def _outlier_stream(r: ClipReport) -> str | None:
    """A sentence when large norms keep coming (both halves of the window), else None."""
    if not r.percentiles or r.percentiles[50] <= 0:
        return None
    limit = OUTLIER_FACTOR * r.percentiles[50]
    big = [n > limit or not math.isfinite(n) for n in r.norms]
    half = len(big) // 2
    count = sum(big)
    if count / len(big) <= STREAM or not any(big[:half]) or not any(big[half:]):
        return None
    return (
        f"{count} of the last {r.window} steps ({100 * count / len(big):.1f}%) had norms over "
        f"{OUTLIER_FACTOR:g}x the median ({limit:.3g}), spread across the window. A steady stream of "
        "large gradients usually comes from the data pipeline (corrupt or mislabelled samples, "
        "unnormalised inputs, padding counted in the loss) or from the initialisation or learning "
        "rate: look there rather than clipping harder."
    )


def plot_history(source: Any, ax: Any = None, path: str | None = None, title: str | None = None) -> Any:
    """Draw the pre-clip norm history with the threshold; clipped and skipped steps marked, and
    the first step of each attribution labelled with its top contributor.

    Args:
        source: a :class:`ClipReport`, or a ClippedOptimizer (its full history is used).
        ax: a matplotlib ``Axes`` to draw on (default: a new figure).
        path: if given, the figure is saved there (PNG, SVG, ... by extension).
        title: the axes title (default: the mode and the clip rate).

    Returns:
        The ``Axes``.
    """
    import matplotlib.pyplot as plt  # optional dependency: only this function needs it

    report = source if isinstance(source, ClipReport) else clip_report(source)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(report.steps, report.norms, lw=0.9, color="tab:blue", label="pre-clip grad norm")
    ax.plot(report.steps, report.thresholds, lw=1.2, ls="--", color="black", label="threshold")
    clipped = [(s, n) for s, n, c in zip(report.steps, report.norms, report.coefs) if c < 1 and math.isfinite(n)]
    if clipped:
        ax.scatter(*zip(*clipped), s=14, color="tab:red", zorder=3, label="clipped")
    skipped = [s for s, k in zip(report.steps, report.skipped_mask) if k]
    for i, s in enumerate(skipped):
        ax.axvline(s, color="tab:purple", alpha=0.4, lw=1, label="skipped" if i == 0 else None)
    _mark_attributions(ax, report)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm")
    ax.set_title(title or f"mode={report.mode!r}: {100 * report.clipped_fraction:.1f}% of steps clipped")
    ax.legend(loc="upper right", fontsize=8)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


def _mark_attributions(ax: Any, report: ClipReport) -> None:
    """Label the first step of each attribution (up to the report's printed ones) with its
    top contributor; a non-finite step is marked at the top of the finite norms."""
    finite = [n for n in report.norms if math.isfinite(n)]
    top = max(finite) if finite else 1.0
    where = dict(zip(report.steps, report.norms))
    for i, a in enumerate(report.attributions[:MAX_MARKED]):
        step = a.steps[0]
        y = where.get(step, top)
        y = y if math.isfinite(y) and y > 0 else top
        text = (a.labels[0] if a.labels else "?") + (" (NaN/Inf)" if a.nonfinite else "")
        ax.scatter(
            [s for s in a.steps if s in where],
            [where[s] if math.isfinite(where[s]) else top for s in a.steps if s in where],
            marker="x",
            s=24,
            color="tab:orange",
            zorder=4,
            label="attributed" if i == 0 else None,
        )
        ax.annotate(text, (step, y), xytext=(4, 6), textcoords="offset points", fontsize=7, color="tab:orange")


#: At most this many attributions are labelled on a plot.
MAX_MARKED = 10
