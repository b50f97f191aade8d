"""Time ClippedOptimizer against ``clip_grad_norm_`` + ``step()``, interleaved in one process.

    python benchmarks/bench_clip.py            # W1, W2, W3 (a few minutes on 2 cores)
    python benchmarks/bench_clip.py --quick    # fewer repeats, a smoke run
    python benchmarks/bench_clip.py --full     # also the GPT-2-small parameter list (124M, ~15 GB RAM)
    python benchmarks/bench_clip.py --threads 1   # on a shared machine: see below

On a machine shared with other jobs, use ``--threads 1``: with 2 intra-op threads on 2 busy cores
every parallel kernel waits for a descheduled sibling thread, and single steps took seconds.

Every variant runs once per round, in a shuffled order, on its own gradients (refilled from one
saved copy before each call, untimed), so that a slow-down of the shared machine hits all
variants of a round alike. Each variant's time is divided by its baseline's time *in the same
round* (a paired ratio); the table shows the median time and the median paired ratio. Writes
``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipped_optim import ClipGradScaler, ClippedOptimizer

MAX_NORM = 1.0
AMP_SCALE = 1024.0


# -- workloads: lists of parameter shapes
def w1() -> list[tuple[int, ...]]:
    return [(2500,)] * 400


def w2() -> list[tuple[int, ...]]:
    return [(4_000_000,)] * 8


def w3() -> list[tuple[int, ...]]:
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    return [tuple(p.shape) for p in enc.parameters()]


def gpt2_small() -> list[tuple[int, ...]]:
    d, v, ctx = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


WORKLOADS: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "W1": ("400 x 2,500 fp32", w1),
    "W2": ("8 x 4M fp32", w2),
    "W3": ("6-layer TransformerEncoder d_model 256, 4 heads, ffn 1024: 72 tensors, 4.7M elements", w3),
    "GPT2": ("GPT-2 small parameter list (148 tensors, 124M elements)", gpt2_small),
}


# -- the variants: each is a step function over (params, grads) with its own state
def tutorial_clip(params: list[torch.Tensor], max_norm: float) -> None:
    """The tutorial loop: one ``.item()`` per tensor, a Python ``if`` on the norm."""
    total = 0.0
    for p in params:
        total += p.grad.norm().item() ** 2
    total = total**0.5
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))


def sgd(p):
    return torch.optim.SGD(p, lr=1e-6, foreach=True)


def fused_adamw(p):
    return torch.optim.AdamW(p, lr=1e-6, fused=True)


class Variant:
    """One configuration: its gradients (views for flat_grads), its optimizer, its step."""

    def __init__(self, name: str, params, saved, build: Callable, baseline: str, amp: bool = False) -> None:
        self.name, self.params, self.saved, self.baseline, self.amp = name, params, saved, baseline, amp
        self.grads = [g.clone() for g in saved]
        self.bind()
        self.run = build(self)
        self.times: list[float] = []

    def bind(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def prepare(self) -> None:
        self.bind()
        torch._foreach_copy_(self.grads, self.saved)

    def adopt_views(self) -> None:
        """After a flat wrapper's first step its gradients are the buffer views: keep those."""
        self.grads = [p.grad for p in self.params]


