"""``ClippedOptimizer``: gather the gradients, call the clip mode, record, delegate.

No clipping maths lives here: the norms are in :mod:`clipped_optim.norms`, the modes in
:mod:`clipped_optim.modes`, the GradScaler and fused-kernel contract in :mod:`clipped_optim.amp`
and the statistics in :mod:`clipped_optim.stats`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import amp, distributed, modes, policy, stats
from ._tensors import index_tensor
from .adaptive import AutoClip
from .amp_scaler import fills_found_inf
from .config import DEFAULT_MAX_NORM, ClipConfig
from .decision import StepGate
from .dispatch import is_scalar, run_mode
from .flat import FlatGrads
from .gather import Gathered, Gatherer
from .norms import GradBatch, scale_, tensor_norms, total_norm
from .policy import ClipPolicy
from .step_hooks import run_hooked, step_inner

__all__ = ["ClippedOptimizer"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class _Pending(NamedTuple):
    """One step measured, decided and clipped (or held), with its clip state not yet committed."""

    result: modes.ClipResult
    folded: bool
    gate: StepGate
    state: dict[str, Any]


class _NonFiniteEvaluation(Exception):
    """A closure's re-evaluation inside the inner step gave NaN/Inf gradients."""


class _Snapshot:
    """The parameters and the inner optimizer's state, to restore if a closure step fails."""

    def __init__(self, inner: Optimizer) -> None:
        self.inner = inner
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.values = [p.detach().clone() for p in self.params]
        self.state = {k: copy.deepcopy(v) for k, v in inner.state.items() if k != stats.STATE_KEY}

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        state: dict[Any, Any] = self.inner.state
        clip = state.get(stats.STATE_KEY)
        state.clear()
        state.update(self.state)
        if clip is not None:
            state[stats.STATE_KEY] = clip


def _finite_norm(grad: Tensor, norm_type: float) -> bool:
    """Whether ``grad``'s norm is finite, measured as the step measures it (one host read)."""
    values = grad.coalesce()._values() if grad.is_sparse else grad
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else None
    return bool(torch.isfinite(torch.linalg.vector_norm(values, norm_type, dtype=acc)))


