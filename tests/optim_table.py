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
