"""Which parameters carried an outlier step's gradient norm: read from the history, on the host.

Every step, the recorder writes the ``top_k`` largest parameter gradient norms and those
parameters' indices into the step's history row (see :mod:`clipped_optim.stats`). A report
picks the steps worth explaining and groups them here:

* the outliers of the report's own rule (a finite norm over ``OUTLIER_FACTOR`` times the
  window's median, see :mod:`clipped_optim.diagnostics`),
* the skipped steps (NaN/Inf, a GradScaler overflow, a spike a mode chose to skip),
* the non-finite steps, and, under ZClip, its spikes: the steps it clipped to a bound below
  its usual one (the ``max_norm`` cap), not those clipped at the cap.

A finite step's contributors are given with their share of the squared norm,
``top_norm**2 / grad_norm**2`` (for the default 2-norm, the shares of all parameters sum to 1).
A NaN sorts above every number in ``topk`` and inf above the finite ones, so a non-finite
step's recorded parameters are those that held NaN/Inf first; when all ``top_k`` of them are
non-finite, there may be more than were recorded, and the text says so.

Consecutive explained steps (consecutive among them, whatever lies between) with the same
finding are one :class:`Attribution`: ``steps 105, 165, 225: 97% of the squared norm in
tok_emb.weight (next: lm_head.weight 2%)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Attribution", "attribute", "explained_steps", "describe", "parameter_label", "MAX_LINES"]

#: At most this many attributions are printed by a report; the rest are counted.
MAX_LINES = 10
#: At most this many steps are listed in one line; the rest are counted.
MAX_STEPS_SHOWN = 6


@dataclass
class Attribution:
    """One run of explained steps with the same finding.

    Attributes:
        steps: the 0-based step numbers.
        nonfinite: whether the steps' norms were NaN/Inf.
        params: parameter indices in optimizer order: for finite steps the top contributor
            and, when the same at every step, the next one; for non-finite steps those
            recorded with a NaN/Inf norm (empty: none alone was, or nothing was recorded).
        labels: each of ``params`` as a name, or as index and shape.
        shares: for finite steps, each of ``params``'s mean share of the squared norm.
        low, high: the lowest and highest share of the top contributor over the steps.
        complete: for non-finite steps, False when every recorded contributor was NaN/Inf,
            so more parameters may have been.
        recorded: False when the steps' rows hold no contributors (sharded gradients, or a
            history loaded from a checkpoint written without them).
        skipped: how many of the steps were skipped.
        together: for finite steps, the lowest and highest share of all the recorded
            contributors together (the ``top_k`` of each step), and ``top_k``.
    """

    steps: list[int]
    nonfinite: bool
    params: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    low: float = math.nan
    high: float = math.nan
    complete: bool = True
    recorded: bool = True
    skipped: int = 0
    together: tuple[float, float, int] = (math.nan, math.nan, 0)

    def __str__(self) -> str:
        return f"{_steps_text(self.steps, self.skipped)}: {self._finding()}"

    def _finding(self) -> str:
        if not self.recorded:
            return "no parameter norms recorded for these steps"
        if self.nonfinite:
            if not self.params:
                return "non-finite total norm, but no parameter's own norm was NaN/Inf (an overflow in the sum)"
            more = "" if self.complete else f" (and perhaps others: only {len(self.params)} recorded)"
            return f"non-finite gradient norm in {', '.join(self.labels)}{more}"
        low, high = _pct(self.low), _pct(self.high)
        share = low if low == high else f"{low[:-1]}-{high}"
        text = f"{share} of the squared norm in {self.labels[0]}"
        if len(self.params) > 1 and _pct(self.shares[1]) != "0%":  # a 0% runner-up says nothing
            text += f" (next: {self.labels[1]} {_pct(self.shares[1])})"
        elif self.together[2] > 1 and len(self.steps) > 1:  # the runners-up differ: how much the top k hold
            low, high, k = _pct(self.together[0]), _pct(self.together[1]), self.together[2]
            text += f" (the top {k} of each step together: {low if low == high else low[:-1] + '-' + high})"
        return text


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def _steps_text(steps: Sequence[int], skipped: int) -> str:
    shown = [str(s) for s in steps[:MAX_STEPS_SHOWN]]
    if len(steps) > MAX_STEPS_SHOWN:
        shown.append(f"... {steps[-1]} ({len(steps)} steps)")
    head = ("step " if len(steps) == 1 else "steps ") + ", ".join(shown)
    if skipped:
        head += " (skipped)" if skipped == len(steps) else f" ({skipped} skipped)"
    return head


def explained_steps(
    norms: Sequence[float],
    coefs: Sequence[float],
    thresholds: Sequence[float],
    skipped: Sequence[bool],
    limit: float,
    spike_bound: float | None = None,
) -> list[int]:
    """The positions of the steps a report explains (see the module's docstring).

    Args:
        limit: the norm above which a finite step is an outlier.
        spike_bound: under ZClip, its usual bound (the window's median threshold: the
            ``max_norm`` cap, or inf): a step clipped to a bound below it was clipped by the
            z-score rule, a spike; one clipped at the cap was not.
    """
    out = []
    for i, (norm, coef, bound, skip) in enumerate(zip(norms, coefs, thresholds, skipped)):
        spike = spike_bound is not None and coef < 1 and bound < spike_bound * (1 - 1e-6)
        if skip or not math.isfinite(norm) or norm > limit or spike:
            out.append(i)
    return out


def attribute(
    steps: Sequence[int],
    norms: Sequence[float],
    skipped: Sequence[bool],
    top_norms: Sequence[Sequence[float]],
    top_index: Sequence[Sequence[float]],
    positions: Sequence[int],
    label: Callable[[int], str],
) -> list[Attribution]:
    """The findings at ``positions`` (rows of the window), consecutive equal ones merged."""
    out: list[Attribution] = []
    last_key: tuple = ()
    for i in positions:
        found = _one(norms[i], top_norms[i], top_index[i])
        key = (found[0], tuple(found[1][:1] if not found[0] else found[1]), found[3])
        if out and key == last_key:
            _merge(out[-1], found, steps[i], skipped[i])
        else:
            out.append(_start(found, steps[i], skipped[i]))
        last_key = key
    for a in out:
        a.labels = [label(p) for p in a.params]
    return out


def _start(found: tuple, step: int, skipped: bool) -> Attribution:
    """A run of one step."""
    nonfinite, params, shares, recorded, complete, (together, count) = found
    share = shares[0] if shares else math.nan
    return Attribution(
        steps=[step],
        nonfinite=nonfinite,
        params=list(params),
        shares=list(shares),
        low=share,
        high=share,
        complete=complete,
        recorded=recorded,
        skipped=int(skipped),
        together=(together, together, count),
    )


def _one(norm: float, top_norms: Sequence[float], top_index: Sequence[float]) -> tuple:
    """One step: ``(nonfinite, params, shares, recorded, complete, (together, count))``."""
    entries = [(int(j), v) for j, v in zip(top_index, top_norms) if j >= 0]
    if not entries:
        return (not math.isfinite(norm), [], [], False, True, (math.nan, 0))
    if not math.isfinite(norm):
        bad = [j for j, v in entries if not math.isfinite(v)]
        return (True, bad, [], True, len(bad) < len(top_index), (math.nan, 0))
    total = norm * norm
    shares = [v * v / total if total > 0 else 0.0 for _, v in entries]
    return (False, [j for j, _ in entries][:2], shares[:2], True, True, (sum(shares), len(shares)))


def _merge(run: Attribution, found: tuple, step: int, skipped: bool) -> None:
    """Add one step's finding to ``run`` (same top contributor): the next contributor is kept
    only while it is the same at every step, and the shares are averaged."""
    nonfinite, params, shares, _, complete, (together, count) = found
    n = len(run.steps)
    run.steps.append(step)
    run.skipped += int(skipped)
    run.complete = run.complete and complete
    if nonfinite:
        return
    run.low, run.high = min(run.low, shares[0]), max(run.high, shares[0])
    low, high, k = run.together
    run.together = (min(low, together), max(high, together), min(k, count))
    if len(run.params) > 1 and (len(params) < 2 or params[1] != run.params[1]):
        run.params, run.shares = run.params[:1], run.shares[:1]
    run.shares = [(s * n + new) / (n + 1) for s, new in zip(run.shares, shares)]


def describe(attributions: Sequence[Attribution], limit: int = MAX_LINES) -> list[str]:
    """One line per attribution, at most ``limit``, then how many more there are."""
    lines = [str(a) for a in attributions[:limit]]
    if len(attributions) > limit:
        lines.append(f"and {len(attributions) - limit} more runs of steps")
    return lines


def parameter_label(index: int, names: Sequence[str | None] | None, shapes: Sequence[Sequence[int]] | None) -> str:
    """A parameter as its name, else as its index in optimizer order and its shape."""
    if names is not None and index < len(names) and names[index]:
        return str(names[index])
    if shapes is not None and index < len(shapes):
        return f"param #{index} ({'x'.join(str(d) for d in shapes[index]) or 'scalar'})"
    return f"param #{index}"
