"""Constructor arguments, checked once so that bad input fails at construction, not at step 100.

The adaptive modes' options are fields of their policy objects (:mod:`clipped_optim.adaptive`),
validated there; the keyword arguments they replaced are refused here with the object form.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import _checks as check
from .adaptive import POLICIES, AutoClip, SpikeSkip, ZClip
from .distributed import check_process_group
from .policy import ClipPolicy, state_keys
from .stats import new_clip_state

__all__ = ["ClipConfig", "MODES", "FIXED_MODES", "NONFINITE_POLICIES", "DEFAULT_MAX_NORM", "moved_option"]

FIXED_MODES = ("norm", "value", "per_param")
MODES = FIXED_MODES + tuple(POLICIES)
NONFINITE_POLICIES = ("skip", "raise", "propagate")
#: The modes that read ``max_norm``.
MAX_NORM_MODES = ("norm", "per_param")
_OWNER = "ClippedOptimizer"


class _DefaultMaxNorm(float):
    """``max_norm``'s default, 1.0, told apart from a 1.0 the user passed: a mode that does not
    read ``max_norm`` rejects an explicit one, as it rejects every other option it ignores."""

    def __repr__(self) -> str:
        return "1.0"

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (1.0,))


DEFAULT_MAX_NORM: float = _DefaultMaxNorm(1.0)


def _fail(arg: str, value: Any, allowed: str) -> ValueError:
    return check.fail(_OWNER, arg, value, allowed)


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    if not check.is_real(value) or math.isnan(value) or value <= 0:
        raise _fail("norm_type", value, "expected a number > 0, or float('inf') for the max-norm")
    return float(value)


def _reserved() -> frozenset[str]:
    """The keys of ``optimizer.state["clip"]`` that belong to the statistics."""
    return frozenset(new_clip_state("norm", torch.device("meta"), 1)) | {"param_names", "param_shapes"}


@dataclass(frozen=True)
class ClipConfig:
    """The validated clipping options of one :class:`ClippedOptimizer`.

    ``mode`` is given as a name or a :class:`~clipped_optim.policy.ClipPolicy` and kept as the
    name (``optimizer.state["clip"]["mode"]``); ``policy`` is the policy object (``None`` for
    the fixed modes), ``skip`` that of ``skip_spikes`` (``None``: off), and ``policy_keys`` /
    ``skip_keys`` the keys of their state.
    """

    mode: str | ClipPolicy = "norm"
    max_norm: float | None = DEFAULT_MAX_NORM
    norm_type: float = 2.0
    clip_value: float | None = None
    nonfinite: str = "skip"
    foreach: bool | None = None
    history_size: int = 1000  # ring buffer of per-step norms for clipped_optim.diagnostics; 0: none
    #: how many of each step's largest parameter norms the history keeps (attribution); 0: none
    top_k: int = 0
    #: Distributed: the group over which each rank's gradients are slices of the whole
    #: (see clipped_optim.distributed); None for DDP, FSDP2 and single-process training.
    process_group: Any = None
    flat_grads: bool = False
    #: ``True`` (SpikeSkip's defaults), a policy that returns ``skip``, or ``False``
    skip_spikes: bool | ClipPolicy = False
    policy: ClipPolicy | None = field(default=None, init=False)
    skip: ClipPolicy | None = field(default=None, init=False)
    policy_keys: tuple[str, ...] = field(default=(), init=False)
    skip_keys: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door, once
        policy = _policy(self.mode)
        set_(self, "policy", policy)
        set_(self, "mode", self.mode if policy is None else policy.name)
        check.choice(_OWNER, "nonfinite", self.nonfinite, NONFINITE_POLICIES)
        self._max_norm()
        set_(self, "norm_type", _norm_type(self.norm_type))
        if self.mode == "value":
            if self.clip_value is None:
                raise _fail("clip_value", None, "mode='value' needs clip_value, a positive finite number")
            set_(self, "clip_value", check.positive_finite(_OWNER, "clip_value", self.clip_value))
        elif self.clip_value is not None:
            raise _fail(
                "clip_value", self.clip_value, f"clip_value is only used with mode='value', not mode={self.mode!r}"
            )
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise _fail("foreach", self.foreach, "expected True, False or None (pick per device)")
        set_(
            self,
            "history_size",
            check.positive_int(_OWNER, "history_size", self.history_size, 0, " (0 keeps no history)"),
        )
        set_(self, "top_k", check.positive_int(_OWNER, "top_k", self.top_k, 0, " (0 records no attribution)"))
        check_process_group(self.process_group)
        check.flag(_OWNER, "flat_grads", self.flat_grads)
        skip = _skip_policy(self.skip_spikes)
        set_(self, "skip", skip)
        set_(self, "skip_spikes", skip is not None)
        reserved = _reserved()
        if policy is not None:
            set_(self, "policy_keys", state_keys(policy, reserved))
        if skip is not None:
            set_(self, "skip_keys", state_keys(skip, reserved | set(self.policy_keys)))

    @property
    def mode_name(self) -> str:
        """The mode's name (``mode`` is normalised to it; typed for the checker)."""
        return self.mode if isinstance(self.mode, str) else self.mode.name

    def _max_norm(self) -> None:
        if self.mode not in MAX_NORM_MODES and self.max_norm is not DEFAULT_MAX_NORM:
            if self.mode == "zclip":
                raise TypeError(_moved_message({"max_norm": self.max_norm}, ZClip, "mode"))
            readers = ", ".join(map(repr, MAX_NORM_MODES))
            raise _fail(
                "max_norm", self.max_norm, f"max_norm is only used with mode in ({readers}), not mode={self.mode!r}"
            )
        if self.mode in MAX_NORM_MODES:
            object.__setattr__(self, "max_norm", check.positive_finite(_OWNER, "max_norm", self.max_norm))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ClipConfig:
        known = {f.name for f in fields(cls) if f.init}
        moved = {name: value for name, value in kwargs.items() if name not in known and name in _MOVED}
        if moved:
            raise TypeError(moved_option(moved, kwargs.get("mode")))
        for name in kwargs:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise TypeError(
                    f"ClippedOptimizer got an unexpected keyword argument {name!r}{did_you_mean}; "
                    f"allowed: {', '.join(sorted(known))}"
                )
        return cls(**kwargs)


