"""Constructor arguments, checked once so that bad input fails at construction, not at step 100."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from .distributed import check_process_group

__all__ = ["ClipConfig", "MODES", "NONFINITE_POLICIES", "ADAPTIVE_DEFAULTS", "DEFAULT_MAX_NORM"]

MODES = ("norm", "value", "per_param", "agc", "autoclip", "zclip")
NONFINITE_POLICIES = ("skip", "raise", "propagate")
#: The modes that read ``max_norm`` (ZClip as the cap on its bound).
MAX_NORM_MODES = ("norm", "per_param", "zclip")


class _DefaultMaxNorm(float):
    """``max_norm``'s default, 1.0, told apart from a 1.0 the user passed: a mode that does not
    read ``max_norm`` rejects an explicit one, as it rejects every other option it ignores."""

    def __repr__(self) -> str:
        return "1.0"

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (1.0,))


DEFAULT_MAX_NORM: float = _DefaultMaxNorm(1.0)


def _fail(arg: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ClippedOptimizer: invalid {arg}={value!r}; {allowed}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_finite(arg: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise _fail(arg, value, "expected a positive finite number")
    return float(value)


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    if not _is_real(value) or math.isnan(value) or value <= 0:
        raise _fail("norm_type", value, "expected a number > 0, or float('inf') for the max-norm")
    return float(value)


def _choice(arg: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(arg, value, f"expected one of {', '.join(map(repr, allowed))}")
    return value


@dataclass(frozen=True)
class ClipConfig:
    """The validated clipping options of one :class:`ClippedOptimizer`."""

    mode: str = "norm"
    max_norm: float | None = DEFAULT_MAX_NORM
    norm_type: float = 2.0
    clip_value: float | None = None
    nonfinite: str = "skip"
    foreach: bool | None = None
    history_size: int = 1000  # ring buffer of per-step norms for clipped_optim.diagnostics; 0: none
    #: Distributed: the group over which each rank's gradients are slices of the whole
    #: (see clipped_optim.distributed); None for DDP, FSDP2 and single-process training.
    process_group: Any = None
    flat_grads: bool = False
    # -- adaptive modes (clipped_optim.adaptive): None = the mode's default, see ADAPTIVE_DEFAULTS
    clip_factor: float | None = None
    eps: float | None = None
    quantile: float | None = None
    history_length: int | None = None
    per_param: bool | None = None
    alpha: float | None = None
    z_thresh: float | None = None
    warmup_steps: int | None = None
    clip_option: str | None = None
    skip_update_on_spike: bool | None = None
    skip_spikes: bool = False
    spike_sigma: float | None = None
    spike_window: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door, once
        _choice("mode", self.mode, MODES)
        _choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.mode not in MAX_NORM_MODES and self.max_norm is not DEFAULT_MAX_NORM:
            readers = ", ".join(map(repr, MAX_NORM_MODES))
            raise _fail(
                "max_norm", self.max_norm, f"max_norm is only used with mode in ({readers}), not mode={self.mode!r}"
            )
        if self.max_norm is None and self.mode != "zclip":
            raise _fail("max_norm", None, "expected a positive finite number (None, no cap, only with mode='zclip')")
        if self.max_norm is not None:
            set_(self, "max_norm", _positive_finite("max_norm", self.max_norm))
        set_(self, "norm_type", _norm_type(self.norm_type))
        if self.mode == "value":
            if self.clip_value is None:
                raise _fail("clip_value", None, "mode='value' needs clip_value, a positive finite number")
            set_(self, "clip_value", _positive_finite("clip_value", self.clip_value))
        elif self.clip_value is not None:
            raise _fail(
                "clip_value", self.clip_value, f"clip_value is only used with mode='value', not mode={self.mode!r}"
            )
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise _fail("foreach", self.foreach, "expected True, False or None (pick per device)")
        if (
            not isinstance(self.history_size, numbers.Integral)
            or isinstance(self.history_size, bool)
            or self.history_size < 0
        ):
            raise _fail("history_size", self.history_size, "expected an integer >= 0 (0 keeps no history)")
        set_(self, "history_size", int(self.history_size))
        check_process_group(self.process_group)
        if not isinstance(self.flat_grads, bool):
            raise _fail("flat_grads", self.flat_grads, "expected True or False")
        _adaptive_options(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ClipConfig:
        known = {f.name for f in fields(cls)}
        for name in kwargs:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise TypeError(
                    f"ClippedOptimizer got an unexpected keyword argument {name!r}{did_you_mean}; "
                    f"allowed: {', '.join(sorted(known))}"
                )
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Options of the adaptive modes and of spike skipping (clipped_optim.adaptive)
# ---------------------------------------------------------------------------------------------
#: Each adaptive option, the modes that read it and its default there (the reference
#: packages' defaults: timm's AGC, autoclip's QuantileClip, zclip's ZClip; OLMo-core's
#: SkipStepOptimizer for the spike window).
ADAPTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_factor": {"agc": 0.01, "zclip": 1.0},
    "eps": {"agc": 1e-3},
    "quantile": {"autoclip": 0.9},
    "history_length": {"autoclip": 1000},
    "per_param": {"autoclip": False},
    "alpha": {"zclip": 0.97},
    "z_thresh": {"zclip": 2.5},
    "warmup_steps": {"zclip": 25},
    "clip_option": {"zclip": "adaptive_scaling"},
    "skip_update_on_spike": {"zclip": False},
}
ZCLIP_OPTIONS = ("adaptive_scaling", "mean", "percentile")


def _positive_int(arg: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise _fail(arg, value, "expected an integer >= 1")
    return int(value)


def _flag(arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(arg, value, "expected True or False")
    return value


def _open_unit(arg: str, value: Any, lo_closed: bool, hi_closed: bool) -> float:
    ok = _is_real(value) and (value >= 0 if lo_closed else value > 0) and (value <= 1 if hi_closed else value < 1)
    if not ok:
        lo, hi = "[" if lo_closed else "(", "]" if hi_closed else ")"
        raise _fail(arg, value, f"expected a number in {lo}0, 1{hi}")
    return float(value)


_CHECKS = {
    "clip_factor": lambda v: _positive_finite("clip_factor", v),
    "eps": lambda v: _positive_finite("eps", v),
    "quantile": lambda v: _open_unit("quantile", v, True, True),
    "history_length": lambda v: _positive_int("history_length", v),
    "per_param": lambda v: _flag("per_param", v),
    "alpha": lambda v: _open_unit("alpha", v, False, False),
    "z_thresh": lambda v: _positive_finite("z_thresh", v),
    "warmup_steps": lambda v: _positive_int("warmup_steps", v),
    "clip_option": lambda v: _choice("clip_option", v, ZCLIP_OPTIONS),
    "skip_update_on_spike": lambda v: _flag("skip_update_on_spike", v),
}


def _adaptive_options(cfg: ClipConfig) -> None:
    """Fill each adaptive option with its mode's default; reject one the mode does not read."""
    set_ = object.__setattr__
    for name, per_mode in ADAPTIVE_DEFAULTS.items():
        value = getattr(cfg, name)
        if cfg.mode not in per_mode:
            if value is not None:
                users = " or ".join(f"mode={m!r}" for m in per_mode)
                raise _fail(name, value, f"{name} is only used with {users}, not mode={cfg.mode!r}")
            continue
        set_(cfg, name, _CHECKS[name](per_mode[cfg.mode] if value is None else value))
    _flag("skip_spikes", cfg.skip_spikes)
    if cfg.skip_spikes:
        set_(cfg, "spike_sigma", _positive_finite("spike_sigma", 6.0 if cfg.spike_sigma is None else cfg.spike_sigma))
        window = 128 if cfg.spike_window is None else cfg.spike_window
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 3:
            raise _fail("spike_window", window, "expected an integer >= 3 (norms in the rolling window)")
        set_(cfg, "spike_window", int(window))
    else:
        for name in ("spike_sigma", "spike_window"):
            if getattr(cfg, name) is not None:
                raise _fail(name, getattr(cfg, name), f"{name} is only used with skip_spikes=True")
