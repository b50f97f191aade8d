"""``Optimizer.step`` hooks, run as torch runs them, without an idle profiler range.

torch wraps the ``step`` of every ``Optimizer`` subclass (``Optimizer.profile_hook_step``): the
wrapper opens a ``record_function`` range and runs the global and per-optimizer step hooks around
the step. The range is a dispatcher call on every step even when no profiler records; on a small
model it costs about what the whole clip adds (the wrapper would pay it twice: for itself and for
the inner optimizer). :func:`run_hooked` runs the same hooks in the same order and opens the same
range only while a profiler records.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["run_hooked", "step_inner"]


def run_hooked(opt: Optimizer, step: Callable[..., Any], closure: Callable[[], Any] | None) -> Any:
    """``step(opt, closure)`` between ``opt``'s step hooks, as ``profile_hook_step`` runs them:
    global then per-optimizer pre hooks (each may replace the arguments), the step, then
    per-optimizer then global post hooks; inside the profiler range only under a profiler."""
    if torch.autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(opt).__name__}.step"):
            return _hooked(opt, step, closure)
    return _hooked(opt, step, closure)


def _hooked(opt: Optimizer, step: Callable[..., Any], closure: Callable[[], Any] | None) -> Any:
    args: tuple[Any, ...] = (opt,) if closure is None else (opt, closure)
    kwargs: dict[str, Any] = {}
    for pre_hook in itertools.chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    out = step(*args, **kwargs)
    opt._optimizer_step_code()
    for post_hook in itertools.chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(opt, args, kwargs)
    return out


def step_inner(inner: Optimizer, closure: Callable[[], Any] | None) -> Any:
    """``inner.step(closure)``, through :func:`run_hooked` where that is the same call: the class's
    step is torch's hooked wrapper and nothing patched the instance (an LR scheduler built on the
    inner optimizer wraps ``inner.step`` to note the call: that one is called as it is)."""
    hooked = type(inner).step
    unwrapped = getattr(hooked, "__wrapped__", None)
    if unwrapped is None or not getattr(hooked, "hooked", False) or "step" in inner.__dict__:
        return inner.step() if closure is None else inner.step(closure)
    return run_hooked(inner, unwrapped, closure)
