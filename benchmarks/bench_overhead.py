"""What the wrapper adds to a training step, on small models where fixed costs dominate.

    python benchmarks/bench_overhead.py            # every table (2-8 min on 2 cores), writes OVERHEAD.md
    python benchmarks/bench_overhead.py --quick    # fewer rounds, a smoke run

Four tables:

* **Step**: the default wrapper (``ClippedOptimizer(inner)``: ``mode="norm"``, history on,
  ``nonfinite="skip"``) against the loop it replaces, ``clip_grad_norm_(params, 1.0)`` then the
  same ``inner.step()``; on W1 also ``flat_grads=True``; on GPT-2L also with attribution
  (``top_k=3``), without the history (``history_size=0``) and without the skip decision either
  (``nonfinite="propagate"``): what each part of the statistics and the step's one host read cost;
  and both with a bound the gradients never reach (a step that is not clipped).
* **Adaptive**: ``mode="zclip"``, ``"autoclip"``, ``"agc"`` and ``skip_spikes=True`` against the
  default wrapper (what choosing the mode costs, per step).
* **AGC's floor**: the default step plus only unit-norm kernels AGC must run (the weights'; the
  weights' and the gradients'), beside ``mode="agc"`` (what any AGC costs at least in eager
  mode, however its rule is written) and the loop a user replaces, timm's
  ``adaptive_clip_grad`` then the same step.
* **Fixed cost**: the clip alone (an inner optimizer whose ``step`` does nothing), minus the
  kernels it must run (one foreach norm and one foreach multiply of the same gradients, timed
  alone): what each of ``clip_grad_norm_`` and the wrapper spends besides those kernels.

Workloads: W1 = 400 fp32 tensors x 2,500 (SGD, foreach); W3 = a 6-layer
``nn.TransformerEncoder``, d_model 256 (AdamW, foreach; 72 tensors); GPT-2L = nanoGPT's ``GPT``
with 2 layers, d=64, 65-token vocabulary, block 256 (28 tensors; AdamW, foreach, the two param
groups of nanoGPT's ``configure_optimizers``: decay for matrices, none for the rest).

Each round sets fresh gradient tensors (``p.grad = saved.clone()``, untimed: what backward after
``zero_grad()`` hands the step; with ``flat_grads=True`` the values are copied into the buffer's
views, which that ``zero_grad()`` keeps), then times every variant once, in a shuffled order. Each
variant's time is divided by its baseline's in the same round (a paired ratio); the tables show
median times and the median paired ratio, so a slow-down of the shared machine hits both sides
of a ratio alike, with a 95% confidence interval of that median (order statistics: it says
how far another run on the same machine may land). One intra-op thread (``--threads``) unless
asked: on a shared 2-core machine a second thread waits for a descheduled sibling.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_clip import machine, time_rounds

from clipped_optim import ClippedOptimizer

MAX_NORM = 1.0
UNCLIPPED = 1e6  # above every workload's gradient norm


def w1() -> list[tuple[int, ...]]:
    return [(2500,)] * 400


def w3() -> list[tuple[int, ...]]:
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    return [tuple(p.shape) for p in torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).parameters()]


def gpt_2l(n_layer: int = 2, d: int = 64, vocab: int = 65, block: int = 256) -> list[tuple[int, ...]]:
    """nanoGPT's parameter shapes (bias=True; lm_head is tied to the token embedding)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-6, foreach=True)


def adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: weight decay on matrices only (two groups)."""
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-6, betas=(0.9, 0.95), foreach=True)


class Nop(torch.optim.Optimizer):
    """An optimizer whose step does nothing: the clip alone, through the same call path."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure=None):  # type: ignore[override]
        return None


WORKLOADS: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]], Callable]] = {
    "W1": ("400 x 2,500 fp32, SGD (foreach)", w1, sgd),
    "W3": ("6-layer TransformerEncoder d256 (72 tensors), AdamW (foreach)", w3, adamw),
    "GPT-2L": ("nanoGPT 2 layers d64 (28 tensors), AdamW (foreach, 2 groups)", gpt_2l, adamw),
}


class Variant:
    """One configuration on its own copy of the parameters: a step function and its times."""

    def __init__(self, name: str, baseline: str, shapes, saved, make: Callable) -> None:
        self.name, self.baseline, self.saved = name, baseline, saved
        g = torch.Generator().manual_seed(1)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        self.run = make(self.params)
        self.in_place = "flat_grads" in name
        self.times: list[float] = []

    def prepare(self) -> None:
        if (
            self.in_place and self.params[0].grad is not None
        ):  # flat_grads: zero_grad() keeps the views and backward adds into them
            torch._foreach_copy_([p.grad for p in self.params], self.saved)
            return
        for p, s in zip(self.params, self.saved):
            p.grad = s.clone()


def plain(inner_fn: Callable, max_norm: float = MAX_NORM) -> Callable:
    def make(params):
        inner = inner_fn(params)

        def run():
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            inner.step()

        return run

    return make


