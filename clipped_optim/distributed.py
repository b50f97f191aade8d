"""Distributed gradients: DTensor shards, process-group reductions, checkpoints.

The global norm of gradients spread over ranks is reduced with **one** collective per step:
each rank takes the ``p``-norm of the pieces it holds, raises it to the ``p``-th power, and
the powers are summed over the group (for the inf-norm the maxima are taken, ``MAX``). The
coefficient that comes out is the same on every rank and multiplies the local shards.

Which pieces count:

* a plain tensor gradient with no ``process_group``: complete and identical on every rank
  (DDP has averaged it). It is added to the reduced sum locally, with no collective; an
  optimizer over plain tensors only costs nothing extra.
* a plain tensor gradient with ``process_group=``: this rank's own slice (a ZeRO-style
  optimizer, FSDP1 with ``use_orig_params=True``, a pipeline stage); summed over the group.
* a ``DTensor`` gradient (FSDP2, tensor parallel): its local shard; on a mesh dimension
  where it is ``Replicate`` only coordinate 0 counts it, so a replica is never counted twice
  (HSDP, ``[Replicate(), Shard(0)]``). ``Partial`` gradients (not yet reduced) are refused.

``torch.nn.utils.clip_grad_norm_`` on DTensors redistributes each ``(device, dtype)`` group's
partial norms on its own mesh; torchtitan adds one more all-reduce over the pipeline mesh.
Here every piece of every group goes into one collective, so there is one all-reduce per step
whatever the number of groups, meshes or stages.

Ranks never diverge. Every rank of the group runs the same collectives, in the same order,
with the same dtypes and shapes, whatever its own groups, gradients or slice (empty ones
included): each decision about a collective is taken from what is identical on every rank
(the options and the plan), never from this rank's gradients.

* The all-reduce sends a few numbers, always in float64 (:func:`reduction_dtype`): this
  rank's power sum, and a flag for the opted-out groups (``"clip": False``), 0 or NaN, so a
  NaN/Inf there skips the step on every rank. A rank with no opted-out group sends 0; the
  flags cost no second collective.
* The first sharded step makes one check, with one small all-gather and one host sync
  (:func:`before_step`): same options and same clip state on every rank, and gradients laid
  out as the plan says. Only then: a collective must be triggered by an event every rank
  sees (the construction), never by one rank's own (a load, an ``add_param_group`` on the
  rank owning the new group), or a rank that skipped it would hang the others.

A mode that measures the gradients (the adaptive ones too) gets all of this by reducing
through ``norms.total_norm(..., batch.sharding)``: ``GradBatch.sharding`` is set by the wrapper
and is ``None`` when nothing is sharded.

A NaN/Inf on one rank reaches every rank through the reduced norm (a sum with a NaN is NaN;
``MAX`` may drop a NaN, so it is sent as +inf, with a flag that makes the norm NaN again), so
every rank takes the same skip decision and records what one process would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
from torch import Tensor

from ._tensors import index_tensor
from .stats import STATE_KEY as CLIP_KEY
from .stats import restore_clip_state

__all__ = [
    "NORM_DTYPE",
    "Reduction",
    "Sharding",
    "check_process_group",
    "plan_reduction",
    "local_grads",
    "reduction_dtype",
    "reduce_total_norm",
    "attach_unclipped",
    "unclipped_poison",
    "before_step",
    "check_ranks",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
]

#: The dtype of a reduced norm on every rank: what one process records for float32 and
#: half-precision gradients (see :func:`reduction_dtype`).
NORM_DTYPE = torch.float32


def _dtensor_type() -> type[DTensor] | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def check_process_group(value: Any) -> Any:
    """``process_group`` must be ``None`` or a ``torch.distributed.ProcessGroup`` holding this rank."""
    if value is None:
        return None
    if dist.is_available() and value is dist.GroupMember.NON_GROUP_MEMBER:
        # dist.new_group returns this placeholder to the ranks outside the new group.
        raise ValueError(_not_a_member())
    if not dist.is_available() or not isinstance(value, dist.ProcessGroup):
        raise ValueError(
            f"ClippedOptimizer: invalid process_group={value!r}; expected None or a "
            "torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD or dist.new_group(...))"
        )
    if dist.get_rank(value) < 0:
        raise ValueError(_not_a_member())
    return value


def _not_a_member() -> str:
    return (
        f"ClippedOptimizer: this rank (global rank {dist.get_rank()}) is not a member of process_group; "
        "the norm is reduced over that group, so every rank that steps this optimizer must be in it. "
        "Pass a group holding this rank (dist.new_group(ranks) hands the ranks outside it a placeholder)."
    )


class Reduction:
    """Where a step's norm is reduced: ``group``, and whether plain (non-DTensor) gradients
    are slices of it (``plain_shared``: a user's ``process_group``) or complete replicas.

    ``checked``: whether the ranks were found to agree (:func:`before_step`, at the first step).
    """

    __slots__ = ("group", "plain_shared", "checked")

    def __init__(self, group: Any, plain_shared: bool) -> None:
        self.group, self.plain_shared = group, plain_shared
        self.checked = False


def plan_reduction(
    config: Any, param_groups: Iterable[dict[str, Any]], previous: Reduction | None = None
) -> Reduction | None:
    """Where a ClippedOptimizer reduces its norm, or ``None`` when no collective is needed.

    Per-parameter clipping needs each parameter's full norm, which the one scalar collective
    does not give: it is refused with sharded gradients rather than clipping each shard alone.
    A new plan over the group of ``previous`` (an ``add_param_group``, perhaps on one rank
    only) keeps its check: checking again would be a collective only that rank runs.
    """
    params = [p for g in param_groups for p in g["params"]]
    if config.process_group is None:
        _refuse_fsdp1_shards(params)
    reduction = _reduction(params, config.process_group)
    if reduction is not None and config.mode == "per_param":
        raise ValueError(
            "ClippedOptimizer: mode='per_param' is not supported with sharded gradients (DTensor "
            "parameters or process_group=): a shard's norm is not its parameter's norm; use mode='norm'"
        )
    if reduction is not None and previous is not None and previous.group is reduction.group:
        reduction.checked = previous.checked
    return reduction


def _refuse_fsdp1_shards(params: Iterable[Tensor]) -> None:
    """FSDP1 without ``use_orig_params`` hands the optimizer its flat parameters; under a
    sharding strategy each rank's is a slice, which only FSDP's own attributes tell."""
    for p in params:
        sharded = getattr(p, "_sharded_size", None)  # set by FSDP on flat parameters only
        whole = getattr(p, "_unpadded_unsharded_size", sharded)
        if getattr(p, "_is_flat_param", False) and sharded != whole:
            raise ValueError(
                "ClippedOptimizer: the parameters are FSDP (FullyShardedDataParallel) flat parameters "
                "sharded over ranks: each rank holds a slice of every gradient, and without process_group= "
                "each rank would clip by the norm of its own slice. Pass process_group= the group they are "
                "sharded over (the FSDP module's process_group; under HYBRID_SHARD its shard group)."
            )


def _reduction(params: Iterable[Tensor], process_group: Any) -> Reduction | None:
    """The group the norm is reduced over, or ``None`` when no collective is needed.

    ``process_group`` wins. Otherwise DTensor parameters decide: their single 1-D mesh's
    group, or the world when their meshes cover it. Decided once, from the parameters (not
    the gradients, which may be missing on some rank): every rank must agree on whether to
    take part in the collective, or the step hangs.
    """
    if process_group is not None:
        return Reduction(process_group, plain_shared=True)
    dtensor = _dtensor_type()
    meshes = {id(p.device_mesh): p.device_mesh for p in params if dtensor and isinstance(p, dtensor)}
    if not meshes:
        return None
    if len(meshes) == 1:
        (mesh,) = meshes.values()
        if mesh.ndim == 1:
            return Reduction(mesh.get_group(), plain_shared=False)
    ranks = {r for m in meshes.values() for r in m.mesh.flatten().tolist()}
    if ranks == set(range(dist.get_world_size())):
        return Reduction(dist.group.WORLD, plain_shared=False)
    raise ValueError(
        "ClippedOptimizer: the DTensor parameters live on meshes that do not cover the world "
        f"(ranks {sorted(ranks)}); pass process_group= a group holding every rank whose "
        "gradients make up the global norm (e.g. all pipeline stages)"
    )


class Sharding:
    """How the local gradients of one step combine into the global norm.

    Attributes:
        group: the process group of the all-reduce.
        shared: positions (in the batch) of pieces summed over the group.
        local: positions of complete gradients added on this rank only.
        unclipped: this rank's flag for its opted-out gradients (0, or NaN when one is
            non-finite), to send with the step's first all-reduce (:func:`attach_unclipped`).
        unclipped_global: the flag reduced over the group, once that all-reduce has run.
    """

    __slots__ = ("group", "shared", "local", "unclipped", "unclipped_global")

    def __init__(self, group: Any, shared: list[int], local: list[int]) -> None:
        self.group, self.shared, self.local = group, shared, local
        self.unclipped: Tensor | None = None
        self.unclipped_global: Tensor | None = None


def _counts_here(grad: DTensor) -> bool:
    """Whether this rank counts its local piece of the DTensor ``grad``: only coordinate 0
    of every mesh dimension on which ``grad`` is replicated does."""
    coord = grad.device_mesh.get_coordinate()
    if coord is None:  # this rank is not on the mesh: it holds nothing
        return False
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise NotImplementedError(
                "ClippedOptimizer: a gradient has a Partial placement (not yet reduced); its norm "
                "cannot be taken from the local pieces. Reduce it (redistribute) before step()."
            )
        if placement.is_replicate() and coord[dim] != 0:
            return False
    return True


def local_grads(grads: Sequence[Tensor], reduction: Reduction | None) -> tuple[list[Tensor], Sharding | None]:
    """The local tensors to measure and scale in place, and how their norms combine.

    DTensor gradients are replaced by their local shard (the same storage, so scaling it
    scales the DTensor). With ``reduction=None`` the gradients are returned as they are.
    """
    if reduction is None:
        return list(grads), None
    dtensor = _dtensor_type()
    tensors: list[Tensor] = []
    shared: list[int] = []
    local: list[int] = []
    for i, g in enumerate(grads):
        if dtensor is not None and isinstance(g, dtensor):
            if _counts_here(g):
                shared.append(i)
            g = g.to_local()
            if g.numel() == 0:
                # Uneven sharding leaves some ranks an empty shard, whose inf-norm torch
                # refuses (no identity); a scratch zero measures 0 and scaling it is harmless.
                g = g.new_zeros(1)
        elif reduction.plain_shared:
            shared.append(i)
        else:
            local.append(i)
        tensors.append(g)
    return tensors, Sharding(reduction.group, shared, local)


def reduction_dtype(device: torch.device) -> torch.dtype:
    """The dtype every rank sends the norm in: float64 (float32 on MPS, which has none).

    Taken from the device type, never from the gradients: a rank holding float64 gradients,
    or none at all this step, must send what the others send, or gloo aborts the rank and
    NCCL reads garbage. float64 keeps the sum of p-th powers exact to float32 rounding; the
    result is returned in :data:`NORM_DTYPE` on every rank, what one process records for
    float32 and half-precision gradients (for float64 gradients one process records float64:
    a rank cannot know another's dtypes without a collective, so it is float32 here).
    """
    return torch.float32 if device.type == "mps" else torch.float64


def _pnorm(stacked: Tensor, index: list[int], norm_type: float) -> Tensor:
    """The ``norm_type``-norm of the entries ``index`` of the 1-D ``stacked``."""
    if not index:
        return stacked.new_zeros(())
    if len(index) < len(stacked):  # a mix; all-shared (FSDP2) and all-local skip the gather
        stacked = stacked.index_select(0, index_tensor(index, stacked.device))
    return torch.linalg.vector_norm(stacked, norm_type)


def reduce_total_norm(stacked: Tensor, norm_type: float, sharding: Sharding) -> Tensor:
    """The global ``norm_type``-norm from this rank's per-piece norms ``stacked``: one all-reduce.

    Every rank of ``sharding.group`` must call it, with or without pieces of its own. The
    first call of a step also carries the opted-out groups' flag (:func:`attach_unclipped`).
    """
    stacked = stacked.to(reduction_dtype(stacked.device))
    shared = _pnorm(stacked, sharding.shared, norm_type)
    local = _pnorm(stacked, sharding.local, norm_type)
    first = sharding.unclipped_global is None
    flag = sharding.unclipped if first and sharding.unclipped is not None else shared.new_zeros(())
    if norm_type == math.inf:
        # MAX may drop a NaN, so NaN is sent as +inf (posinf=inf: nan_to_num's default would
        # turn +inf into the largest float), and whether there was one as a third number:
        # the norm is NaN, not inf, as one process's max over the same values would be.
        had_nan = torch.isnan(shared).to(shared)
        sent = torch.nan_to_num(torch.stack([shared, flag.to(shared), had_nan]), nan=math.inf, posinf=math.inf)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=sharding.group)
        top = torch.maximum(sent[0], local)
        total = torch.where(sent[2] > 0, torch.full_like(top, math.nan), top)
    else:
        sent = torch.stack([shared.pow(norm_type), flag.to(shared)])
        dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=sharding.group)
        total = (sent[0] + local.pow(norm_type)).pow(1.0 / norm_type)
    if first:
        sharding.unclipped_global = sent[1]
    return total.to(NORM_DTYPE)


def attach_unclipped(sharding: Sharding, norms: Sequence[Tensor], device: torch.device) -> None:
    """Give the step's first all-reduce this rank's flag for its opted-out gradients: 0, or
    NaN when one of ``norms`` (their norms) is NaN/Inf.

    Every rank sends one, 0 when it has no opted-out group: which rank owns the opted-out
    classifier is its own affair, the collective is everyone's.
    """
    wide = reduction_dtype(device)
    if len(norms) == 0:
        sharding.unclipped = torch.zeros((), dtype=wide, device=device)
    else:
        sharding.unclipped = torch.stack([n.to(device, wide) for n in norms]).sum() * 0


def unclipped_poison(total: Tensor, sharding: Sharding) -> Tensor:
    """0, or NaN when an opted-out gradient of any rank is NaN/Inf: added to ``total`` as one
    process does (the opted-out norms enter the total only through their finiteness).

    The mode's all-reduce carried the flags. A mode that reduced nothing would get one
    all-reduce here, on every rank alike since the mode is the same on every rank.
    """
    if sharding.unclipped_global is None:
        reduce_total_norm(total.new_zeros(0), 2.0, sharding)
    assert sharding.unclipped_global is not None
    return (sharding.unclipped_global * 0).to(total.dtype)


# -- the ranks agree ---------------------------------------------------------------------
def before_step(
    reduction: Reduction | None,
    config: Any,
    param_groups: Sequence[dict[str, Any]],
    clip_state: dict[str, Any],
    found_inf: Tensor | None,
    found_inf_is_global: bool,
) -> None:
    """What a sharded step checks before it changes anything.

    * A GradScaler's overflow flag must be the global one (``found_inf_is_global``: the step
      fills it from the reduced norm, as under :class:`~clipped_optim.ClipGradScaler`);
      ``torch.amp.GradScaler``'s is this rank's own, and the ranks' scales would drift apart.
    * At the first step: :func:`check_ranks`, one all-gather and one host sync. Not after a
      load: a load may happen on some ranks only (that is the mistake worth catching), and a
      collective that only those ranks run would hang; call :func:`check_ranks` on every
      rank after loading to check it.

    Nothing without a reduction: that path has no collective, and adding one would hang an
    optimizer that only some ranks step.
    """
    if reduction is None:
        return
    if found_inf is not None and not found_inf_is_global:
        raise ValueError(
            "ClippedOptimizer: with sharded gradients (process_group= or DTensor parameters) the overflow "
            "flag of a torch.amp.GradScaler is this rank's own: only the rank holding the inf would back off "
            "its scale, and the ranks' scales would drift apart. Use clipped_optim.ClipGradScaler (same "
            "arguments), whose flag the step fills from the reduced norm, and call scaler.step(opt) without "
            "scaler.unscale_(opt) before it."
        )
    if not reduction.checked:
        _agree(reduction.group, reduction.plain_shared, config, param_groups, clip_state)
        reduction.checked = True


def check_ranks(optimizer: Any, group: Any = None) -> None:
    """Check that the ranks agree, with one all-gather over ``group`` and one host sync.

    The same options and clip state on every rank, and plain (non-DTensor) gradients laid out
    as the optimizer takes them: slices of the whole, disjoint across ranks, with
    ``process_group=``; complete replicas (DDP) without. Every rank of ``group`` must call it,
    after ``backward()`` and before ``step()``. A sharded optimizer makes this check by itself
    at its first step; without ``process_group=`` nothing is checked unless this is called
    (e.g. once, after the first backward), since that path has no collective of its own.

    Args:
        optimizer: a :class:`~clipped_optim.ClippedOptimizer`.
        group: the ranks to compare (default: the group the norm is reduced over, else the world).

    Raises:
        ValueError: the options differ, or the gradients are not laid out as the optimizer
            takes them. RuntimeError: the clip states differ.
    """
    reduction = getattr(optimizer, "_reduction", None)
    if group is None:
        group = dist.group.WORLD if reduction is None else reduction.group
    slices = reduction is not None and reduction.plain_shared
    _agree(group, slices, optimizer.config, optimizer.param_groups, optimizer._clip_state())


def _agree(
    group: Any, slices: bool, config: Any, param_groups: Sequence[dict[str, Any]], clip_state: dict[str, Any]
) -> None:
    """Gather every rank's :func:`_descriptor` and raise, on every rank alike, if they disagree
    (``slices``: plain gradients are slices of the whole, else replicas)."""
    mine = _descriptor(config, param_groups, clip_state)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).tolist()  # every rank decides from the same rows
    ranks = dist.get_process_group_ranks(group)
    _check_options(rows, ranks)
    _check_clip_state(rows, ranks)
    if slices:
        _check_slices(rows, ranks)
    else:
        _check_replicas(rows, ranks)


# Columns of a rank's descriptor (int64).
_OPTIONS, _STATE, _STEPS, _PLAIN, _POWER, _FINITE = range(6)


def _descriptor(config: Any, param_groups: Sequence[dict[str, Any]], clip_state: dict[str, Any]) -> Tensor:
    """This rank's options, clip state and plain gradients, as six int64 (digests and bits)."""
    device = clip_state["steps"].device
    plain = [p for g in param_groups for p in g["params"] if not _is_dtensor(p)]
    layout = [(tuple(p.shape), str(p.dtype), p.grad is not None) for p in plain]
    power = _power([p.grad for p in plain if p.grad is not None])
    values = [
        _digest(repr(_options(config))),
        _digest(_state_bytes(clip_state)),
        int(clip_state["steps"]),
        _digest(repr(layout)),
        struct.unpack("<q", struct.pack("<d", power))[0],  # the float64's bits
        int(math.isfinite(power) and power > 0),
    ]
    return torch.tensor(values, dtype=torch.int64).to(device)


