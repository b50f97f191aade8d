"""Per-step cost of the adaptive modes against the norm mode and against the peer packages.

    python benchmarks/bench_adaptive.py [--iters 200] [--threads 2]

Workload: W3, the gradients of a 6-layer ``nn.TransformerEncoder`` (d_model
256, 4 heads, ffn 1024; 72 tensors, 4.7M elements), CPU, fp32. Before every call the
gradients are restored from a saved copy times a per-iteration factor (log-normal, with a
10x spike every 25th iteration), the same for every variant of that iteration; the restore
is not timed. The variants run interleaved in one process, in a rotated order per iteration:

    norm                ClippedOptimizer(mode="norm").step()        (inner: a no-op optimizer)
    agc                 ClippedOptimizer(mode="agc").step()
    autoclip            ClippedOptimizer(mode="autoclip").step()    (history 1,000, filled)
    autoclip_pp         ClippedOptimizer(mode="autoclip", per_param=True).step()
    zclip               ClippedOptimizer(mode="zclip").step()       (past its warm-up)
    norm+spikes         ClippedOptimizer(mode="norm", skip_spikes=True).step()
    peer_agc            timm.utils.agc.adaptive_clip_grad(params)
    peer_autoclip       autoclip QuantileClip(global_threshold=True).step()
    peer_autoclip_pp    autoclip QuantileClip(global_threshold=False).step()
    peer_zclip          zclip.ZClip().step(model)
    clip_grad_norm_     torch.nn.utils.clip_grad_norm_(params, 1.0)

The wrapper's step includes gathering the gradients, the statistics and its one host sync
(nonfinite="skip"); the inner optimizer does nothing, so only the clipping is timed.
Reported: medians, and the medians of the per-iteration (paired) ratios to ``norm`` and to
the peer's own call. Targets set when the modes were written: each adaptive mode <= 1.2x norm
and <= 0.5x its peer.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipped_optim import ClippedOptimizer


class NoOp(torch.optim.Optimizer):
    """An inner optimizer that does nothing: the wrapper's step is then the clip alone."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def _timm_agc():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "utils", "agc.py")
    module_spec = importlib.util.spec_from_file_location("timm_agc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    model(torch.randn(8, 64, 256)).pow(2).mean().backward()
    return model


def _variants(model: nn.Module) -> dict:
    params = list(model.parameters())
    wrap = lambda **kw: ClippedOptimizer(NoOp(params), **kw).step  # noqa: E731
    out = {
        "norm": wrap(mode="norm"),
        "agc": wrap(mode="agc"),
        "autoclip": wrap(mode="autoclip"),
        "autoclip_pp": wrap(mode="autoclip", per_param=True),
        "zclip": wrap(mode="zclip"),
        "norm+spikes": wrap(mode="norm", skip_spikes=True),
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
    }
    agc = _timm_agc()
    if agc is not None:
        out["peer_agc"] = lambda: agc.adaptive_clip_grad(params)
    try:
        from autoclip.torch import QuantileClip

        out["peer_autoclip"] = QuantileClip(params, global_threshold=True).step
        out["peer_autoclip_pp"] = QuantileClip(params, global_threshold=False).step
    except ImportError:
        pass
    try:
        import zclip

        z = zclip.ZClip()
        out["peer_zclip"] = lambda: z.step(model)
    except ImportError:
        pass
    return out


PEERS = {"agc": "peer_agc", "autoclip": "peer_autoclip", "autoclip_pp": "peer_autoclip_pp", "zclip": "peer_zclip"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=1010, help="calls before timing (fills the 1,000-norm histories)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model()
    params = list(model.parameters())
    saved = [p.grad.clone() for p in params]
    gen = torch.Generator().manual_seed(0)

    def restore(factor: float) -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g).mul_(factor)

    def factor(i: int) -> float:
        f = math.exp(0.2 * float(torch.randn((), generator=gen)))
        return f * 10 if i % 25 == 24 else f

    variants = _variants(model)
    names = list(variants)
    with torch.no_grad():
        for i in range(args.warmup):  # fill the histories and EMAs; untimed
            f = factor(i)
            for name in names:
                if name.startswith("peer_autoclip") or name.startswith("autoclip") or i < 60:
                    restore(f)
                    variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.iters):
        f = factor(i)
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            restore(f)
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iters} iterations, W3 (72 tensors, 4.7M elements)"
    )
    print(f"{'variant':18s} {'median us':>10s} {'/ norm':>8s} {'/ peer':>8s}")
    for name in names:
        med = statistics.median(times[name]) * 1e6
        to_norm = statistics.median(a / b for a, b in zip(times[name], times["norm"]))
        peer = PEERS.get(name)
        to_peer = statistics.median(a / b for a, b in zip(times[name], times[peer])) if peer in times else float("nan")
        print(f"{name:18s} {med:10.0f} {to_norm:8.2f} {to_peer:8.2f}")


if __name__ == "__main__":
    main()
