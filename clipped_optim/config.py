"""Constructor arguments, checked once so that bad input fails at construction, not at step 100."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from .distributed import check_process_group

__all__ = ["ClipConfig", "MODES", "NONFINITE_POLICIES"]

MODES = ("norm", "value", "per_param")
NONFINITE_POLICIES = ("skip", "raise", "propagate")


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
    max_norm: float = 1.0
    norm_type: float = 2.0
    clip_value: float | None = None
    nonfinite: str = "skip"
    foreach: bool | None = None
    history_size: int = 1000  # ring buffer of per-step norms for clipped_optim.diagnostics; 0: none
    #: Distributed: the group over which each rank's gradients are slices of the whole
    #: (see clipped_optim.distributed); None for DDP, FSDP2 and single-process training.
    process_group: Any = None
    flat_grads: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door, once
        _choice("mode", self.mode, MODES)
        _choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        set_(self, "max_norm", _positive_finite("max_norm", self.max_norm))
        set_(self, "norm_type", _norm_type(self.norm_type))
        if self.mode == "value":
            if self.clip_value is None:
                raise _fail("clip_value", None, "mode='value' needs clip_value, a positive finite number")
            set_(self, "clip_value", _positive_finite("clip_value", self.clip_value))
        elif self.clip_value is not None:
            raise _fail("clip_value", self.clip_value, f"clip_value is only used with mode='value', not mode={self.mode!r}")
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise _fail("foreach", self.foreach, "expected True, False or None (pick per device)")
        if not isinstance(self.history_size, numbers.Integral) or isinstance(self.history_size, bool) or self.history_size < 0:
            raise _fail("history_size", self.history_size, "expected an integer >= 0 (0 keeps no history)")
        set_(self, "history_size", int(self.history_size))
        check_process_group(self.process_group)
        if not isinstance(self.flat_grads, bool):
            raise _fail("flat_grads", self.flat_grads, "expected True or False")

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