def wrapped(inner_fn: Callable, **kw) -> Callable:
    return lambda params: ClippedOptimizer(inner_fn(params), **kw).step


def kernels_only(params: list[torch.Tensor]) -> Callable:
    """The two kernels a global-norm clip cannot avoid: one foreach norm, one foreach multiply."""
    coef = torch.ones(())

    def run():
        grads = [p.grad for p in params]
        torch._foreach_norm(grads, 2.0)
        torch._foreach_mul_(grads, coef)

    return run


def step_specs(workload: str, inner_fn: Callable) -> list[tuple[str, str, Callable]]:
    base = f"clip_grad_norm_ + {inner_fn.__name__}"
    specs = [(base, base, plain(inner_fn)), ("wrapper (default)", base, wrapped(inner_fn))]
    if workload == "W1":
        specs.append(("wrapper, flat_grads=True", base, wrapped(inner_fn, flat_grads=True)))
    if workload == "GPT-2L":  # what attribution, the statistics and the skip decision cost on a small model
        specs.append(("wrapper, top_k=3", base, wrapped(inner_fn, top_k=3)))
        specs.append(("wrapper, history_size=0", base, wrapped(inner_fn, history_size=0)))
        specs.append(
            (
                'wrapper, history_size=0, nonfinite="propagate"',
                base,
                wrapped(inner_fn, history_size=0, nonfinite="propagate"),
            )
        )
        # a step within the bound (late in training, where a clip at 1.0 is rarely active):
        # both still measure the norm; clip_grad_norm_ multiplies by 1, the wrapper need not
        unclipped = f"clip_grad_norm_ + {inner_fn.__name__}, max_norm={UNCLIPPED:g} (never clips)"
        specs.append((unclipped, unclipped, plain(inner_fn, UNCLIPPED)))
        specs.append((f"wrapper, max_norm={UNCLIPPED:g}", unclipped, wrapped(inner_fn, max_norm=UNCLIPPED)))
    return specs


def agc_floor(inner_fn: Callable, grads: bool = True) -> Callable:
    """The default wrapper's step plus kernels AGC cannot do without, timed with nothing else
    of AGC: the unit norms of the weights (one row-norm kernel per matrix, one foreach norm of
    the <= 1-D weights), which any AGC reads, and with ``grads`` those of the gradients' rows
    too (the <= 1-D gradients' norms are the default step's own). Without ``grads`` it is what
    any AGC costs at least; with them, what an AGC costs at least that keeps the statistics'
    norms as torch computes them (one could instead derive them from the row norms, a rounding
    away, and save part of the default's foreach norm)."""

    def make(params):
        opt = ClippedOptimizer(inner_fn(params))
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]

        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(t, 2, dim=1 if t.ndim == 2 else tuple(range(1, t.ndim)))

        def run():
            torch._foreach_norm(vectors)
            for p in matrices:
                rows(p)
                if grads:
                    rows(p.grad)
            opt.step()

        return run

    return make


def adaptive_specs(inner_fn: Callable) -> list[tuple[str, str, Callable]]:
    base = "wrapper (default)"
    return [
        (base, base, wrapped(inner_fn)),
        # the loop a user replaces, in the same rounds: each mode against it is its ratio over this one's
        (f"clip_grad_norm_ + {inner_fn.__name__}", base, plain(inner_fn)),
        ('mode="zclip"', base, wrapped(inner_fn, mode="zclip")),
        ('mode="autoclip"', base, wrapped(inner_fn, mode="autoclip")),
        ('mode="agc"', base, wrapped(inner_fn, mode="agc")),
        ("skip_spikes=True", base, wrapped(inner_fn, skip_spikes=True)),
    ]


def hand_agc(inner_fn: Callable) -> Callable:
    """The loop a user replaces: ``timm.utils.agc.adaptive_clip_grad``'s per-parameter AGC
    (its default ``clip_factor=0.01, eps=1e-3``, written out here: ``import timm`` needs
    torchvision), then the same inner step."""

    def unit_norm(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2.0) if x.ndim <= 1 else x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    def make(params):
        opt = inner_fn(params)

        def run():
            for p in params:
                g = p.grad.detach()
                max_norm = unit_norm(p.detach()).clamp_(min=1e-3).mul_(0.01)
                grad_norm = unit_norm(g)
                clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
                p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))
            opt.step()

        return run

    return make


def floor_specs(inner_fn: Callable) -> list[tuple[str, str, Callable]]:
    """AGC against its floor, in rounds of their own (more variants in a round leave colder
    caches for each, so the adaptive table keeps its six)."""
    base = "wrapper (default)"
    return [
        (base, base, wrapped(inner_fn)),
        ('mode="agc"', base, wrapped(inner_fn, mode="agc")),
        ("wrapper (default) + the weights' unit norms alone", base, agc_floor(inner_fn, grads=False)),
        ("wrapper (default) + the weights' and gradients' unit norms alone", base, agc_floor(inner_fn)),
        (f"timm's adaptive_clip_grad + {inner_fn.__name__}", base, hand_agc(inner_fn)),
    ]


