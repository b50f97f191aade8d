"""What both callbacks share: find the ClippedOptimizers behind a framework's wrappers, and read them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..optimizer import ClippedOptimizer


def unwrap(optimizer: Any) -> ClippedOptimizer | None:
    """The ClippedOptimizer inside ``optimizer``, through the framework's wrappers.

    Lightning's ``LightningOptimizer`` and Accelerate's ``AcceleratedOptimizer`` keep the
    optimizer they wrap as ``.optimizer``.
    """
    for _ in range(8):  # a wrapper chain is short; the bound only guards against a cycle
        if isinstance(optimizer, ClippedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def collect(optimizers: Iterable[Any], prefix: str, named_parameters: Any = None) -> dict[str, float]:
    """``stats()`` of every ClippedOptimizer in ``optimizers``, one host copy each.

    One optimizer: keys ``prefix + key`` (``clip/grad_norm``). Several: ``prefix + "<i>/" + key``
    (``clip/1/grad_norm``), ``i`` its index in ``optimizers``.
    """
    found = [(i, opt) for i, opt in enumerate(map(unwrap, optimizers)) if opt is not None]
    out: dict[str, float] = {}
    for i, opt in found:
        names = None if named_parameters is None else named_parameters()
        out.update(opt.stats(names, prefix=prefix if len(found) == 1 else f"{prefix}{i}/"))
    return out


def name_parameters(optimizers: Iterable[Any], named_parameters: Any) -> None:
    """Give every ClippedOptimizer in ``optimizers`` the module's parameter names, so its reports
    and checkpoints name the parameters behind an outlier step (no sync: host lists only)."""
    for opt in map(unwrap, optimizers):
        if opt is not None:
            opt.name_parameters(named_parameters())