def _policy(mode: Any) -> ClipPolicy | None:
    if isinstance(mode, SpikeSkip):
        raise _fail("mode", mode, "SpikeSkip skips steps, it does not clip: pass it as skip_spikes=")
    if isinstance(mode, ClipPolicy):
        if mode.name in FIXED_MODES:
            raise _fail("mode", mode, f"a policy's name must not be that of a fixed mode ({', '.join(FIXED_MODES)})")
        return mode
    if isinstance(mode, type) and issubclass(mode, ClipPolicy):
        raise _fail("mode", mode, f"expected an instance: mode={mode.__name__}()")
    if isinstance(mode, str) and mode in POLICIES:
        return POLICIES[mode]()  # the mode with its defaults
    check.choice(_OWNER, "mode", mode, MODES)
    return None


def _skip_policy(value: Any) -> ClipPolicy | None:
    if value is True:
        return SpikeSkip()
    if value is False or value is None:
        return None
    if isinstance(value, ClipPolicy):
        return value
    raise _fail("skip_spikes", value, "expected True (SpikeSkip's defaults), False, or a policy: SpikeSkip(sigma=5)")


# ---------------------------------------------------------------------------------------------
# The per-mode keyword arguments of 0.1, now fields of the policy objects
# ---------------------------------------------------------------------------------------------
#: old keyword -> (the classes that have it, in order of preference; its field name there)
_MOVED: dict[str, tuple[tuple[type[ClipPolicy], ...], str]] = {
    "clip_factor": ((POLICIES["agc"], ZClip), "clip_factor"),
    "eps": ((POLICIES["agc"],), "eps"),
    "quantile": ((AutoClip,), "quantile"),
    "history_length": ((AutoClip,), "history_length"),
    "per_param": ((AutoClip,), "per_param"),
    "alpha": ((ZClip,), "alpha"),
    "z_thresh": ((ZClip,), "z_thresh"),
    "warmup_steps": ((ZClip,), "warmup_steps"),
    "clip_option": ((ZClip,), "clip_option"),
    "skip_update_on_spike": ((ZClip,), "skip_update_on_spike"),
    "spike_sigma": ((SpikeSkip,), "sigma"),
    "spike_window": ((SpikeSkip,), "window"),
}


def moved_option(moved: dict[str, Any], mode: Any) -> str:
    """The error for 0.1's per-mode keyword arguments: which object each moved to, written out."""
    spikes = {k: v for k, v in moved.items() if _MOVED[k][0] == (SpikeSkip,)}
    rest = {k: v for k, v in moved.items() if k not in spikes}
    parts = []
    if rest:
        first = _MOVED[next(iter(rest))][0]
        owner = next((c for c in first if isinstance(mode, str) and c.name == mode), first[0])
        if isinstance(mode, ClipPolicy):
            owner = type(mode)
        parts.append(_moved_message(rest, owner, "mode"))
    if spikes:
        parts.append(_moved_message(spikes, SpikeSkip, "skip_spikes"))
    return "; ".join(parts)


def _moved_message(moved: dict[str, Any], owner: type[ClipPolicy], arg: str) -> str:
    names = ", ".join(f"{k}=" for k in moved)
    fields_ = ", ".join(f"{_MOVED.get(k, ((), k))[1]}={v!r}" for k, v in moved.items())
    return (
        f"ClippedOptimizer: {names} moved into the policy object: use {arg}=clipped_optim.{owner.__name__}({fields_})"
    )
