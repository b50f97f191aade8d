"""The worked example of docs/policies.md, "Write your own policy": clip at ``k`` times the
running median of the last ``window`` accepted norms. Written only against the public interface
(``clipped_optim.ClipPolicy``); tests/test_custom_policy.py and the fuzzer run it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

import clipped_optim


@dataclass(frozen=True)
class MedianClip(clipped_optim.ClipPolicy):
    """Clip the global norm to ``k`` times the median of the last ``window`` accepted norms."""

    k: float = 3.0
    window: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.k, (int, float)) or not 0 < self.k < math.inf:
            raise ValueError(f"MedianClip: invalid k={self.k!r}; expected a positive finite number")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"MedianClip: invalid window={self.window!r}; expected an integer >= 1")

    def init_state(self, n_params: int, device: torch.device) -> dict[str, Any]:
        return {
            "median_ring": torch.full((self.window,), math.inf, device=device),  # +inf: an empty slot
            "median_count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def rule(self, norms: clipped_optim.StepNorms, state: Mapping[str, Any]) -> clipped_optim.ClipDecision:
        ring, count = state["median_ring"], state["median_count"]
        filled = count.clamp(max=self.window)
        # the lower median of the filled slots: the empty ones (+inf) sort last
        middle = ((filled - 1).clamp(min=0) // 2).reshape(1)
        median = ring.sort().values.gather(0, middle)[0]
        threshold = self.k * median  # +inf until a norm is in: clip nothing
        coef = torch.clamp(threshold / (norms.total_norm + 1e-6), max=1.0)
        slot = (count % self.window).reshape(1)
        new_ring = ring.scatter(0, slot, norms.total_norm.reshape(1).to(ring.dtype))
        return clipped_optim.ClipDecision(
            coef=coef, threshold=threshold, state={"median_ring": new_ring, "median_count": count + 1}
        )
