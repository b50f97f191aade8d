"""Small tensors made without a host-to-device copy in the step (one place for both tricks),
and a CPU tensor's memory read and written from Python without a dispatched op."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["index_tensor", "scalar_like", "arange", "flag", "empty", "host_memory", "on_device"]


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


def on_device(t: Tensor, device: torch.device, non_blocking: bool = False) -> Tensor:
    """``t.to(device)``, without the call where ``t`` is there already: a device compare costs
    a fifth of a ``.to()`` that has nothing to move (17 us a step on 28 tensors)."""
    return t if t.device == device else t.to(device, non_blocking=non_blocking)


_C_TYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def host_memory(t: Tensor) -> ctypes.Array[Any]:
    """The elements of ``t`` (a contiguous CPU tensor of float32 or float64) as a ctypes array
    over its own memory, in row-major order.

    On a CPU a rule that decides on the host reads and moves a few values of a history every
    step: indexing the tensor or ``searchsorted`` is a dispatched op (1-3 us each, more with
    cold caches), an element of this array one C load or store, and ``bisect`` on it a
    ``searchsorted`` of the same result. It is a view: the caller keeps ``t`` alive while it
    uses it, and writes only into a tensor it has just made (a clone), because a write through
    it bypasses autograd and the version counter.
    """
    if t.dtype not in _C_TYPES or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"host_memory needs a contiguous CPU float32/float64 tensor, got {t.dtype} on {t.device}")
    return _array_type(t.dtype, t.numel()).from_address(t.data_ptr())


@functools.lru_cache(maxsize=64)
def _array_type(dtype: torch.dtype, n: int) -> type[ctypes.Array[Any]]:
    return _C_TYPES[dtype] * n