class ClippedOptimizer(Optimizer):
    """Clip the gradients, then step the wrapped optimizer.

    ``ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)`` behaves like the
    AdamW it wraps, with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` run before every
    step. It *is* an ``Optimizer`` that shares ``param_groups``, ``state`` and ``defaults``
    with the inner one, so LR schedulers, ``GradScaler`` and checkpoints work unchanged.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        mode: ``"norm"`` (global norm over all gradients), ``"per_param"`` (each gradient
            tensor to ``max_norm`` on its own), ``"value"`` (element-wise clamp), or a policy:
            :class:`~clipped_optim.AGC`, :class:`~clipped_optim.AutoClip`,
            :class:`~clipped_optim.ZClip` (their options are their fields:
            ``mode=ZClip(z_thresh=3.0)``), a :class:`~clipped_optim.ClipPolicy` of your own, or
            the name of a built-in one with its defaults (``"agc"``, ``"autoclip"``, ``"zclip"``).
        max_norm: the norm bound for ``"norm"``/``"per_param"`` (default 1.0, the usual choice
            for transformers).
        norm_type: p of the p-norm (> 0, or ``inf``; default 2.0); also the norm recorded in
            every mode and the one a policy is given.
        clip_value: the bound of ``mode="value"`` (required there, rejected elsewhere).
        nonfinite: what a step whose gradients hold NaN/Inf does. ``"skip"`` leaves the
            parameters and the optimizer state untouched and counts the step; ``"raise"``
            raises ``FloatingPointError`` before anything is updated; ``"propagate"`` steps
            anyway, as plain torch does, with no host sync at all.
        foreach: use the ``torch._foreach_*`` kernels (``None``: wherever the device has them).
        history_size: how many recent steps' norms to keep on the device for
            :meth:`report` (default 1000, which costs 16 kB, plus the attribution below;
            ``0``: none).
        top_k: how many of each step's largest parameter gradient norms the history keeps
            with their parameters' indices, so that :meth:`report` can name the parameters
            behind an outlier step (``3`` is a good choice: ``history_size * top_k * 2`` more
            float32, 24 kB with the default history; two more small ops a step). Default 0:
            none, so that the default step stays at the cost of ``clip_grad_norm_`` on small
            models. See :mod:`clipped_optim.stats`.
        process_group: for manual sharding only (ZeRO-style optimizers, FSDP1, pipeline
            stages): the group over which each rank's gradients are slices of the whole; the
            norm is then reduced over it. DDP and FSDP2/DTensor need nothing; see
            :mod:`clipped_optim.distributed`.
        flat_grads: keep the gradients as views into one contiguous buffer per (device, dtype),
            so the clip is one kernel whatever the parameter count; ``zero_grad()`` then zeroes
            the buffer instead of freeing it (see :mod:`clipped_optim.flat`).
        skip_spikes: skip the whole update when the pre-clip norm is a spike:
            ``SpikeSkip(sigma=6.0, window=128)`` (``True``: those defaults), beside any mode.
            Counted in ``skipped_steps`` (default False).

    The adaptive policies follow the reference implementations, with their defaults: timm's
    ``adaptive_clip_grad`` (AGC), the autoclip package's ``QuantileClip`` (AutoClip), the zclip
    package's ``ZClip`` (whose ``max_grad_norm=1.0`` is ``ZClip.max_norm``), OLMo-core's
    ``SkipStepOptimizer`` (SpikeSkip). See :mod:`clipped_optim.adaptive` and, to write your
    own, :mod:`clipped_optim.policy`. The per-mode keyword arguments of 0.1 (``z_thresh=``,
    ``quantile=``, ...) are refused with a ``TypeError`` that shows the object form.

    ``"skip"`` and ``"raise"`` need to know on the host whether the norm is finite before the
    inner step: that is the one device-to-host sync of a step. A fused inner optimizer
    (``fused=True``) skips inside its own kernel through ``found_inf``, so then there is none.

    A param group with ``"clip": False`` is neither measured nor clipped (NFNets leave the
    final classifier unclipped).

    The statistics are in ``self.state["clip"]``; see :mod:`clipped_optim.stats`.

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
        ICML 2013.
    """

    # GradScaler hands this optimizer the scale and the overflow flag instead of unscaling
    # itself, so the unscale merges into the clip multiply (see clipped_optim.amp).
    _step_supports_amp_scaling = True
    # ClipGradScaler skips its own inf-check pass: the step reports the finiteness of the norm.
    reports_found_inf = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        mode: str | ClipPolicy = "norm",
        max_norm: float = DEFAULT_MAX_NORM,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        nonfinite: str = "skip",
        foreach: bool | None = None,
        history_size: int = 1000,
        top_k: int = 0,
        process_group: Any = None,
        flat_grads: bool = False,
        skip_spikes: bool | ClipPolicy = False,
        **unexpected: Any,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"ClippedOptimizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ClippedOptimizer):
            raise ValueError("ClippedOptimizer: optimizer is already a ClippedOptimizer; wrap the inner one once")
        self.config = ClipConfig.from_kwargs(
            dict(
                mode=mode,
                max_norm=max_norm,
                norm_type=norm_type,
                clip_value=clip_value,
                nonfinite=nonfinite,
                foreach=foreach,
                history_size=history_size,
                top_k=top_k,
                process_group=process_group,
                flat_grads=flat_grads,
                skip_spikes=skip_spikes,
                **unexpected,
            )
        )
        self.optimizer = optimizer
        self._reduction = distributed.plan_reduction(self.config, self.param_groups)
        self._flat = FlatGrads() if self.config.flat_grads else None
        if self._flat is not None and self._reduction is not None:
            raise ValueError(
                "ClippedOptimizer: flat_grads=True is not supported with sharded gradients "
                "(DTensor parameters or process_group=); use flat_grads=False"
            )
        if self._flat is not None and isinstance(self.config.policy, AutoClip) and self.config.policy.per_param:
            # zero_grad() keeps the views: a parameter without a gradient in a step would push
            # a norm of 0 into its own history and pull its bound down.
            raise ValueError(
                "ClippedOptimizer: flat_grads=True is not supported with mode=AutoClip(per_param=True); "
                "use flat_grads=False"
            )
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
            # Optimizers that skip Optimizer.__init__ (torch_optimizer's Lookahead) lack these,
            # and torch's state_dict() and hooked step() read them: give them empty ones.
            if name not in optimizer.__dict__:
                setattr(optimizer, name, OrderedDict())
        self._patch_step_function()
        self._recorder = stats.Recorder()
        self._gatherer = Gatherer()
        self._gatherer = Gatherer()
        self._clip_state()

    # -- sharing the inner optimizer's state: properties, because load_state_dict replaces
    # -- the inner objects and a reference copied here would go stale.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # -- the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip the gradients, then step the inner optimizer; record the step once it is done.

        The step is atomic: it proceeds entirely, or it is skipped (non-finite gradients, a
        GradScaler overflow, a spike) with the parameters, the inner state, the adaptive state
        and ``p.grad`` left as they were and only the skip recorded, or it raises (the policy
        ``"raise"``, the inner step, the closure) with nothing recorded. A closure is
        evaluated and clipped first; an inner optimizer that evaluates it again (LBFGS) gets
        every later evaluation clipped to the same rule, and one that comes out NaN/Inf undoes
        the step (the parameters and the inner state are restored from a copy taken before it).
        """
        # torch would wrap this step in a profiler range that costs a dispatcher call even when
        # no profiler records; the same hooks run here (see clipped_optim.step_hooks).
        return run_hooked(self, type(self)._step, closure)

    step.hooked = True  # type: ignore[attr-defined]  # torch's _patch_step_function: leave it unwrapped

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        """:meth:`step` without the hooks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = amp.scaler_args(self)
        # Sharded: refuse a rank-local overflow flag; at the first step, check that the
        # ranks agree (see clipped_optim.distributed.before_step).
        if self._reduction is not None:
            distributed.before_step(
                self._reduction, self.config, self.param_groups, self._clip_state(), found_inf, fills_found_inf(self)
            )
        fused = amp.folds_into_kernel(self.optimizer)
        pending = self._prepare(grad_scale, found_inf, fused and self._can_fold())
        must_raise = self.config.nonfinite == "raise" and found_inf is None
        if self._skipped_on_host(pending, found_inf, fused, must_raise):
            self._commit(pending)
            return loss
        try:
            if fused:  # the kernel unscales, clips and skips by itself: no host sync
                coef = pending.result.clip_coef
                divisor = (1.0 if grad_scale is None else grad_scale) / coef if pending.folded else None
                with amp.fused_kernel_args(self.optimizer, divisor, pending.gate.decided()[2]):
                    out = self._inner_step(closure, loss)
            else:
                out = self._inner_step(closure, loss)
        except _NonFiniteEvaluation:
            if must_raise:
                self._raise_nonfinite()
            pending.gate.mark_nonfinite()
            out = loss
        self._commit(pending)
        return loss if closure is not None else out

    def _prepare(self, grad_scale: Tensor | None, found_inf: Tensor | None, fold: bool) -> _Pending:
        """Gather, measure, decide and clip (or hold) the gradients, with no host sync; the clip
        state's updates are kept aside until :meth:`_commit`."""
        enabled = torch.is_grad_enabled()
        # torch.no_grad(), without its context-manager objects (a few us, on every step)
        torch._C._set_grad_enabled(False)
        try:
            state = dict(self._clip_state())
            gate = StepGate(self.config, state, found_inf, reporter=self)
            result, folded = self._clip(grad_scale, fold, state, gate)
        finally:
            torch._C._set_grad_enabled(enabled)
        return _Pending(result, folded, gate, state)

    def _commit(self, pending: _Pending) -> None:
        """Make the step's clip state the optimizer's and record the step: only once the step
        is done (proceeded or skipped), so one that raised is not recorded."""
        state = self._clip_state()
        state.update(pending.state)  # the adaptive updates, already gated by the decision
        gate = pending.gate
        assert gate.finite is not None and gate.hold is not None, "the gate was not asked"
        skip = gate.skip if "history" in state else None  # the float flag, shared with a fused kernel
        # Sharded, param_norms are of this rank's pieces, not of whole parameters: no attribution.
        attribute = self._reduction is None
        self._recorder(
            state,
            pending.result,
            gate.finite,
            gate.hold,
            gate.nonfinite,
            gate.proceeded,
            skip,
            attribute,
            held=gate.held_on_host(),
        )

    def _clip_and_record(self, grad_scale: Tensor | None, found_inf: Tensor | None, fold: bool):
        """Everything a step does besides the inner step, with no host sync (it compiles with
        ``fullgraph=True``): gather, measure, decide, clip, record.

        Returns ``(result, folded, finite, skip, found_inf)``.
        """
        pending = self._prepare(grad_scale, found_inf, fold)
        self._commit(pending)
        return pending.result, pending.folded, pending.gate.finite, pending.gate.skip, found_inf

    def _skipped_on_host(self, pending: _Pending, found_inf: Tensor | None, fused: bool, must_raise: bool) -> bool:
        """Whether the step is skipped, read on the host: the step's one device-to-host sync.

        None is needed with a fused kernel, which skips through ``found_inf`` by itself, unless
        the inner step would create state (a kernel told to skip still creates it, and fused
        SGD's momentum buffer is then uninitialised memory), nor under ``"propagate"`` with
        nothing else to skip for. Under ``"raise"`` the same read also raises.
        """
        if must_raise:
            finite, hold, _ = pending.gate.decided()
            skip, bad = torch.stack([hold, ~finite]).tolist()
            if bad:
                self._raise_nonfinite()
            return skip
        if fused:
            return self._creates_state() and pending.gate.held()
        needs_host = self.config.nonfinite != "propagate" or found_inf is not None or self.config.skip is not None
        return needs_host and pending.gate.held()

    def _creates_state(self) -> bool:
        """Whether a parameter with a gradient has no inner state yet (first step, new group)."""
        state = self.optimizer.state
        groups = self.param_groups
        if len(state) > sum(len(g["params"]) for g in groups):  # every parameter has an entry
            return False
        return any(p.grad is not None and not state.get(p) for g in groups for p in g["params"])

    def _can_fold(self) -> bool:
        return is_scalar(self.config) and self._all_groups_clipped()

    def _all_groups_clipped(self) -> bool:
        return all(g.get("clip", True) for g in self.param_groups)

    def _raise_nonfinite(self) -> None:
        """Raise for the policy "raise", naming every parameter whose gradient norm is NaN/Inf
        (opted-out groups included). The gradients were held: they are as backward left them."""
        params = [p for g in self.param_groups for p in g["params"]]
        bad = [
            i for i, p in enumerate(params) if p.grad is not None and not _finite_norm(p.grad, self.config.norm_type)
        ]
        step = int(self._clip_state()["steps"]) + 1
        where = f"by index in optimizer order: {bad}" if bad else "none alone: the global norm overflowed"
        raise FloatingPointError(
            f"ClippedOptimizer: non-finite gradients at step {step}; parameters, gradients and "
            f"optimizer state were not updated. Parameters with a NaN/Inf gradient norm, {where}. "
            "Use nonfinite='skip' to skip such steps instead."
        )

    def _inner_step(self, closure: Callable[[], Any] | None, loss: Any) -> Any:
        if closure is None:
            return step_inner(self.optimizer, None)
        # Undo what the inner step did if a re-evaluation is non-finite or anything raises
        # (a copy of the parameters and the inner state: paid by closure steps only).
        snapshot = None if self.config.nonfinite == "propagate" else _Snapshot(self.optimizer)
        try:
            return step_inner(self.optimizer, self._replay(loss, closure))
        except BaseException:
            if snapshot is not None:
                snapshot.restore()
            raise

    def _replay(self, loss: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure for the inner step: the first call returns the loss already computed;
        later calls (LBFGS line search) re-evaluate and clip again, by the rule of the step's
        start (the adaptive state advances once per ``step()``, not per evaluation)."""
        first = [True]

        def replay() -> Any:
            if first[0]:
                first[0] = False
                return loss
            with torch.enable_grad():
                again = closure()
            with torch.no_grad():
                scratch = dict(self._clip_state())
                gate = StepGate(self.config, scratch, spikes=False)
                self._clip(None, False, scratch, gate)
            if self.config.nonfinite != "propagate" and gate.held():
                raise _NonFiniteEvaluation
            return again

        return replay

    # -- gathering the gradients and calling the mode
    def _clip(
        self, grad_scale: Tensor | None, fold: bool, clip_state: dict[str, Any], gate: StepGate
    ) -> tuple[modes.ClipResult, bool]:
        """Measure and clip; with ``fold`` the coefficient is left for the fused kernel to apply.
        Returns the result and whether it was folded."""
        if self._flat is None:
            clipped, unclipped, positions, n_params, params = self._gather_grads()
            local, sharding = distributed.local_grads(clipped, self._reduction)
            batch = GradBatch(local, self.config.foreach, sharding)
        else:  # the views of the last step, or a (re-)adoption: see clipped_optim.flat
            gathered, batch = self._flat.gather(self._gather_grads, self.param_groups, self.config.foreach)
            clipped, unclipped, positions, n_params, params = gathered
        batch.set_owners(params, positions, n_params)  # for AGC and per-parameter AutoClip
        # A fused kernel takes grad_scale in float32 only: folding 1/coef would round a
        # float64 gradient's clip to float32 precision, so float64 gradients are scaled here.
        fold = fold and all(dtype != torch.float64 for _, dtype in batch.groups)
        device = clip_state["steps"].device
        if batch.sharding is not None:
            # Sharded: the opt-outs' finiteness rides on the mode's all-reduce, sent by every
            # rank whether or not it holds an opted-out group; the gate reads it once the mode
            # has reduced (see clipped_optim.distributed).
            distributed.attach_unclipped(batch.sharding, self._unclipped_norms(unclipped, grad_scale), device)
            gate.sharding = batch.sharding
        elif unclipped:  # measured before the mode runs, so that the gate holds the clipped gradients too
            norms = self._unclipped_norms(unclipped, grad_scale)
            gate.poison = total_norm(norms, self.config.norm_type, device)[0] * 0
        result = run_mode(self.config, batch, grad_scale, not fold, device, clip_state, gate)
        gate.settle(result.total_norm)
        if gate.poison is not None:
            result = result._replace(total_norm=result.total_norm + gate.poison)
        if len(positions) != n_params:
            full = result.param_norms.new_zeros(n_params)
            index = index_tensor(positions, full.device)
            result = result._replace(param_norms=full.index_copy_(0, index, result.param_norms))
        return result, fold

    def _unclipped_norms(self, unclipped: list[Tensor], grad_scale: Tensor | None) -> list[Tensor]:
        """The opted-out gradients' norms (this rank's pieces), after unscaling them in place:
        opted-out groups are not clipped, but NaN/Inf in them still counts (their norms enter
        ``total_norm`` only through their finiteness)."""
        local, _ = distributed.local_grads(unclipped, self._reduction)
        batch = GradBatch(local, self.config.foreach)
        if grad_scale is not None:
            scale_(batch, grad_scale.reciprocal())
        return list(tensor_norms(batch, self.config.norm_type))  # a plain batch: a list already

    def _gather_grads(self) -> Gathered:
        """The gradients to clip and the others, with their positions and parameters (see
        :mod:`clipped_optim.gather`)."""
        return self._gatherer(self.param_groups)

    # -- statistics and checkpoints
    def _clip_state(self) -> dict[str, Any]:
        state: dict[Any, Any] = self.optimizer.state  # parameters as keys, and the string "clip"
        if stats.STATE_KEY not in state:  # fresh, or a plain inner state_dict was loaded
            state[stats.STATE_KEY] = stats.new_clip_state(
                self.config.mode_name, self._device(), self.config.history_size, self.config.top_k
            )
        return state[stats.STATE_KEY]

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict; the clip statistics are its ``state["clip"]``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        inner_state = state_dict.get("state")
        if isinstance(inner_state, dict) and stats.STATE_KEY in inner_state:
            # a dict of its own, so the next steps' new statistics do not appear in it; the
            # shapes let a report read from the checkpoint alone describe the parameters
            clip = inner_state[stats.STATE_KEY] = dict(inner_state[stats.STATE_KEY])
            clip["param_shapes"] = [tuple(int(d) for d in p.shape) for p in self._params()]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict of this wrapper, or a plain one of the inner optimizer.

        All or nothing: the clip state is checked (mode, every key's type, dtype and shape,
        the history and adaptive sizes) and copied before anything is changed, so a refused
        checkpoint leaves the optimizer as it was, and later steps never edit the caller's dict.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        clip = self._restored_clip_state(_find_clip_state(state_dict))
        self.optimizer.load_state_dict(state_dict)  # torch checks the groups before it assigns
        inner_state: dict[Any, Any] = self.optimizer.state
        inner_state[stats.STATE_KEY] = clip
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _restored_clip_state(self, loaded: Any) -> dict[str, Any]:
        cfg = self.config
        state = stats.restore_clip_state(loaded, cfg.mode_name, self._device(), cfg.history_size, cfg.top_k)
        n_params = sum(len(g["params"]) for g in self.param_groups)
        policy.check_policy_state(cfg.policy, cfg.policy_keys, state, n_params)
        # a skip policy is asked from the total norm alone, with n_params=0 (policy.skip_gate):
        # its state is checked as it was made
        policy.check_policy_state(cfg.skip, cfg.skip_keys, state, 0)
        return state

    def named_grad_norms(self, named_parameters: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
        """The last step's pre-clip gradient norm of each parameter, by name.

        ``opt.named_grad_norms(model.named_parameters())`` maps the recorded ``param_norms``
        back to names; parameters this optimizer does not hold are left out. No sync.
        """
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        norms = self._clip_state()["param_norms"]
        if norms.numel() == 0:
            return {}
        # a parameter added (add_param_group) after the last step has no recorded norm yet
        return {name: norms[index[id(p)]] for name, p in named_parameters if index.get(id(p), len(norms)) < len(norms)}

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def name_parameters(self, named_parameters: Any) -> list[str | None]:
        """Remember each parameter's name, so reports and later checkpoints can use them.

        ``opt.name_parameters(model.named_parameters())`` (or a ``{name: parameter}`` map)
        matches the parameters by identity to this optimizer's order; those it does not hold
        are ignored, and its own parameters without a name get ``None``. The names are kept in
        ``state["clip"]["param_names"]`` (plain strings, so ``state_dict()`` carries them).
        The package's Lightning and Hugging Face callbacks call this for you.

        Returns:
            The names in optimizer order.
        """
        from .diagnostics import names_in_order

        names = names_in_order(self._params(), named_parameters)
        self._clip_state()["param_names"] = names
        return names

    # -- reading the statistics (one host sync each; see clipped_optim.diagnostics)
    def stats(self, named_parameters: Any = None, prefix: str = "clip/") -> dict[str, float]:
        """The clip statistics as a flat ``dict[str, float]`` for a logger, with one sync.

        See :func:`clipped_optim.diagnostics.clip_stats`.
        """
        from .diagnostics import clip_stats

        return clip_stats(self, named_parameters, prefix=prefix)

    def report(self, named_parameters: Any = None, window: int | None = None) -> Any:
        """A :class:`~clipped_optim.diagnostics.ClipReport` over the recorded history, with advice
        and the parameters behind the outlier steps.

        Args:
            named_parameters: ``model.named_parameters()`` or a ``{name: parameter}`` map: the
                report names the parameters with these (and keeps them, as
                :meth:`name_parameters` does). Without it, the names given before are used,
                else each parameter is given by its index in optimizer order and its shape.
                An ``int`` here is taken as ``window``, as in ``report(100)`` before names
                could be given.
            window: the number of most recent steps to cover (default: the whole history).
        """
        from .diagnostics import clip_report

        if isinstance(named_parameters, int) and not isinstance(named_parameters, bool):
            if window is not None:
                raise TypeError("ClippedOptimizer.report: window given twice (positionally and by keyword)")
            named_parameters, window = None, named_parameters
        if named_parameters is not None:
            self.name_parameters(named_parameters)
        return clip_report(self, window=window)

    # -- the rest of the Optimizer API, delegated
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the inner optimizer's; with ``flat_grads=True`` the buffer is zeroed and kept."""
        if self._flat is None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        else:
            self._flat.zero_grad(self.param_groups, set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        # A new group may change where the norm is reduced (DTensor parameters).
        try:
            self._reduction = distributed.plan_reduction(self.config, self.param_groups, self._reduction)
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        # Like torch.optim.Optimizer, hooks are not pickled (they are often lambdas); nor is
        # the ``step`` an LR scheduler patched onto the instance.
        return {"optimizer": self.optimizer, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizer = state["optimizer"]
        self.config = state["config"]
        self._reduction = distributed.plan_reduction(self.config, self.param_groups)
        self._flat = FlatGrads() if self.config.flat_grads else None
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._recorder = stats.Recorder()
        self._gatherer = Gatherer()

    def __repr__(self) -> str:
        cfg = self.config
        opts = f"mode={cfg.mode_name!r}, " if cfg.policy is None else f"mode={cfg.policy!r}, "
        if cfg.policy is None:
            opts += f"clip_value={cfg.clip_value}, " if cfg.mode == "value" else f"max_norm={cfg.max_norm}, "
        opts += f"norm_type={cfg.norm_type}, nonfinite={cfg.nonfinite!r}"
        opts += f", skip_spikes={cfg.skip!r}" if cfg.skip is not None else ""
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"ClippedOptimizer({opts},\n{inner}\n)"


def _find_clip_state(state_dict: dict[str, Any]) -> Any:
    """The clip state inside an optimizer state dict: under ``"state"`` (torch's layout), or
    under another top-level dict (torch_optimizer's Lookahead keeps its own as ``"slow_state"``)."""
    candidates = [state_dict.get("state")] + [v for k, v in state_dict.items() if k != "state"]
    for value in candidates:
        if isinstance(value, dict) and stats.STATE_KEY in value:
            return value[stats.STATE_KEY]
    return None
