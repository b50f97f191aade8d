"""Small tensors made without a host-to-device copy in the step (one place for both tricks)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["index_tensor", "scalar_like", "arange", "flag", "empty"]


@functools.lru_cache(maxsize=256)
def _index_tensor(values: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)


def index_tensor(values: Sequence[int], device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per distinct index list.

    A host-to-device copy from pageable memory makes the host wait for the device's queue (a
    sync in all but name): the index lists of a step (which parameters have gradients, a
    layout's order) repeat from step to step, so each is copied once and reused.
    """
    return _index_tensor(tuple(values), torch.device(device))


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def scalar_like(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-dim tensor holding ``value`` on ``like``'s device and dtype, with no host-to-device
    copy (``torch.tensor(x, device=cuda)`` copies from the host and waits for the device).

    A number gives one tensor per ``(value, dtype, device)``, made once: the fixed modes'
    bound, recorded every step (read-only; one op a step saved)."""
    if isinstance(value, Tensor):
        return value.to(like.device, like.dtype)
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=like.dtype, device=like.device)
    return _recorded(float(value), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _recorded(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # not _constant: what is recorded in the clip state is never the tensor a decision is made
    # of, so a user's in-place write to a statistic cannot reach a gradient or a skip
    return torch.full((), value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


def arange(n: int, device: torch.device) -> Tensor:
    """``torch.arange(n, device=device)``, made once per ``(n, device)`` (read-only): the slot
    numbers a ring buffer compares against every step to pick its slot (``arange == i`` is one
    op; ``one_hot`` is eight on a CPU, where it checks its input's range on the host)."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device)
    return _arange(n, torch.device(device))


def flag(value: bool, device: torch.device, dtype: torch.dtype = torch.bool) -> Tensor:
    """A 0-dim tensor holding ``value`` (bool, or 1.0/0.0 of ``dtype``), made once per
    ``(value, device, dtype)`` (read-only): a decision taken on the host (a CPU step), handed on
    as a tensor."""
    return _constant(float(value), dtype, torch.device(device))


@functools.lru_cache(maxsize=16)
def _empty(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.zeros(0, dtype=dtype, device=device)


def empty(device: torch.device, dtype: torch.dtype) -> Tensor:
    """An empty 1-D tensor, made once per ``(device, dtype)`` (it holds nothing to change)."""
    if torch.compiler.is_compiling():
        return torch.zeros(0, dtype=dtype, device=device)
    return _empty(torch.device(device), dtype)
