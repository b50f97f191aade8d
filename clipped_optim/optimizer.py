"""``ClippedOptimizer``: gather the gradients, call the clip mode, record, delegate.

No clipping maths lives here: the norms are in :mod:`clipped_optim.norms`, the modes in
:mod:`clipped_optim.modes`, the GradScaler and fused-kernel contract in :mod:`clipped_optim.amp`
and the statistics in :mod:`clipped_optim.stats`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import amp, distributed, modes, stats
from .amp_scaler import fills_found_inf, report_found_inf
from .dispatch import is_scalar, run_mode
from .config import ClipConfig
from .flat import FlatGrads
from ._tensors import index_tensor
from .norms import GradBatch, scale_, tensor_norms, total_norm

__all__ = ["ClippedOptimizer"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class ClippedOptimizer(Optimizer):
    """Clip the gradients, then step the wrapped optimizer.

    ``ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)`` behaves like the
    AdamW it wraps, with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` run before every
    step. It *is* an ``Optimizer`` that shares ``param_groups``, ``state`` and ``defaults``
    with the inner one, so LR schedulers, ``GradScaler`` and checkpoints work unchanged.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        mode: ``"norm"`` (global norm over all gradients), ``"per_param"`` (each gradient
            tensor to ``max_norm`` on its own), ``"value"`` (element-wise clamp), or an
            adaptive mode: ``"agc"``, ``"autoclip"``, ``"zclip"`` (see docs/adaptive.md).
        max_norm: the norm bound for ``"norm"``/``"per_param"``; 1.0 is the usual choice
            for transformers. For ``"zclip"`` the cap on its bound (``None``: no cap).
        norm_type: p of the p-norm (> 0, or ``inf``); also the norm recorded in every mode.
        clip_value: the bound of ``mode="value"`` (required there, rejected elsewhere).
        nonfinite: what a step whose gradients hold NaN/Inf does. ``"skip"`` leaves the
            parameters and the optimizer state untouched and counts the step; ``"raise"``
            raises ``FloatingPointError`` before anything is updated; ``"propagate"`` steps
            anyway, as plain torch does, with no host sync at all.
        foreach: use the ``torch._foreach_*`` kernels (``None``: wherever the device has them).
        history_size: how many recent steps' norms to keep on the device for
            :meth:`report` (``0``: none; 1000 steps cost 16 kB).
        process_group: for manual sharding only (ZeRO-style optimizers, FSDP1, pipeline
            stages): the group over which each rank's gradients are slices of the whole; the
            norm is then reduced over it. DDP and FSDP2/DTensor need nothing; see
            :mod:`clipped_optim.distributed`.
        flat_grads: keep the gradients as views into one contiguous buffer per (device, dtype),
            so the clip is one kernel whatever the parameter count; ``zero_grad()`` then zeroes
            the buffer instead of freeing it (see :mod:`clipped_optim.flat`).
        clip_factor, eps, quantile, history_length, per_param, alpha, z_thresh, warmup_steps,
            clip_option, skip_update_on_spike: options of the adaptive modes ``"agc"``,
            ``"autoclip"`` and ``"zclip"`` (``None``: the mode's default; an option another
            mode reads is rejected). ``max_norm`` is ZClip's cap (``None``: no cap).
            See :mod:`clipped_optim.adaptive` and docs/adaptive.md.
        skip_spikes: skip the whole update when the pre-clip norm exceeds the mean of its
            rolling window of ``spike_window`` (128) norms by ``spike_sigma`` (6) standard
            deviations; any mode. Counted in ``skipped_steps``.

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
        mode: str = "norm",
        max_norm: float | None = 1.0,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        nonfinite: str = "skip",
        foreach: bool | None = None,
        history_size: int = 1000,
        process_group: Any = None,
        flat_grads: bool = False,
        clip_factor: float | None = None,
        eps: float | None = None,
        quantile: float | None = None,
        history_length: int | None = None,
        per_param: bool | None = None,
        alpha: float | None = None,
        z_thresh: float | None = None,
        warmup_steps: int | None = None,
        clip_option: str | None = None,
        skip_update_on_spike: bool | None = None,
        skip_spikes: bool = False,
        spike_sigma: float | None = None,
        spike_window: int | None = None,
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
                process_group=process_group,
                flat_grads=flat_grads,
                clip_factor=clip_factor,
                eps=eps,
                quantile=quantile,
                history_length=history_length,
                per_param=per_param,
                alpha=alpha,
                z_thresh=z_thresh,
                warmup_steps=warmup_steps,
                clip_option=clip_option,
                skip_update_on_spike=skip_update_on_spike,
                skip_spikes=skip_spikes,
                spike_sigma=spike_sigma,
                spike_window=spike_window,
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
        if self._flat is not None and self.config.mode == "autoclip" and self.config.per_param:
            # zero_grad() keeps the views: a parameter without a gradient in a step would push
            # a norm of 0 into its own history and pull its bound down.
            raise ValueError(
                "ClippedOptimizer: flat_grads=True is not supported with mode='autoclip', per_param=True; "
                "use flat_grads=False"
            )
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
            # Optimizers that skip Optimizer.__init__ (torch_optimizer's Lookahead) lack these,
            # and torch's state_dict() and hooked step() read them: give them empty ones.
            if name not in optimizer.__dict__:
                setattr(optimizer, name, OrderedDict())
        self._patch_step_function()
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
        """Clip the gradients, record the statistics, then step the inner optimizer.

        With a closure, the closure is evaluated and clipped first; an inner optimizer that
        evaluates it again (LBFGS) gets every later evaluation clipped too.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = amp.scaler_args(self)
        # Sharded: refuse a rank-local overflow flag; at the first step, check that the
        # ranks agree (see clipped_optim.distributed.before_step).
        distributed.before_step(
            self._reduction, self.config, self.param_groups, self._clip_state(), found_inf, fills_found_inf(self)
        )
        fused = amp.folds_into_kernel(self.optimizer)
        result, folded, finite, skip, found_inf = self._clip_and_record(grad_scale, found_inf, fused and self._can_fold())
        must_raise = self.config.nonfinite == "raise" and found_inf is None
        inner_closure = None if closure is None else self._replay(loss, closure)
        if fused:
            if must_raise:
                self._sync_decision(skip, finite, result, must_raise)
            # The kernel unscales, clips and skips by itself: no host sync.
            divisor = (1.0 if grad_scale is None else grad_scale) / result.clip_coef if folded else None
            with amp.fused_kernel_args(self.optimizer, divisor, skip):
                out = self.optimizer.step(inner_closure)
        elif self._needs_host_decision(found_inf, result) and self._sync_decision(skip, finite, result, must_raise):
            return loss
        else:
            out = self.optimizer.step(inner_closure)
        return loss if closure is not None else out

    def _clip_and_record(self, grad_scale: Tensor | None, found_inf: Tensor | None, fold: bool):
        """Everything a step does before the inner step, with no host sync (it compiles with
        ``fullgraph=True``): gather, measure, clip, decide whether to skip, record.

        Returns ``(result, folded, finite, skip, found_inf)``.
        """
        with torch.no_grad():
            result, folded = self._clip(grad_scale, fold)
        found_inf = report_found_inf(self, result.total_norm, found_inf)  # under ClipGradScaler
        finite = torch.isfinite(result.total_norm)
        skip = self._skip_flag(result, finite, found_inf)
        stats.record(self._clip_state(), result, finite, skip.bool())
        return result, folded, finite, skip, found_inf

    def _can_fold(self) -> bool:
        return is_scalar(self.config) and self._all_groups_clipped()

    def _all_groups_clipped(self) -> bool:
        return all(g.get("clip", True) for g in self.param_groups)

    def _skip_flag(self, result: modes.ClipResult, finite: Tensor, found_inf: Tensor | None) -> Tensor:
        """1.0 if the update must be skipped (float32: the fused kernels' ``found_inf``)."""
        propagate = self.config.nonfinite == "propagate"
        skip = amp.skip_flag(found_inf, torch.ones_like(finite) if propagate else finite)
        if result.skip is not None:  # the mode asks to skip (e.g. a detected spike)
            skip = torch.maximum(skip, result.skip.to(skip.device, skip.dtype))
        return skip

    def _needs_host_decision(self, found_inf: Tensor | None, result: modes.ClipResult) -> bool:
        return self.config.nonfinite != "propagate" or found_inf is not None or result.skip is not None

    def _sync_decision(self, skip: Tensor, finite: Tensor, result: modes.ClipResult, must_raise: bool) -> bool:
        """The one device-to-host sync of a step: whether to skip, raising if ``must_raise``
        (policy "raise" and no GradScaler: under GradScaler an overflow is routine, the scale
        is calibrating, so it is skipped, not raised)."""
        if not must_raise:
            return bool(skip)
        skip_now, bad = torch.stack([skip > 0, ~finite]).tolist()
        if bad:
            self._raise_nonfinite(result)
        return skip_now

    def _raise_nonfinite(self, result: modes.ClipResult) -> None:
        norms = result.param_norms
        bad = [i for i, ok in enumerate(torch.isfinite(norms).tolist()) if not ok]
        step = int(self._clip_state()["steps"])
        raise FloatingPointError(
            f"ClippedOptimizer: non-finite gradients at step {step} (global {self.config.norm_type}-norm = "
            f"{float(result.total_norm)}); parameters and optimizer state were not updated. "
            f"Parameters with NaN/Inf gradients, by index in optimizer order: {bad}. "
            "Use nonfinite='skip' to skip such steps instead."
        )

    def _replay(self, loss: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure for the inner step: the first call returns the loss already computed,
        later calls (LBFGS line search) re-evaluate and clip again."""
        first = [True]

        def replay() -> Any:
            if first[0]:
                first[0] = False
                return loss
            with torch.enable_grad():
                again = closure()
            with torch.no_grad():
                self._clip(None, fold=False)
            return again

        return replay

    # -- gathering the gradients and calling the mode
    def _clip(self, grad_scale: Tensor | None, fold: bool) -> tuple[modes.ClipResult, bool]:
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
        clip_state = self._clip_state()
        # A fused kernel takes grad_scale in float32 only: folding 1/coef would round a
        # float64 gradient's clip to float32 precision, so float64 gradients are scaled here.
        fold = fold and all(dtype != torch.float64 for _, dtype in batch.groups)
        if batch.sharding is not None:
            # Sharded: the opt-outs' finiteness rides on the mode's all-reduce, sent by every
            # rank whether or not it holds an opted-out group (see clipped_optim.distributed).
            norms = self._unclipped_norms(unclipped, grad_scale)
            distributed.attach_unclipped(batch.sharding, norms, clip_state["steps"].device)
        result = run_mode(self.config, batch, grad_scale, not fold, clip_state["steps"].device, clip_state)
        if batch.sharding is not None:
            result = result._replace(total_norm=distributed.add_unclipped(result.total_norm, batch.sharding))
        elif unclipped:
            result = self._check_unclipped(result, unclipped, grad_scale)
        if len(positions) != n_params:
            full = result.param_norms.new_zeros(n_params)
            index = index_tensor(positions, full.device)
            result = result._replace(param_norms=full.index_copy_(0, index, result.param_norms))
        return result, fold

    def _check_unclipped(self, result: modes.ClipResult, unclipped: list[Tensor], grad_scale: Tensor | None):
        """Opted-out groups are not clipped, but NaN/Inf in them still counts: their norms'
        sum is folded into ``total_norm`` only through its finiteness."""
        norms = self._unclipped_norms(unclipped, grad_scale)
        poison = total_norm(norms, self.config.norm_type, result.total_norm.device)[0] * 0
        return result._replace(total_norm=result.total_norm + poison)

    def _unclipped_norms(self, unclipped: list[Tensor], grad_scale: Tensor | None) -> list[Tensor]:
        """The opted-out gradients' norms (this rank's pieces), after unscaling them in place."""
        local, _ = distributed.local_grads(unclipped, self._reduction)
        batch = GradBatch(local, self.config.foreach)
        if grad_scale is not None:
            scale_(batch, grad_scale.reciprocal())
        return tensor_norms(batch, self.config.norm_type)

    def _gather_grads(self) -> tuple[list[Tensor], list[Tensor], list[int], int, list[Tensor]]:
        """The gradients to clip, their positions in optimizer order, the others, the number
        of parameters, and the parameters of the gradients to clip."""
        clipped: list[Tensor] = []
        unclipped: list[Tensor] = []
        positions: list[int] = []
        params: list[Tensor] = []
        n = 0
        for group in self.param_groups:
            target = clipped if group.get("clip", True) else unclipped
            for p in group["params"]:
                g = p.grad
                if g is not None and g.numel() > 0:
                    if g.is_sparse:  # norms and in-place scaling act on the coalesced values
                        p.grad = g = g.coalesce()
                        g = g._values()
                    target.append(g)
                    if target is clipped:
                        positions.append(n)
                        params.append(p)
                n += 1
        return clipped, unclipped, positions, n, params

    # -- statistics and checkpoints
    def _clip_state(self) -> dict[str, Any]:
        state = self.optimizer.state
        if stats.STATE_KEY not in state:  # fresh, or a plain inner state_dict was loaded
            state[stats.STATE_KEY] = stats.new_clip_state(self.config.mode, self._device(), self.config.history_size)
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
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict of this wrapper, or a plain one of the inner optimizer."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        self.optimizer.load_state_dict(state_dict)
        state = self.optimizer.state
        state[stats.STATE_KEY] = stats.restore_clip_state(
            state.get(stats.STATE_KEY), self.config.mode, self._device(), self.config.history_size
        )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def named_grad_norms(self, named_parameters: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
        """The last step's pre-clip gradient norm of each parameter, by name.

        ``opt.named_grad_norms(model.named_parameters())`` maps the recorded ``param_norms``
        back to names; parameters this optimizer does not hold are left out. No sync.
        """
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        norms = self._clip_state()["param_norms"]
        if norms.numel() == 0:
            return {}
        return {name: norms[index[id(p)]] for name, p in named_parameters if id(p) in index}

    # -- reading the statistics (one host sync each; see clipped_optim.diagnostics)
    def stats(self, named_parameters: Any = None, prefix: str = "clip/") -> dict[str, float]:
        """The clip statistics as a flat ``dict[str, float]`` for a logger, with one sync.

        See :func:`clipped_optim.diagnostics.clip_stats`.
        """
        from .diagnostics import clip_stats

        return clip_stats(self, named_parameters, prefix=prefix)

    def report(self, window: int | None = None) -> Any:
        """A :class:`~clipped_optim.diagnostics.ClipReport` over the recorded history, with advice."""
        from .diagnostics import clip_report

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

    def __repr__(self) -> str:
        cfg = self.config
        opts = f"mode={cfg.mode!r}, "
        opts += f"clip_value={cfg.clip_value}, " if cfg.mode == "value" else f"max_norm={cfg.max_norm}, "
        opts += f"norm_type={cfg.norm_type}, nonfinite={cfg.nonfinite!r}"
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"ClippedOptimizer({opts},\n{inner}\n)"