def build_variants(params, saved, clip_only: bool) -> list[Variant]:
    def plain(inner_fn):
        def build(v):
            inner = inner_fn(v.params)

            def run():
                torch.nn.utils.clip_grad_norm_(v.params, MAX_NORM)
                inner.step()

            return run

        return build

    def tutorial(inner_fn):
        def build(v):
            inner = inner_fn(v.params)

            def run():
                tutorial_clip(v.params, MAX_NORM)
                inner.step()

            return run

        return build

    def wrapped(inner_fn, **kw):
        def build(v):
            opt = ClippedOptimizer(inner_fn(v.params), max_norm=MAX_NORM, **kw)
            v.opt = opt
            return opt.step

        return build

    def amp_plain(inner_fn):
        def build(v):
            inner = inner_fn(v.params)
            scaler = torch.amp.GradScaler("cpu", init_scale=AMP_SCALE, growth_interval=10**9)
            scaler.scale(torch.zeros(()))  # creates the scale tensor, as scaler.scale(loss) does

            def run():
                scaler.unscale_(inner)
                torch.nn.utils.clip_grad_norm_(v.params, MAX_NORM)
                scaler.step(inner)
                scaler.update()

            return run

        return build

    def amp_wrapped(inner_fn, scaler_cls=torch.amp.GradScaler, **kw):
        def build(v):
            opt = ClippedOptimizer(inner_fn(v.params), max_norm=MAX_NORM, **kw)
            scaler = scaler_cls("cpu", init_scale=AMP_SCALE, growth_interval=10**9)
            scaler.scale(torch.zeros(()))  # creates the scale tensor, as scaler.scale(loss) does
            v.opt = opt

            def run():
                scaler.step(opt)
                scaler.update()

            return run

        return build

    specs = [
        ("clip_grad_norm_ + SGD", plain(sgd), "clip_grad_norm_ + SGD"),
        ("tutorial .item() loop + SGD", tutorial(sgd), "clip_grad_norm_ + SGD"),
        ("wrapper(SGD)", wrapped(sgd), "clip_grad_norm_ + SGD"),
        ("wrapper(SGD, flat_grads)", wrapped(sgd, flat_grads=True), "clip_grad_norm_ + SGD"),
        ("clip_grad_norm_ + AdamW(fused)", plain(fused_adamw), "clip_grad_norm_ + AdamW(fused)"),
        ("wrapper(AdamW(fused)) = fold", wrapped(fused_adamw), "clip_grad_norm_ + AdamW(fused)"),
        ("wrapper(AdamW(fused), flat_grads)", wrapped(fused_adamw, flat_grads=True), "clip_grad_norm_ + AdamW(fused)"),
        (
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)",
            amp_plain(sgd),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)",
        ),
        ("AMP: scaler.step(wrapper(SGD))", amp_wrapped(sgd), "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)"),
        (
            "AMP: scaler.step(wrapper(SGD, flat_grads))",
            amp_wrapped(sgd, flat_grads=True),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)",
        ),
        (
            "AMP: ClipGradScaler.step(wrapper(SGD))",
            amp_wrapped(sgd, ClipGradScaler),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)",
        ),
        (
            "AMP: ClipGradScaler.step(wrapper(SGD, flat_grads))",
            amp_wrapped(sgd, ClipGradScaler, flat_grads=True),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(SGD)",
        ),
        (
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(AdamW(fused))",
            amp_plain(fused_adamw),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(AdamW(fused))",
        ),
        (
            "AMP: scaler.step(wrapper(AdamW(fused)))",
            amp_wrapped(fused_adamw),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(AdamW(fused))",
        ),
        (
            "AMP: ClipGradScaler.step(wrapper(AdamW(fused)))",
            amp_wrapped(fused_adamw, ClipGradScaler),
            "AMP: unscale_ + clip_grad_norm_ + scaler.step(AdamW(fused))",
        ),
    ]
    if clip_only:
        specs += clip_only_specs()
    variants = []
    scaled = [g * AMP_SCALE for g in saved]  # what GradScaler's backward would have left
    for name, build, base in specs:
        amp = name.startswith("AMP")
        v = Variant(name, params, scaled if amp else saved, build, base, amp)
        variants.append(v)
    return variants


def clip_only_specs():
    """The clip alone (no optimizer step), against the memory floor of a flat buffer."""

    def torch_clip(v):
        return lambda: torch.nn.utils.clip_grad_norm_(v.params, MAX_NORM)

    def flat_clip(v):
        opt = ClippedOptimizer(sgd(v.params), max_norm=MAX_NORM, flat_grads=True)
        v.opt = opt

        def run():  # everything step() does before the inner step: norm, clip, decide, record
            opt._clip_and_record(None, None, fold=False)

        return run

    def floor(v):
        buf = torch.cat([g.reshape(-1) for g in v.grads])
        coef = torch.tensor(0.5)

        def run():
            buf.sum()
            buf.mul_(coef)

        return run

    def check_inf(v):
        found, one = torch.zeros(1), torch.ones(1)
        return lambda: torch._amp_foreach_non_finite_check_and_unscale_(v.grads, found, one)

    base = "clip only: clip_grad_norm_"
    return [
        (base, torch_clip, base),
        ("floor: one read + one in-place write of a flat buffer", floor, base),
        (
            "clip only: wrapper flat_grads (norm+mul+stats)",
            flat_clip,
            "floor: one read + one in-place write of a flat buffer",
        ),
        ("GradScaler inf check alone (inv_scale 1.0)", check_inf, base),
    ]


