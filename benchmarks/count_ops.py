"""Count the ops a clip step dispatches (the wrapper's part only: the inner step is a no-op).

    python benchmarks/count_ops.py [--top-k K] [--time]
    python benchmarks/count_ops.py --modes

A ``TorchDispatchMode`` records every op that reaches the dispatcher during ``opt.step()`` on a
small model (28 parameters, AdamW foreach, whose ``step`` is replaced by a no-op so that only
the clip's ops are counted), after ten warm-up steps: the first clip the gradients, which then
stay within the bound, and a CPU step multiplies only when it clips. The count is then the
same every step.
``--time`` also times that clip-only step with ``top_k=3`` and ``top_k=0``, interleaved (medians
of 2,000 pairs, on 28 and on 400 parameters; machine-dependent).
``--modes`` counts each adaptive mode and spike skipping beside the default, in the steady state
(after 150 steps: past ZClip's warm-up and a full spike window), on both paths of the rules: on
the host (what a CPU step takes) and on the device (an accelerator's, run here on the CPU); a
host read (``_local_scalar_dense``) is counted as an op.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipped_optim import ClippedOptimizer, policy


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def clip_only(n_layers: int = 14, warm: int = 2, **options: object) -> ClippedOptimizer:
    """A wrapper over AdamW (foreach) whose inner step does nothing, with gradients set."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(n_layers)])  # 2 parameters a layer
    inner = torch.optim.AdamW(model.parameters(), foreach=True)
    inner.step = lambda closure=None: None  # type: ignore[method-assign]
    opt = ClippedOptimizer(inner, **options)  # type: ignore[arg-type]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for _ in range(warm):
        opt.step()
    return opt


def count(warm: int = 10, **options: object) -> list[str]:
    opt = clip_only(warm=warm, **options)
    with Count() as counter:
        opt.step()
    return counter.ops


def time_pairs(n_layers: int, pairs: int = 2000) -> tuple[float, float]:
    """Median microseconds of the clip-only step with top_k=3 and with top_k=0, interleaved."""
    on, off = clip_only(n_layers, top_k=3), clip_only(n_layers, top_k=0)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(pairs):
        for opt, out in ((on, times[0]), (off, times[1])):
            start = time.perf_counter()
            opt.step()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


MODES: dict[str, dict[str, object]] = {
    "default": {},
    'mode="zclip"': dict(mode="zclip"),
    'mode="autoclip"': dict(mode="autoclip"),
    'mode="agc"': dict(mode="agc"),
    "skip_spikes=True": dict(skip_spikes=True),
}


def count_modes() -> None:
    print("| options | ops, host path (CPU) | ops, device path |")
    print("|---|---|---|")
    for name, options in MODES.items():
        counts = []
        for host in (True, False):
            policy.HOST_SCALARS = host
            counts.append(len(count(warm=150, **options)))
        policy.HOST_SCALARS = True
        print(f"| {name} | {counts[0]} | {counts[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=None, help="pass top_k= (default: the constructor's)")
    parser.add_argument("--time", action="store_true", help="also time the clip-only step, top_k=3 vs 0")
    parser.add_argument("--modes", action="store_true", help="count each adaptive mode, on both paths")
    args = parser.parse_args()
    if args.modes:
        return count_modes()
    ops = count(**({} if args.top_k is None else {"top_k": args.top_k}))
    print(f"{len(ops)} ops per step")
    for op, n in sorted(Counter(ops).items()):
        print(f"  {n:3d} {op}")
    if args.time:
        torch.set_num_threads(1)
        for layers in (14, 200):
            on, off = time_pairs(layers)
            print(f"{2 * layers} parameters: {on:.1f} us with top_k=3, {off:.1f} us with top_k=0 (medians)")


if __name__ == "__main__":
    main()