def _options(config: Any) -> list[tuple[str, Any]]:
    # foreach and process_group may differ per rank (a kernel choice; group objects are per process).
    skip = {"process_group", "foreach"}
    from .policy import ClipPolicy, describe  # the policies import the norms, which import this module

    # a policy by its fields (its default repr would hold a per-process address)
    return [
        (f.name, describe(v) if isinstance(v, ClipPolicy) else v)
        for f in dataclasses.fields(config)
        if f.name not in skip
        for v in [getattr(config, f.name)]
    ]


def _power(grads: Sequence[Tensor]) -> float:
    """The sum of squares of ``grads`` in float64 (a fingerprint, not the norm of any mode),
    summed on each device and read once per device."""
    sums: dict[torch.device, Tensor] = {}
    for g in grads:
        values = (g.coalesce()._values() if g.is_sparse else g).detach()
        square = values.double().pow(2).sum()
        sums[values.device] = square if values.device not in sums else sums[values.device] + square
    return sum(float(s) for s in sums.values())


def _state_bytes(clip_state: dict[str, Any]) -> bytes:
    """The clip state as bytes, but for ``param_norms`` (each rank's own pieces)."""
    out = io.BytesIO()
    for key in sorted(clip_state):
        if key == "param_norms":
            continue
        value = clip_state[key]
        out.write(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            out.write(f"{t.dtype}{tuple(value.shape)}".encode())
            out.write(t.view(torch.uint8).numpy().tobytes())
        else:
            out.write(repr(value).encode())
    return out.getvalue()


def _digest(data: str | bytes) -> int:
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def _check_options(rows: list[list[int]], ranks: list[int]) -> None:
    if len({row[_OPTIONS] for row in rows}) > 1:
        raise ValueError(
            "ClippedOptimizer: the ranks of the norm's process group were built with different clip options "
            f"(ranks by their options: {_classes(rows, ranks, _OPTIONS)}); every rank must pass the same mode, "
            "max_norm, norm_type and the rest, or they clip by different rules and run different collectives."
        )


def _check_clip_state(rows: list[list[int]], ranks: list[int]) -> None:
    if len({row[_STATE] for row in rows}) > 1:
        steps = {rank: row[_STEPS] for rank, row in zip(ranks, rows)}
        raise RuntimeError(
            f"ClippedOptimizer: the ranks hold different clip states (steps by rank: {steps}): a checkpoint "
            "was loaded on some ranks only, or different ones were. Load the same clip state on every rank; "
            "for a full state dict that only rank 0 reads, clipped_optim.distributed.set_optimizer_state_dict "
            "with StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) broadcasts it."
        )


def _check_slices(rows: list[list[int]], ranks: list[int]) -> None:
    """With ``process_group=`` every plain gradient is counted on its rank: two ranks holding
    the same ones (DDP, HSDP replicas, ZeroRedundancyOptimizer) would count them twice."""
    seen: dict[tuple[int, int], int] = {}
    for rank, row in zip(ranks, rows):
        if not row[_FINITE]:  # no gradient, or a zero or NaN one: no evidence either way
            continue
        key = (row[_PLAIN], row[_POWER])
        if key in seen:
            raise ValueError(
                f"ClippedOptimizer: process_group= says each rank's gradients are slices of the whole, but "
                f"ranks {seen[key]} and {rank} hold identical ones, as under DDP (or across HSDP replicas, or "
                "with torch's ZeroRedundancyOptimizer, which keeps every gradient): they would be counted once "
                "per rank and the norm come out too large. Under DDP pass no process_group=; otherwise pass "
                "the group over which the slices are disjoint."
            )
        seen[key] = rank


def _check_replicas(rows: list[list[int]], ranks: list[int]) -> None:
    """Without ``process_group=`` plain gradients are taken as complete replicas and added on
    each rank alone: ranks holding different ones would clip by different norms."""
    if len({(row[_PLAIN], row[_POWER]) for row in rows}) > 1:
        raise ValueError(
            "ClippedOptimizer: the plain (non-DTensor) gradients differ across ranks "
            f"(ranks by their gradients: {_classes(rows, ranks, _PLAIN, _POWER)}), but without process_group= "
            "they are taken as complete replicas (as DDP leaves them) and each rank would clip by the norm of "
            "its own. If each rank holds a slice of the model (ZeRO-style, FSDP1 with use_orig_params=True, "
            "pipeline stages), pass process_group= the group over which the slices make up the whole."
        )


def _classes(rows: list[list[int]], ranks: list[int], *columns: int) -> list[list[int]]:
    """The ranks grouped by the values in ``columns`` (for messages)."""
    by_key: dict[tuple[int, ...], list[int]] = {}
    for rank, row in zip(ranks, rows):
        by_key.setdefault(tuple(row[c] for c in columns), []).append(rank)
    return list(by_key.values())


# -- checkpoints -------------------------------------------------------------------------
# ``torch.distributed.checkpoint.state_dict`` maps every key of ``optimizer.state`` to a
# parameter name and fails with ``KeyError: 'clip'`` on the wrapper's statistics; it also
# skips its state initialisation when ``state`` is non-empty, which the statistics make it.
# These two helpers hand torch the inner optimizer with the statistics taken out, and carry
# the statistics under a top-level ``"clip"`` key of the returned dict.


def _inner_and_stats(optimizer: Any) -> tuple[Any, Any]:
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner, inner.state.pop(CLIP_KEY, None)


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: Any, options: Any = None) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` for a ClippedOptimizer.

    The result is torch's (parameter names as keys, DTensor states) plus ``"clip"``: the
    statistics, serialised to ``bytes``. Opaque on purpose: ``torch.distributed.checkpoint``
    must know every tensor's shape before a load, and ``param_norms`` (one per parameter,
    empty before the first step; local to each rank) has none it could know; as one opaque
    item the statistics load whatever their shape. The non-tensor items of a checkpoint are
    written by one rank; every value but ``param_norms`` is the same on all ranks.
    Save the result with ``torch.distributed.checkpoint.save`` like any state dict.
    """
    from torch.distributed.checkpoint import state_dict as sd

    inner, clip = _inner_and_stats(optimizer)
    try:
        osd: dict[str, Any] = sd.get_optimizer_state_dict(model, inner, options=options)
    finally:
        if clip is not None:
            inner.state[CLIP_KEY] = clip
    if clip is not None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in clip.items()}, buffer)
        osd[CLIP_KEY] = buffer.getvalue()
    return osd


def set_optimizer_state_dict(
    model: torch.nn.Module, optimizer: Any, optim_state_dict: dict[str, Any], options: Any = None
) -> None:
    """Load what :func:`get_optimizer_state_dict` returned (statistics included).

    With ``options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)`` only
    rank 0 needs the state dict (the others may pass ``{}``, as torch's helper expects): the
    statistics are broadcast from rank 0 as the rest is, so every rank resumes with rank 0's.
    ``param_norms`` (each rank's own pieces; a checkpoint holds one rank's) is left empty
    until the next step. Every rank must call it.
    """
    from torch.distributed.checkpoint import state_dict as sd

    osd = dict(optim_state_dict)
    clip = osd.pop(CLIP_KEY, None)
    if options is not None and getattr(options, "broadcast_from_rank0", False):
        clip = _from_rank0(clip)
    inner, current = _inner_and_stats(optimizer)
    config = getattr(optimizer, "config", None)
    restored = None
    try:
        if current is not None and config is not None:  # validate before anything is loaded
            restored = _restore(clip, config, current["steps"].device)
        sd.set_optimizer_state_dict(model, inner, osd, options=options)
    finally:
        if current is not None:
            inner.state[CLIP_KEY] = current
    if restored is not None:
        inner.state[CLIP_KEY] = restored


def _from_rank0(clip: Any) -> Any:
    """Rank 0's ``clip`` on every rank: over the default group from global rank 0, as torch's
    ``broadcast_from_rank0`` broadcasts the rest of the state."""
    box = [clip if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _restore(clip: Any, config: Any, device: torch.device) -> dict[str, Any]:
    if isinstance(clip, (bytes, bytearray)):
        clip = torch.load(io.BytesIO(clip), weights_only=True)
    state = restore_clip_state(clip, config.mode_name, device, config.history_size, config.top_k)
    state["param_norms"] = torch.zeros(0, dtype=torch.float32, device=device)
    return state