def time_rounds(variants: list, rounds: int, seed: int = 0) -> None:
    """Time every variant once per round, in a shuffled order, each after its untimed
    ``prepare()``: a slow-down of the shared machine hits all variants of a round alike."""
    rng = random.Random(seed)
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            v.prepare()
            t0 = time.perf_counter()
            v.run()
            v.times.append(time.perf_counter() - t0)


def bench(workload: str, rounds: int, warmup: int, seed: int = 0) -> list[dict]:
    shapes = WORKLOADS[workload][1]()
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    saved = [torch.randn(s, generator=g) for s in shapes]
    variants = build_variants(params, saved, clip_only=workload == "W1")
    for v in variants:
        for _ in range(warmup):
            v.prepare()
            v.run()
        if hasattr(v, "opt") and v.opt.config.flat_grads:
            v.adopt_views()
    time_rounds(variants, rounds, seed)
    by_name = {v.name: v for v in variants}
    rows = []
    for v in variants:
        base = by_name[v.baseline].times
        ratios = [t / b for t, b in zip(v.times, base)]
        q = statistics.quantiles(ratios, n=4)
        # the fastest quarter of each: what the variant costs when the shared machine leaves it alone
        fast = statistics.quantiles(v.times, n=4)[0] / statistics.quantiles(base, n=4)[0]
        rows.append(
            dict(
                workload=workload,
                name=v.name,
                baseline=v.baseline,
                median_us=statistics.median(v.times) * 1e6,
                ratio=statistics.median(ratios),
                q1=q[0],
                q3=q[2],
                fast=fast,
            )
        )
    del variants, params, saved
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}; {platform.system()} {platform.release()}; GPU: {gpu}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in load)}"
    )


def table(rows: list[dict]) -> str:
    out = [
        "| workload | variant | median µs | paired ratio (median) | IQR of ratio | ratio of 25th pct. times | vs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['workload']} | {r['name']} | {r['median_us']:,.0f} | {r['ratio']:.3f}× | "
            f"{r['q1']:.2f}–{r['q3']:.2f} | {r['fast']:.3f}× | {r['baseline']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    ap.add_argument("--full", action="store_true", help="also the GPT-2-small parameter list (~12 GB RAM)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 200; W2 60; GPT2 12)")
    ap.add_argument("--workloads", default=None, help="comma-separated subset of W1,W2,W3,GPT2")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--append", action="store_true", help="append this run to RESULTS.md instead of replacing it")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.workloads.split(",") if args.workloads else ["W1", "W2", "W3"] + (["GPT2"] if args.full else [])
    default_rounds = {"W1": 200, "W2": 60, "W3": 200, "GPT2": 12}
    started = datetime.datetime.now(datetime.timezone.utc)
    where = machine()
    print(where, flush=True)
    rows = []
    for name in names:
        rounds = args.rounds or (max(5, default_rounds[name] // 10) if args.quick else default_rounds[name])
        t0 = time.perf_counter()
        wl = bench(name, rounds, warmup=2 if args.quick else 5)
        print(f"\n## {name}: {WORKLOADS[name][0]} ({rounds} rounds, {time.perf_counter() - t0:.0f} s)\n", flush=True)
        print(table(wl), flush=True)
        rows += wl
    if not args.no_write:
        write_results(rows, started, " ".join(sys.argv[1:]), args.append, where)


def write_results(rows: list[dict], started: datetime.datetime, argv: str, append: bool, where: str) -> None:
    path = Path(__file__).with_name("RESULTS.md")
    head = (
        ["## Another run", ""] if append and path.exists() else ["# Benchmark results (`benchmarks/bench_clip.py`)", ""]
    )
    if not (append and path.exists()):
        head += [
            "Workloads (fp32 gradient shapes): " + "; ".join(f"{k} = {d}" for k, (d, _) in WORKLOADS.items()) + ".",
            "",
        ]
    text = head + [
        f"Run `python benchmarks/bench_clip.py {argv}`".rstrip() + f" at {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {where}.",
        "",
        ("No GPU was available for this run: every figure is CPU. " if not torch.cuda.is_available() else "")
        + "On a shared, noisy machine read the paired ratios (each variant divided by its baseline"
        " timed in the same round), not the absolute times.",
        "",
        table(rows),
        "",
    ]
    old = path.read_text() + "\n" if append and path.exists() else ""
    path.write_text(old + "\n".join(text))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
