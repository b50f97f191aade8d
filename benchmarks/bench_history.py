"""Cost of the norm-history ring buffer: ClippedOptimizer.step() with history_size=1000 vs 0.

    python benchmarks/bench_history.py [--reps 200] [--threads 2]

Workloads: W1 = 400 fp32 tensors x 2,500 elements; W3 = a 6-layer nn.TransformerEncoder
(d_model 256, 4 heads, ffn 1024: 72 tensors, 4.7M elements). Inner optimizer: fused AdamW (the cheapest
step, so the buffer's share is largest). The two variants are interleaved step by step; the
script prints medians and the median of the paired ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from clipped_optim import ClippedOptimizer


def workload(name: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    if name == "W1":
        params = [torch.nn.Parameter(torch.randn(2500)) for _ in range(400)]
    else:
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        params = list(torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("W1", "W3"):
        params = workload(name)
        opts = {
            size: ClippedOptimizer(torch.optim.AdamW(params, lr=1e-6, fused=True), max_norm=1.0, history_size=size)
            for size in (0, 1000)
        }
        times: dict[int, list[float]] = {0: [], 1000: []}
        for rep in range(args.reps + 10):
            for size in (0, 1000) if rep % 2 else (1000, 0):  # alternate the order
                start = time.perf_counter()
                opts[size].step()
                elapsed = time.perf_counter() - start
                if rep >= 10:  # warm-up
                    times[size].append(elapsed)
        ratios = [a / b for a, b in zip(times[1000], times[0])]
        print(
            f"{name}: step history_size=0 {statistics.median(times[0]) * 1e6:,.0f} us, "
            f"history_size=1000 {statistics.median(times[1000]) * 1e6:,.0f} us, "
            f"paired ratio median {statistics.median(ratios):.3f}"
        )


def record_only(reps: int = 2000) -> None:
    """``stats.record`` alone, with and without the buffer: the absolute cost of one write."""
    from clipped_optim import stats
    from clipped_optim.modes import ClipResult

    one = torch.ones(())
    result = ClipResult(one * 2, one * 0.5, torch.ones(72), one)
    finite, skipped = torch.tensor(True), torch.tensor(False)
    states = {size: stats.new_clip_state("norm", torch.device("cpu"), size) for size in (0, 1000)}
    times: dict[int, list[float]] = {0: [], 1000: []}
    for rep in range(reps):
        for size in (0, 1000) if rep % 2 else (1000, 0):
            start = time.perf_counter()
            stats.record(states[size], result, finite, skipped)
            times[size].append(time.perf_counter() - start)
    m0, m1 = statistics.median(times[0]), statistics.median(times[1000])
    print(
        f"stats.record: without buffer {m0 * 1e6:.1f} us, with {m1 * 1e6:.1f} us (+{(m1 - m0) * 1e6:.1f} us per step)"
    )


if __name__ == "__main__":
    main()
    record_only()
