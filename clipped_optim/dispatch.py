"""The table from ``mode=`` to the pure function that clips: the wrapper's only link to the modes.

The fixed modes are a table of functions with the signature ``(config, batch, grad_scale, apply,
device, clip_state, gate) -> ClipResult``; a policy (the adaptive modes, a user's own) runs
through :func:`clipped_optim.policy.run_policy`, which reads its state from ``clip_state`` (the
step's pending copy of ``optimizer.state["clip"]``) and writes the accepted new state back there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import modes
from .config import ClipConfig
from .modes import ClipResult, Gate
from .norms import GradBatch
from .policy import on_host, run_policy

__all__ = ["run_mode", "SCALAR_MODES", "is_scalar"]

Runner = Callable[..., ClipResult]


def _norm(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    assert cfg.max_norm is not None  # ClipConfig requires it for this mode
    return modes.clip_grad_norm(
        batch,
        cfg.max_norm,
        cfg.norm_type,
        grad_scale=grad_scale,
        apply=apply,
        device=device,
        gate=gate,
        host=on_host(device),
    )


def _per_param(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    assert cfg.max_norm is not None  # ClipConfig requires it for this mode
    return modes.clip_grad_norm_per_param(
        batch, cfg.max_norm, cfg.norm_type, grad_scale=grad_scale, device=device, gate=gate
    )


def _value(
    cfg: ClipConfig, batch: GradBatch, grad_scale, apply: bool, device, clip_state, gate: Gate | None = None
) -> ClipResult:
    assert cfg.clip_value is not None  # ClipConfig requires it for this mode
    return modes.clip_grad_value(batch, cfg.clip_value, cfg.norm_type, grad_scale=grad_scale, device=device, gate=gate)


_RUNNERS: dict[str, Runner] = {
    "norm": _norm,
    "per_param": _per_param,
    "value": _value,
}

#: Fixed modes whose decision is one scalar coefficient: only those can honour ``apply=False``
#: and be folded into a fused kernel's ``grad_scale``; a policy says so itself (``is_scalar``).
SCALAR_MODES = frozenset({"norm"})


def is_scalar(cfg: ClipConfig) -> bool:
    """Whether ``cfg``'s mode clips with one scalar coefficient (see SCALAR_MODES)."""
    return cfg.mode in SCALAR_MODES if cfg.policy is None else cfg.policy.is_scalar()


def run_mode(
    cfg: ClipConfig,
    batch: GradBatch,
    grad_scale: Tensor | None,
    apply: bool,
    device: torch.device,
    clip_state: dict[str, Any],
    gate: Gate | None = None,
) -> ClipResult:
    """Run ``cfg``'s mode. Its state is read from and written to ``clip_state``; ``gate`` (see
    :data:`clipped_optim.modes.Gate`) is asked, once the mode has measured, whether the
    gradients must be left as they are."""
    if cfg.policy is not None:
        return run_policy(
            cfg.policy, cfg.policy_keys, cfg.norm_type, batch, grad_scale, apply, device, clip_state, gate
        )
    return _RUNNERS[cfg.mode](cfg, batch, grad_scale, apply, device, clip_state, gate)  # type: ignore[index]
