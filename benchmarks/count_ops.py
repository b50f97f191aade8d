"""Count the ops a clip step dispatches (the wrapper's part only: the inner step is a no-op).

    python benchmarks/count_ops.py [--top-k K]

A ``TorchDispatchMode`` records every op that reaches the dispatcher during ``opt.step()`` on a
small model (28 parameters, AdamW foreach, whose ``step`` is replaced by a no-op so that only
the clip's ops are counted), after two warm-up steps; the count is the same every step.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipped_optim import ClippedOptimizer


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count(**options: object) -> list[str]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(14)])  # 28 parameters
    inner = torch.optim.AdamW(model.parameters(), foreach=True)
    inner.step = lambda closure=None: None  # type: ignore[method-assign]
    opt = ClippedOptimizer(inner, **options)  # type: ignore[arg-type]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    with Count() as counter:
        opt.step()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=None, help="pass top_k= (default: the constructor's)")
    args = parser.parse_args()
    ops = count(**({} if args.top_k is None else {"top_k": args.top_k}))
    print(f"{len(ops)} ops per step")
    for op, n in sorted(Counter(ops).items()):
        print(f"  {n:3d} {op}")


if __name__ == "__main__":
    main()