def fixed_specs() -> list[tuple[str, str, Callable]]:
    base = "kernels alone (foreach norm + foreach mul)"
    return [
        (base, base, kernels_only),
        ("clip_grad_norm_", base, lambda params: lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)),
        ("wrapper (default), no-op inner step", base, wrapped(Nop)),
        ("no-op inner step alone", base, lambda params: Nop(params).step),
    ]


def bench(workload: str, specs, rounds: int, warmup: int) -> list[dict]:
    _, shape_fn, _ = WORKLOADS[workload]
    shapes = shape_fn()
    g = torch.Generator().manual_seed(0)
    saved = [torch.randn(s, generator=g) for s in shapes]
    variants = [Variant(name, base, shapes, saved, make) for name, base, make in specs]
    for v in variants:
        for _ in range(warmup):
            v.prepare()
            v.run()
    time_rounds(variants, rounds)
    by_name = {v.name: v for v in variants}
    rows = []
    for v in variants:
        base = by_name[v.baseline].times
        ratios = [t / b for t, b in zip(v.times, base)]
        diffs = [t - b for t, b in zip(v.times, base)]
        lo, hi = median_interval(ratios)
        rows.append(
            dict(
                workload=workload,
                name=v.name,
                baseline=v.baseline,
                median_us=statistics.median(v.times) * 1e6,
                ratio=statistics.median(ratios),
                ratio_lo=lo,
                ratio_hi=hi,
                diff_us=statistics.median(diffs) * 1e6,
            )
        )
    return rows


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A 95% confidence interval of the median of ``values`` (distribution-free: the order
    statistics at n/2 -+ z*sqrt(n)/2, from the binomial count of values below the median)."""
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    return ordered[max(0, math.floor(n / 2 - half))], ordered[min(n - 1, math.ceil(n / 2 + half))]


def revision() -> str:
    """The measured code: the git commit, and whether the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "clipped_optim"], cwd=root, capture_output=True)
    except OSError:
        return "code of the working tree (no git)"
    if head.returncode != 0:
        return "code of the working tree (not a git checkout)"
    changed = " with uncommitted changes to clipped_optim/" if dirty.stdout.strip() else ""
    return f"commit {head.stdout.strip()}{changed}"


def table(rows: list[dict], title: str) -> str:
    out = [
        f"### {title}",
        "",
        "| workload | variant | median µs | paired ratio | its 95% CI | paired difference µs | vs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = r["name"] == r["baseline"]
        ratio = "1 (baseline)" if same else f"{r['ratio']:.3f}×"
        ci = "" if same else f"{r['ratio_lo']:.3f}–{r['ratio_hi']:.3f}"
        diff = "" if same else f"{r['diff_us']:+,.0f}"
        out.append(
            f"| {r['workload']} | {r['name']} | {r['median_us']:,.0f} | {ratio} | {ci} | {diff} | {r['baseline']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per table (default 400; W1 150)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/OVERHEAD.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    where = machine()
    print(where, flush=True)

    def rounds(workload: str) -> int:
        n = args.rounds or (150 if workload == "W1" else 400)
        return max(10, n // 10) if args.quick else n

    sections = []
    step_rows = []
    for name, (_, _, inner_fn) in WORKLOADS.items():
        step_rows += bench(name, step_specs(name, inner_fn), rounds(name), warmup=5)
    sections.append(table(step_rows, "Step: the default wrapper vs clip_grad_norm_ + the same step"))
    adaptive_rows = []
    for name in ("W3", "GPT-2L"):
        adaptive_rows += bench(name, adaptive_specs(WORKLOADS[name][2]), rounds(name), warmup=30)
    sections.append(table(adaptive_rows, "Adaptive modes: each vs the default wrapper, same inner step"))
    floor_rows = []
    for name in ("W3", "GPT-2L"):
        floor_rows += bench(name, floor_specs(WORKLOADS[name][2]), rounds(name), warmup=30)
    sections.append(table(floor_rows, "AGC's floor: the default step plus only unit norms AGC must take"))
    fixed_rows = []
    for name in WORKLOADS:
        fixed_rows += bench(name, fixed_specs(), rounds(name), warmup=5)
    sections.append(
        table(fixed_rows, "Fixed cost: the clip alone, beside the two kernels it cannot avoid")
        + "\n\nThe fixed cost of each is its paired difference from the kernels alone; the wrapper's "
        "row includes its no-op inner step (timed alone in the last row)."
    )
    text = "\n\n".join(sections)
    print("\n" + text, flush=True)
    if not args.no_write:
        path = Path(__file__).with_name("OVERHEAD.md")
        path.write_text(
            "# Per-step overhead (`benchmarks/bench_overhead.py`)\n\n"
            f"Run `python benchmarks/bench_overhead.py {' '.join(sys.argv[1:])}`".rstrip()
            + f" at {started:%Y-%m-%d %H:%M} UTC, {revision()}.\n\n"
            f"Machine: {where}.\n\n" + text + "\n"
        )
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
