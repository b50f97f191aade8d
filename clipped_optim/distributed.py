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
A mode that measures the gradients (the adaptive ones too) gets all of this by reducing
through ``norms.total_norm(..., batch.sharding)``: ``GradBatch.sharding`` is set by the wrapper
and is ``None`` when nothing is sharded.

A NaN/Inf on one rank reaches every rank through the reduced norm (a sum with a NaN is NaN;
``MAX`` may drop a NaN, so it is sent as +inf, with a flag that makes the norm NaN again), so
every rank takes the same skip decision and records what one process would.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
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
    "add_unclipped",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
]

#: The dtype of a reduced norm on every rank: what one process records for float32 and
#: half-precision gradients (see :func:`reduction_dtype`).
NORM_DTYPE = torch.float32


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def check_process_group(value: Any) -> Any:
    """``process_group`` must be ``None`` or a ``torch.distributed.ProcessGroup``."""
    if value is None:
        return None
    if not dist.is_available() or not isinstance(value, dist.ProcessGroup):
        raise ValueError(
            f"ClippedOptimizer: invalid process_group={value!r}; expected None or a "
            "torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD or dist.new_group(...))"
        )
    return value


class Reduction:
    """Where a step's norm is reduced: ``group``, and whether plain (non-DTensor) gradients
    are slices of it (``plain_shared``: a user's ``process_group``) or complete replicas."""

    __slots__ = ("group", "plain_shared")

    def __init__(self, group: Any, plain_shared: bool) -> None:
        self.group, self.plain_shared = group, plain_shared


def plan_reduction(config: Any, param_groups: Iterable[dict[str, Any]]) -> Reduction | None:
    """Where a ClippedOptimizer reduces its norm, or ``None`` when no collective is needed.

    Per-parameter clipping needs each parameter's full norm, which the one scalar collective
    does not give: it is refused with sharded gradients rather than clipping each shard alone.
    """
    params = [p for g in param_groups for p in g["params"]]
    reduction = _reduction(params, config.process_group)
    if reduction is not None and config.mode == "per_param":
        raise ValueError(
            "ClippedOptimizer: mode='per_param' is not supported with sharded gradients (DTensor "
            "parameters or process_group=): a shard's norm is not its parameter's norm; use mode='norm'"
        )
    return reduction


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


def _counts_here(grad: Tensor) -> bool:
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


def add_unclipped(total: Tensor, sharding: Sharding) -> Tensor:
    """``total``, made NaN when an opted-out gradient of any rank is NaN/Inf (as one process
    does: the opted-out norms enter the total only through their finiteness).

    The mode's all-reduce carried the flags. A mode that reduced nothing would get one
    all-reduce here, on every rank alike since the mode is the same on every rank.
    """
    if sharding.unclipped_global is None:
        reduce_total_norm(total.new_zeros(0), 2.0, sharding)
    return total + (sharding.unclipped_global * 0).to(total.dtype)


# -- checkpoints -------------------------------------------------------------------------
# ``torch.distributed.checkpoint.state_dict`` maps every key of ``optimizer.state`` to a
# parameter name and fails with ``KeyError: 'clip'`` on the wrapper's statistics; it also
# skips its state initialisation when ``state`` is non-empty, which the statistics make it.
# These two helpers hand torch the inner optimizer with the statistics taken out, and carry
# the statistics under a top-level ``"clip"`` key of the returned dict.


def _inner_and_stats(optimizer: Any) -> tuple[torch.optim.Optimizer, Any]:
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
        osd = sd.get_optimizer_state_dict(model, inner, options=options)
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
    state = restore_clip_state(clip, config.mode, device, config.history_size)
    state["param_norms"] = torch.zeros(0, dtype=torch.float32, device=device)
    return state
