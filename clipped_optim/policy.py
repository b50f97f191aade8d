"""Clip policies: each adaptive clipping rule as its own typed object with its own state.

A :class:`ClipPolicy` says two things: what state it starts from (:meth:`ClipPolicy.init_state`)
and how this step's norms and that state give the clip coefficient and the next state
(:meth:`ClipPolicy.rule`). Everything around the rule is done here, the same way for every
policy, the built-in ones (AGC, AutoClip, ZClip, spike skipping) included:

* the norms are measured once, unscaled under AMP, and reduced over the ranks when the
  gradients are sharded (one all-reduce, so every rank computes the same threshold);
* the step's gate (non-finite gradients, a GradScaler overflow, a spike) is applied to the
  coefficient: a held step multiplies by exactly 1;
* the new state is kept only where the step is *accepted* (its norm is finite and nothing
  else holds it): ``torch.where(accept, new, old)`` for each returned tensor, on the device. A
  rule therefore computes its next state unconditionally and can never let a NaN in;
* a scalar coefficient (one for all gradients) is folded into a fused kernel's ``grad_scale``;
* the state lives in ``optimizer.state["clip"]``, so it is checkpointed, checked when a
  checkpoint is loaded (:meth:`ClipPolicy.check_state`), and restored bit-identically.

A rule must not read a tensor's value on the host (``.item()``, ``if tensor``) unless
:attr:`StepNorms.host` says it may: decide with ``torch.where``/``clamp``, so a step costs no
device-to-host sync and compiles in one graph. On a CPU the values are in host memory already,
and a chain of 0-dim tensor ops costs 2-4 us an op (the dispatcher, not the arithmetic) where
the same arithmetic on Python floats costs nanoseconds: there ``host`` is True, and the built-in
rules read their scalar state and decide in Python, with the same IEEE double arithmetic, so
both paths give the same bits (the tests run both).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._tensors import empty, index_tensor
from .modes import ClipResult, Gate, _device, _measure, held, open_gate, open_gate_on_host, unscaled
from .norms import GradBatch, scale_, scale_each_
from .stats import check_tensor

__all__ = [
    "ClipPolicy",
    "StepNorms",
    "ClipDecision",
    "run_policy",
    "skip_gate",
    "check_policy_state",
    "state_keys",
    "on_host",
]

#: Whether a step on a CPU lets rules decide on the host (:attr:`StepNorms.host`). The tests
#: turn it off to run, on a CPU, the device path that accelerators take.
HOST_SCALARS = True


def on_host(device: torch.device) -> bool:
    """Whether a rule may read values on ``device`` on the host: a CPU tensor's value is in host
    memory (reading it waits on no device queue), unless the step is being compiled (a read
    would break the graph) or :data:`HOST_SCALARS` is off."""
    return HOST_SCALARS and device.type == "cpu" and not torch.compiler.is_compiling()


@dataclass(frozen=True, eq=False)
class StepNorms:
    """What a policy's rule sees of one step.

    Attributes:
        total_norm: the pre-clip global ``norm_type``-norm of the gradients, 0-dim, unscaled,
            over every rank when the gradients are sharded (identical on every rank).
        param_norms: the pre-clip norm of each gradient in ``grads``, 1-D, unscaled (of this
            rank's pieces when sharded). Empty for a policy used as ``skip_spikes=``, which is
            asked from the total norm alone, before the clip (``grads``, ``params`` and
            ``positions`` are then empty too, and ``n_params`` is 0).
        grads: the gradients this step clips, in optimizer order (sparse ones as their values).
            Read them, never write them; under AMP they still carry ``grad_scale``.
        params: the parameter of each gradient.
        positions: each gradient's index among all the optimizer's parameters.
        n_params: the number of the optimizer's parameters (those without a gradient this step
            and those in ``"clip": False`` groups included).
        norm_type: p of the p-norms above (the optimizer's ``norm_type``).
        grad_scale: the loss scale still on ``grads`` (GradScaler's), or ``None``.
        sharded: whether each rank holds only pieces of the gradients (FSDP2, DTensor,
            ``process_group=``); ``param_norms`` and ``grads`` are then local.
        device: where the norms, the decision and the state live.
        host: whether the rule may read tensor values on the host (``float(t)``, ``if t``) and
            decide in Python: True on a CPU outside ``torch.compile`` (see :func:`on_host`).
            False on an accelerator: then only ``torch.where``/``clamp`` (no sync).
    """

    total_norm: Tensor
    param_norms: Tensor
    grads: Sequence[Tensor]
    params: Sequence[Tensor]
    positions: Sequence[int]
    n_params: int
    norm_type: float
    grad_scale: Tensor | None
    sharded: bool
    device: torch.device
    host: bool = False

    @property
    def complete(self) -> bool:
        """Whether every one of the optimizer's parameters has a gradient here."""
        return len(self.positions) == self.n_params

    def rows(self) -> Tensor:
        """``positions`` as an int64 tensor on ``device`` (made once per distinct layout, so
        indexing per-parameter state costs no host-to-device copy per step)."""
        return index_tensor(self.positions, self.device)


class ClipDecision(NamedTuple):
    """What a policy's rule decided for one step.

    Attributes:
        coef: the multiplier of the gradients: a 0-dim tensor (one for all of them: the policy
            is scalar and can be folded into a fused kernel), a 1-D tensor (one per gradient),
            or a sequence of one tensor per gradient that broadcasts over it (e.g. one factor
            per row). ``<= 1`` clips; the framework applies it, or 1 on a held step.
        threshold: the bound in effect, 0-dim, or 1-D with one per gradient (the statistics
            then record the bound of the gradient clipped hardest).
        state: the next state: some or all of the keys of :meth:`ClipPolicy.init_state`, each
            with its old shape and dtype. Kept only if the step is accepted.
        skip: only for a policy used as ``skip_spikes=``: 0-dim bool, whether to skip this
            step's update entirely (honoured only when the norm is finite).
        clip_coef: the coefficient to record in the statistics when ``coef`` is a sequence
            (default: ``coef`` itself, or its smallest entry).
    """

    coef: Tensor | Sequence[Tensor] | None = None
    threshold: Tensor | None = None
    state: Mapping[str, Tensor] = {}
    skip: Tensor | None = None
    clip_coef: Tensor | None = None


class ClipPolicy(abc.ABC):
    """Base class of a clipping rule; pass an instance as ``ClippedOptimizer(..., mode=policy)``.

    Write a frozen dataclass (typed hyper-parameters, validated in ``__post_init__``) that
    defines :meth:`rule` and, if it keeps state, :meth:`init_state`; the optimizer does the
    rest (see :mod:`clipped_optim.policy`). Its state keys share ``optimizer.state["clip"]``
    with the statistics: prefix them with the policy's name.

    Attributes:
        name: recorded as ``optimizer.state["clip"]["mode"]``; a checkpoint written under
            another name is refused. Defaults to the class name.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def is_scalar(self) -> bool:
        """Whether the coefficient is one 0-dim tensor for all gradients; the optimizer may then
        fold it into a fused kernel's ``grad_scale`` (``fused=True``) instead of scaling.
        Default: True."""
        return True

    def init_state(self, n_params: int, device: torch.device) -> dict[str, Any]:
        """The state before the first step: tensors on ``device`` (and, if need be, constants
        that never change). Made lazily at the first step; also called once on the ``meta``
        device at construction to learn the keys, so build tensors only. Default: no state."""
        return {}

    def resize_state(self, state: dict[str, Any], n_params: int) -> dict[str, Any]:
        """The state adapted to ``n_params`` (a param group was added), before the rule runs
        and whether or not the step is accepted. Default: unchanged."""
        return state

    @abc.abstractmethod
    def rule(self, norms: StepNorms, state: Mapping[str, Any]) -> ClipDecision:
        """This step's coefficient, threshold and next state, from its norms and the state.

        Runs under ``torch.no_grad()``, on the device, once per ``step()``. Compute the next
        state unconditionally: the optimizer keeps it only if the step is accepted.
        """

    def check_state(self, state: Mapping[str, Any], n_params: int) -> None:
        """Refuse, with a ``ValueError`` that names the key, a checkpoint's state that this
        policy cannot continue from (``load_state_dict`` calls it before changing anything).

        Default: every key of :meth:`init_state` is there, as a tensor of the same number of
        dimensions, kind (float, integer, bool) and shape, or a constant of the same type.
        """
        for key, want in self.init_state(n_params, torch.device("meta")).items():
            if key not in state:
                raise ValueError(f"ClippedOptimizer: the checkpoint's clip state lacks {key!r} (of {self!r})")
            check_like(key, state[key], want, f"{self!r}")


def check_like(key: str, value: Any, want: Any, hint: str, any_rows: bool = False) -> None:
    """Refuse ``value`` unless it is like ``want`` (see :meth:`ClipPolicy.check_state`);
    ``any_rows``: the first dimension may differ (state that grows with the parameters)."""
    try:
        if isinstance(want, Tensor):
            kind = "float" if want.is_floating_point() else "bool" if want.dtype == torch.bool else "int"
            shape = tuple(None if any_rows and i == 0 else d for i, d in enumerate(want.shape))
            check_tensor(key, value, want.ndim, kind, shape)
        elif type(value) is not type(want):
            raise ValueError(
                f"ClippedOptimizer: the checkpoint's clip state has an invalid {key!r}: "
                f"expected a {type(want).__name__}, got {type(value).__name__}"
            )
    except ValueError as err:
        raise ValueError(f"{err} (this optimizer uses {hint})") from None


def state_keys(policy: ClipPolicy, reserved: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The keys of ``policy``'s state (from :meth:`ClipPolicy.init_state` on the meta device),
    refused when one would overwrite a statistic or another policy's state."""
    keys = tuple(policy.init_state(1, torch.device("meta")))
    clash = sorted(set(keys) & set(reserved))
    if clash:
        raise ValueError(
            f"ClippedOptimizer: {policy!r} keeps state under {', '.join(map(repr, clash))}, which "
            "optimizer.state['clip'] already uses; prefix the policy's state keys with its name"
        )
    return keys


def describe(policy: ClipPolicy | None) -> str:
    """A description of ``policy`` that is the same in every process (ranks compare them)."""
    if policy is None or dataclasses.is_dataclass(policy):
        return repr(policy)
    return f"{type(policy).__qualname__}({sorted(vars(policy).items())!r})"


# ---------------------------------------------------------------------------------------------
# The framework: state in, gate, rule, commit, apply
# ---------------------------------------------------------------------------------------------
def _state(policy: ClipPolicy, keys: Sequence[str], clip_state: dict[str, Any], n_params: int, device) -> dict:
    """The policy's state in ``clip_state`` (the step's pending copy), made at the first step
    (and a key a checkpoint of an older version lacks), then resized to ``n_params``."""
    state = {k: clip_state[k] for k in keys if k in clip_state}
    if len(state) != len(keys):
        fresh = policy.init_state(n_params, device)
        state = {k: state[k] if k in state else fresh[k] for k in keys}
    state = policy.resize_state(state, n_params)
    clip_state.update(state)
    return state


def _commit(
    policy: ClipPolicy, clip_state: dict[str, Any], state: Mapping[str, Any], new, accept: Tensor, host: bool
) -> bool | None:
    """Keep the rule's next state where ``accept``, else the old: on the device, no sync (or,
    ``host``, read once on the host instead of a ``where`` per key; then returns it)."""
    keep = bool(accept) if host else None
    for key, value in new.items():
        old = state.get(key)
        if not isinstance(old, Tensor) or not isinstance(value, Tensor):
            raise ValueError(f"{policy!r}: rule() returned state {key!r}, which is not a tensor of init_state()")
        if value.shape != old.shape or value.dtype != old.dtype:
            raise ValueError(
                f"{policy!r}: rule() returned state {key!r} as a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}; init_state() made it {old.dtype} of shape {tuple(old.shape)}"
            )
        clip_state[key] = torch.where(accept, value, old) if keep is None else value if keep else old
    return keep


def run_policy(
    policy: ClipPolicy,
    keys: Sequence[str],
    norm_type: float,
    batch: GradBatch,
    grad_scale: Tensor | None,
    apply: bool,
    device: torch.device,
    clip_state: dict[str, Any],
    gate: Gate | None = None,
) -> ClipResult:
    """Run ``policy`` over ``batch``: measure, ask the gate, run the rule, keep its state
    where accepted, and clip by its coefficient (a scalar one only if ``apply``)."""
    dev = _device(batch, device)
    total, stacked = _measure(batch, norm_type, grad_scale, dev)
    host = on_host(dev)
    hold, accept = open_gate_on_host(gate, total, total.item()) if host else open_gate(gate, total)
    n_params = batch.n_total if batch.n_total is not None else len(batch)
    state = _state(policy, keys, clip_state, n_params, dev)
    positions = range(len(batch)) if batch.positions is None else batch.positions
    norms = StepNorms(
        total,
        stacked,
        batch.tensors,
        batch.params if batch.params is not None else [],
        positions,
        n_params,
        norm_type,
        grad_scale,
        batch.sharding is not None,
        dev,
        host,
    )
    decision = policy.rule(norms, state)
    if decision.coef is None or decision.threshold is None or decision.skip is not None:
        raise ValueError(f"{policy!r}: rule() must return a coef and a threshold (skip only as skip_spikes=)")
    _commit(policy, clip_state, state, decision.state, accept, norms.host)
    holds: Tensor | bool | None = hold
    if norms.host and hold is not None:
        # read once on the host (the wrapper reads it anyway): a held step is not multiplied
        # at all, which is what multiplying by exactly 1 does, and no where() per gradient
        holds = True if bool(hold) else None
    recorded, threshold = _apply(policy, batch, decision, holds, grad_scale, apply, dev)
    return ClipResult(total, recorded, stacked, threshold.to(total.dtype))


def _apply(policy: ClipPolicy, batch: GradBatch, decision: ClipDecision, hold, grad_scale, apply: bool, dev):
    """Multiply the gradients by the decision's coefficient (1 where ``hold``; a scalar one
    only if ``apply``, else it is folded); return the coefficient and bound to record.
    ``hold`` is a 0-dim bool tensor, or, read on the host, ``None`` (proceeds) or ``True``."""
    coef, threshold = decision.coef, decision.threshold
    assert coef is not None and threshold is not None  # checked by run_policy
    scale = hold is not True  # a held step read on the host: nothing to multiply (x * 1 is x)
    hold = None if hold is True else hold
    if isinstance(coef, Tensor) and coef.ndim == 0:
        if apply and scale:
            scale_(batch, unscaled(held(coef, hold), grad_scale, dev))
        recorded = coef
    elif policy.is_scalar():
        raise ValueError(f"{policy!r}: a scalar policy's rule() must return a 0-dim coef")
    elif isinstance(coef, Tensor):  # one per gradient
        if scale:
            scale_each_(batch, unscaled(held(coef, hold), grad_scale, dev).unbind())
        if not len(batch):
            return torch.ones((), device=dev), torch.full((), math.inf, device=dev)
        # the statistics keep one number: the gradient clipped hardest, its coefficient and bound
        hardest = coef.argmin()
        recorded = coef[hardest]
        threshold = threshold[hardest] if threshold.ndim else threshold
    else:  # one broadcastable factor per gradient
        if scale:
            scale_each_(batch, [unscaled(held(c, hold), grad_scale, dev) for c in coef])
        recorded = torch.ones((), device=dev)
    if decision.clip_coef is not None:
        recorded = decision.clip_coef
    return recorded, threshold


def skip_gate(
    policy: ClipPolicy, keys: Sequence[str], clip_state: dict[str, Any], total: Tensor, enter: Tensor, norm_type: float
) -> Tensor | None:
    """Ask ``policy`` (``skip_spikes=``) whether to skip this step, from the total norm alone.

    ``enter`` (0-dim bool) is whether nothing else holds the step and its norm is finite: the
    skip is honoured and the policy's next state kept only then (a step the policy skips
    itself still updates its state, by the policy's own rule). Returns whether to skip (0-dim
    bool), or, deciding on the host (:func:`on_host`), ``None`` when nothing is skipped.
    """
    device = total.device
    state = _state(policy, keys, clip_state, 0, device)
    host = on_host(device)
    norms = StepNorms(total, empty(device, total.dtype), [], [], [], 0, norm_type, None, False, device, host)
    decision = policy.rule(norms, state)
    if decision.skip is None:
        raise ValueError(f"{policy!r}: as skip_spikes=, rule() must return skip (0-dim bool)")
    if host:  # enter and the skip read on the host: None when there is nothing to skip
        entered = _commit(policy, clip_state, state, decision.state, enter, host)
        return decision.skip if entered and bool(decision.skip) else None
    _commit(policy, clip_state, state, decision.state, enter, host)
    return decision.skip & enter


def check_policy_state(policy: ClipPolicy | None, keys: Sequence[str], clip_state: Mapping, n_params: int) -> None:
    """Check ``policy``'s state in a loaded ``clip_state`` (if it has any yet)."""
    if policy is not None and any(k in clip_state for k in keys):
        policy.check_state(clip_state, n_params)
