"""The one table of inner optimizers that drives the tests.

Each row builds an inner optimizer for a list of parameters. ``closure``: its step needs one
(LBFGS). ``sparse``: it needs sparse gradients (SparseAdam). ``matrix_only``: it accepts only
2-D parameters (Muon). ``fused``: it consumes GradScaler's ``grad_scale``/``found_inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimRow:
    name: str
    build: Callable[[list], torch.optim.Optimizer]
    closure: bool = False
    sparse: bool = False
    matrix_only: bool = False
    fused: bool = False
    create_graph: bool = False  # needs loss.backward(create_graph=True) (Adahessian)
    lr_schedulable: bool = True  # group["lr"] is a number
    # torch_optimizer's Lookahead.load_state_dict leaves its param_groups and its inner
    # optimizer's as two different lists, so it does not resume bit-identically even unwrapped.
    resumes_exactly: bool = True

    def __repr__(self) -> str:
        return self.name


O = torch.optim
TORCH_OPTIMIZERS = [
    OptimRow("SGD", lambda p: O.SGD(p, lr=0.1)),
    OptimRow("SGD-momentum-foreach", lambda p: O.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=True)),
    OptimRow("SGD-fused", lambda p: O.SGD(p, lr=0.1, momentum=0.9, fused=True), fused=True),
    OptimRow("Adam-forloop", lambda p: O.Adam(p, lr=1e-2, foreach=False)),
    OptimRow("Adam-foreach", lambda p: O.Adam(p, lr=1e-2, foreach=True)),
    OptimRow("Adam-fused", lambda p: O.Adam(p, lr=1e-2, fused=True), fused=True),
    OptimRow("AdamW-forloop", lambda p: O.AdamW(p, lr=1e-2, foreach=False)),
    OptimRow("AdamW-foreach", lambda p: O.AdamW(p, lr=1e-2, foreach=True, amsgrad=True)),
    OptimRow("AdamW-fused", lambda p: O.AdamW(p, lr=1e-2, fused=True), fused=True),
    OptimRow("RMSprop", lambda p: O.RMSprop(p, lr=1e-2, momentum=0.5, centered=True)),
    OptimRow("Adagrad", lambda p: O.Adagrad(p, lr=0.1)),
    OptimRow("Adagrad-fused", lambda p: O.Adagrad(p, lr=0.1, fused=True), fused=True),
    OptimRow("Adadelta", lambda p: O.Adadelta(p, lr=1.0)),
    OptimRow("Adamax", lambda p: O.Adamax(p, lr=1e-2)),
    OptimRow("NAdam", lambda p: O.NAdam(p, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.01)),
    OptimRow("RAdam", lambda p: O.RAdam(p, lr=1e-2)),
    OptimRow("ASGD", lambda p: O.ASGD(p, lr=1e-2, t0=2)),
    OptimRow("Rprop", lambda p: O.Rprop(p, lr=1e-2)),
    OptimRow("Adafactor", lambda p: O.Adafactor(p, lr=1e-2)),
    OptimRow("Muon", lambda p: O.Muon(p, lr=1e-2), matrix_only=True),
    OptimRow("LBFGS", lambda p: O.LBFGS(p, lr=0.5, max_iter=4, history_size=5), closure=True),
    OptimRow("SparseAdam", lambda p: O.SparseAdam(p, lr=1e-2), sparse=True),
]


def _with_hook_dicts(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Lookahead skips ``Optimizer.__init__``. Once any Lookahead has gone through torch's
    ``load_state_dict`` or ``__setstate__``, the class's ``step`` is hooked and reads hook dicts
    that an unwrapped Lookahead lacks: the unwrapped reference gets them the way the wrapper
    gives them to the one it wraps."""
    from collections import OrderedDict

    for name in (
        "step_pre",
        "step_post",
        "state_dict_pre",
        "state_dict_post",
        "load_state_dict_pre",
        "load_state_dict_post",
    ):
        opt.__dict__.setdefault(f"_optimizer_{name}_hooks", OrderedDict())
    return opt


def _torch_optimizer_rows() -> list[OptimRow]:
    """Every class of ``torch_optimizer`` 0.3.0; each one runs on torch 2.13 (a survey ran
    them all, see the README for the ones with caveats)."""
    try:
        import torch_optimizer as T
    except ImportError:  # the test extra is not installed: these rows are skipped
        return []
    lr = {"A2GradExp": None, "A2GradInc": None, "A2GradUni": None, "Adafactor": None}
    names = [
        "A2GradExp", "A2GradInc", "A2GradUni", "AccSGD", "AdaBelief", "AdaBound", "AdaMod", "Adafactor",
        "Adahessian", "AdamP", "AggMo", "Apollo", "DiffGrad", "LARS", "Lamb", "MADGRAD", "NovoGrad", "PID",
        "QHAdam", "QHM", "RAdam", "Ranger", "RangerQH", "RangerVA", "SGDP", "SGDW", "SWATS", "Shampoo", "Yogi",
    ]  # fmt: skip
    rows = []
    for name in names:
        cls = getattr(T, name)
        kwargs = {} if name in lr else {"lr": 0.01}
        rows.append(
            OptimRow(
                f"torch_optimizer.{name}",
                lambda p, cls=cls, kwargs=kwargs: cls(p, **kwargs),
                create_graph=name == "Adahessian",
                lr_schedulable=name not in lr,
            )
        )
    for inner, build in {
        "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "Adam": lambda p: torch.optim.Adam(p),
    }.items():
        rows.append(
            OptimRow(
                f"torch_optimizer.Lookahead({inner})",
                lambda p, b=build: _with_hook_dicts(T.Lookahead(b(p), k=3)),
                resumes_exactly=False,
            )
        )
    return rows


TORCH_OPTIMIZER_ROWS = _torch_optimizer_rows()
