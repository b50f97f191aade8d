"""Spike rescue: the same tiny language model trained three times through a few bad batches.

    python examples/spike_rescue.py            # 30-70 s on a 2-core CPU (3 runs x 300 steps)
    python examples/spike_rescue.py --long     # 4x the steps
    python examples/spike_rescue.py --steps 200 --out plots

A character-level Transformer LM learns text that this script writes itself (simple English
sentences from a small grammar; nothing is downloaded). At three known steps the data loader
hands it a corrupt batch, and the training loop has a bug that only such a batch exposes:

* the batch is one character the model has never seen, repeated: ``\x00``, which is what a
  NUL-filled file from a failed download or a broken decode looks like in a scraped corpus;
* the loss is normalised the way many LM loops do it, ``sum of token losses / number of
  non-padding tokens``, but the numerator forgot the padding mask. ``\x00`` is also the
  padding id, so on the corrupt batch the denominator is 1 instead of 1,024 and the loss (and
  the gradient) come out ~1,000x too large. On clean batches there is no padding and the bug
  is invisible.

The result is a gradient about 10,000x the usual norm on three steps out of hundreds. Plain
AdamW (torch's default betas) takes a full-size step along it, and its second-moment estimate
``v`` absorbs the squared spike: for the next thousands of steps every update is divided by a
``sqrt(v)`` ~100x too large, so the model first gets worse, then stops learning. Clipping the
global norm to 1.0 turns the bad step into an ordinary one.

The three runs see identical data from identical weights:

1. plain AdamW, no clipping;
2. ``ClippedOptimizer(AdamW, max_norm=1.0)``: the usual global-norm clip;
3. ``mode=ZClip()``: an adaptive threshold from the running mean and spread of the norms
   (Kumar et al. 2025), capped at ``max_norm=1.0`` as the zclip package does by default.

It prints a table (final loss, worst loss spike, steps to recover, clipped / skipped steps)
and writes ``spike_rescue.png`` into ``--out``: the loss curves, and one panel per run with its
pre-clip gradient norm, its own bound (ZClip's spike line from its EMA, and the bound it
applied) and its clipped steps by cause. Most clipped steps are *clean* batches whose norm sits
just above 1.0 in the middle of the run: ``max_norm=1.0`` (and ZClip's default cap of 1.0) is
the common default, not a value tuned for this model, and on those steps it is a mild rescale
(the panel says by how much).

The clipped runs' reports say which parameters carried the outlier steps (the demo prints them,
and saves the ``max_norm=1.0`` run as ``clip_checkpoint.pt`` in ``--out``, which
``python -m clipped_optim report out/clip_checkpoint.pt`` reads). What they find: the corrupt
batches are the only outliers, and the largest share of their squared norm is in the LM head
(``head.weight``: 22-43% at 300 steps, 32-70% at 200), with the rest spread over the attention
projections and a feed-forward layer (up to 15% each in the top 3); the embedding of the
never-seen token is not among the top 3. The
ZClip run also names two clean steps near step 55 that it flagged as z-score spikes (the first
block's attention input projection).

The numbers are seeded and repeat on one machine; across CPUs the float rounding differs and
so do the last digits and the clipped-step counts. The test suite checks the conclusions
(``tests/test_examples.py``), not the digits.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    from clipped_optim import ClippedOptimizer, ZClip
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer, ZClip
from clipped_optim.attribution import describe

DEFAULT_STEPS = 300
SPIKE_FRACTIONS = (0.35, 0.55, 0.75)  # where the corrupt batches land, as fractions of the run
RARE = "\x00"  # the never-seen character of the corrupt batches, and the padding id
SEQ_LEN, BATCH, D_MODEL, HEADS, LAYERS = 64, 16, 64, 4, 2
LR = 3e-3
RECOVER_TOL = 0.1  # nats above the pre-spike loss that count as recovered

# -- data -----------------------------------------------------------------------------------

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother"]
_VERBS = ["sees", "likes", "finds", "follows", "paints", "carries", "remembers", "wants"]
_OBJECTS = ["a red ball", "the green door", "an apple", "the river", "two books", "the long road", "a warm coat"]
_ENDINGS = [".", " today.", " again.", " in the morning.", " near the house.", " every day."]


def make_corpus(n_sentences: int, seed: int) -> str:
    """Text from a tiny grammar: learnable in a few hundred steps, never downloaded."""
    rng = random.Random(seed)
    parts = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)} "
        parts.append(s[0].upper() + s[1:])
    return "".join(parts)


def make_batches(
    steps: int, spike_steps: set[int], seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """One (input, target) batch per step; the corrupt ones at ``spike_steps``."""
    text = make_corpus(20_000, seed)
    vocab = sorted(set(text)) + [RARE]  # RARE gets an id but never occurs in the clean text
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    rare = torch.full((BATCH, SEQ_LEN + 1), vocab.index(RARE), dtype=torch.long)
    batches = []
    for step in range(steps):
        if step in spike_steps:
            chunk = rare
        else:
            starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=g)
            chunk = torch.stack([ids[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        batches.append((chunk[:, :-1], chunk[:, 1:]))
    return batches, vocab


# -- model ----------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """A 2-layer pre-norm causal Transformer over characters (~100k parameters)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ_LEN, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ_LEN), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


# -- one run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    losses: list[float]  # every step's mean cross-entropy (the corrupt batches' included)
    norms: list[float]  # pre-clip global gradient norm
    thresholds: list[float] | None  # the bound in effect at each step; None: no clipping
    clipped: list[bool]
    skipped: list[bool]
    coefs: list[float] | None = None  # the factor each step's gradients were multiplied by
    spike_line: list[float] | None = None  # zclip: EMA mean + z_thresh * std, where a norm counts as a spike
    metrics: dict[str, float] = field(default_factory=dict)
    report: Any = None  # the ClippedOptimizer's ClipReport (None: no clipping)
    checkpoint: dict[str, Any] | None = None  # {"model": ..., "optimizer": ...} at the end (clipped runs)


def buggy_lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss the loop optimises, and the clean mean cross-entropy that it reports.

    The bug, on purpose: the sum runs over every token but the count excludes padding. Equal
    to the mean on batches without padding; ~1,000x the mean on an all-padding batch.
    """
    per_token = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    real_tokens = (targets != pad_id).sum().clamp(min=1)
    return per_token.sum() / real_tokens, per_token.detach().mean()


def train(
    name: str, clip: dict | None, batches, vocab_size: int, pad_id: int, seed: int, progress: bool = True
) -> RunResult:
    """Train a fresh model (same seed, same batches) with ``clip`` options, or none."""
    torch.manual_seed(seed)
    model = TinyLM(vocab_size)
    inner = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)  # torch's default betas
    opt = inner if clip is None else ClippedOptimizer(inner, history_size=len(batches), top_k=3, **clip)
    if isinstance(opt, ClippedOptimizer):  # reports and the checkpoint then name the parameters
        opt.name_parameters(model.named_parameters())
    zclip = clip is not None and isinstance(clip.get("mode"), ZClip)
    losses, norms, spike_line = [], [], []
    bar = _progress(len(batches), name, progress)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss, clean_loss = buggy_lm_loss(model(x), y, pad_id)
        loss.backward()
        if clip is None:  # measured for the plot only; nothing is clipped
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        if zclip:  # the EMA this step is judged against (kept as tensors: no host sync per step)
            spike_line.append(_zclip_spike_line(opt))
        opt.step()
        losses.append(clean_loss)
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{clean_loss.item():.3f}")
    if bar is not None:
        bar.close()
    losses_f = torch.stack(losses).tolist()
    if clip is None:
        n = len(batches)
        return RunResult(name, losses_f, torch.stack(norms).tolist(), None, [False] * n, [False] * n)
    report = opt.report()  # the per-step history kept on the device, read once
    clipped = [c < 1 and math.isfinite(v) for c, v in zip(report.coefs, report.norms)]
    line = torch.stack(spike_line).tolist() if zclip else None
    result = RunResult(
        name, losses_f, report.norms, report.thresholds, clipped, report.skipped_mask, report.coefs, line
    )
    result.report = report
    result.checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return result


def _zclip_spike_line(opt: ClippedOptimizer) -> torch.Tensor:
    """ZClip's spike line before this step: ``mean + z_thresh * std`` of its EMA, NaN in the warm-up.

    A norm above it is a spike and is clipped to an adaptive bound below it; a norm under it is
    clipped only by the ``max_norm`` cap. Read from ``opt.state["clip"]`` (on the device).
    """
    state, policy = opt.state["clip"], opt.config.policy
    assert isinstance(policy, ZClip)
    if "zclip_mean" not in state:  # before the first step
        return torch.tensor(math.nan, dtype=torch.float64)
    line = state["zclip_mean"] + policy.z_thresh * state["zclip_var"].sqrt()
    return torch.where(state["zclip_seen"] < policy.warmup_steps, torch.full_like(line, math.nan), line)


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{name:>18}", leave=True, dynamic_ncols=True)


# -- what happened --------------------------------------------------------------------------


def _smooth(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def measure(run: RunResult, spike_steps: list[int]) -> dict[str, float]:
    """Final loss, worst loss spike and slowest recovery, on the clean batches only.

    The corrupt batches' own losses say nothing about the model: they are replaced by the
    previous clean loss. ``worst_spike`` is the largest rise of the 5-step mean loss within
    50 steps after a corrupt batch over its level just before; ``steps_to_recover`` the most
    steps any spike took to come back within ``RECOVER_TOL`` nats of that level (0: it never
    left it; inf: not within the run).
    """
    clean = list(run.losses)
    for s in spike_steps:
        clean[s] = clean[s - 1] if s > 0 else clean[s]
    if any(not math.isfinite(v) for v in clean):  # diverged: losses went NaN/Inf
        clean = [v if math.isfinite(v) else 1e9 for v in clean]
    smooth = _smooth(clean)
    worst, slowest = 0.0, 0.0
    for s in spike_steps:
        before = smooth[s - 1]
        after = smooth[s + 1 : s + 51]
        rise = max(after, default=before) - before
        worst = max(worst, rise)
        if rise > RECOVER_TOL:  # count from the corrupt batch to back within tolerance after the peak
            peak = s + 1 + after.index(max(after))
            back = next((i for i in range(peak, len(smooth)) if smooth[i] <= before + RECOVER_TOL), None)
            slowest = max(slowest, math.inf if back is None else back - s)
    tail = clean[-20:]
    return {
        "final_loss": sum(tail) / len(tail),
        "worst_spike": worst,
        "steps_to_recover": slowest,
        "clipped_steps": float(sum(run.clipped)),
        "skipped_steps": float(sum(run.skipped)),
        "max_norm_seen": max(v for v in run.norms if math.isfinite(v)) if run.norms else math.nan,
    }


def table(runs: list[RunResult]) -> str:
    rows = [
        ("final loss (last 20)", "final_loss", "{:.3f}"),
        ("worst loss spike", "worst_spike", "+{:.3f}"),
        ("steps to recover", "steps_to_recover", "{:.0f}"),
        ("clipped steps", "clipped_steps", "{:.0f}"),
        ("skipped steps", "skipped_steps", "{:.0f}"),
        ("largest grad norm", "max_norm_seen", "{:.3g}"),
    ]
    width = max(len(r.name) for r in runs) + 2
    lines = [" " * 22 + "".join(f"{r.name:>{width}}" for r in runs)]
    for label, key, fmt in rows:
        cells = []
        for r in runs:
            v = r.metrics[key]
            cells.append("never" if key == "steps_to_recover" and math.isinf(v) else fmt.format(v))
        lines.append(f"{label:<22}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def clip_causes(run: RunResult, spike_steps: list[int], cap: float = 1.0) -> dict[str, list[int]]:
    """The clipped steps by cause: corrupt batches, clean steps clipped at the fixed bound
    (``max_norm``, or ZClip's cap), clean steps clipped below it (ZClip's adaptive bound)."""
    causes: dict[str, list[int]] = {"corrupt": [], "fixed": [], "adaptive": []}
    if run.thresholds is None:
        return causes
    for i, (c, t) in enumerate(zip(run.clipped, run.thresholds)):
        if c:
            causes["corrupt" if i in spike_steps else "fixed" if t >= cap * (1 - 1e-6) else "adaptive"].append(i)
    return causes


def clean_clip_note(run: RunResult, spike_steps: list[int]) -> str | None:
    """Why a run clipped clean batches: how many, at which bound, and how hard."""
    if run.coefs is None:
        return None
    causes = clip_causes(run, spike_steps)
    fixed = causes["fixed"]
    n = len(causes["corrupt"])
    lines = [f"{n} corrupt batch{'' if n == 1 else 'es'} clipped"]
    if fixed:
        coefs = sorted(run.coefs[i] for i in fixed)
        norms = [run.norms[i] for i in fixed]
        first, last = fixed[len(fixed) // 10], fixed[(9 * len(fixed)) // 10]  # where most of them are
        bound = "the 1.0 cap" if run.spike_line is not None else "max_norm=1.0"
        lines.append(
            f"{len(fixed)} clean steps clipped at {bound}:\n"
            f"  norms {min(norms):.2f}-{max(norms):.2f}, just above it\n"
            f"  (80% in steps {first}-{last}), median factor {coefs[len(coefs) // 2]:.2f}"
        )
    if causes["adaptive"]:
        lines.append(f"{len(causes['adaptive'])} clean steps clipped below the cap\n  (z-score spikes)")
    return "\n".join(lines)


def plot(runs: list[RunResult], spike_steps: list[int], path: str) -> None:
    """The loss curves on top; below, one norm panel per run with that run's own bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:red", "tab:blue", "tab:green"]
    fig, axes = plt.subplots(
        1 + len(runs),
        1,
        figsize=(12, 3.6 + 2.2 * len(runs)),
        sharex=True,
        gridspec_kw={"height_ratios": [1.6] + [1] * len(runs)},
    )
    loss_ax, norm_axes = axes[0], axes[1:]
    for run, color in zip(runs, colors):
        clean = [math.nan if i in spike_steps else v for i, v in enumerate(run.losses)]
        loss_ax.plot(range(len(clean)), clean, color=color, lw=1, label=run.name)
    loss_ax.set_ylabel("training loss\n(clean batches)")
    loss_ax.set_title("Three corrupt batches (dotted lines): the same model and data, three optimizers")
    loss_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    top = max(max(r.losses[: max(1, len(r.losses) // 10)]) for r in runs)
    finite = [v for r in runs for v in r.losses if math.isfinite(v)]
    loss_ax.set_ylim(min(finite) * 0.9, min(top * 1.1, max(finite) * 1.05))

    finite_norms = [v for r in runs for v in r.norms if math.isfinite(v) and v > 0]
    ylim = (min(finite_norms) * 0.6, max(finite_norms) * 4)
    for ax, run, color in zip(norm_axes, runs, colors):
        _norm_panel(ax, run, color, spike_steps, ylim)
    for ax in axes:
        for s in spike_steps:
            ax.axvline(s, color="gray", ls=":", lw=1)
    norm_axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _norm_panel(ax, run: RunResult, color: str, spike_steps: list[int], ylim: tuple[float, float]) -> None:
    steps = range(len(run.norms))
    ax.plot(steps, run.norms, color=color, lw=0.9, label="pre-clip grad norm")
    if run.spike_line is not None:  # zclip: its spike line, and the bound it applied
        ax.plot(steps, run.spike_line, color="black", lw=1.1, ls="--", label="spike line:\nEMA mean + 2.5 std")
        ax.plot(
            steps, run.thresholds, color="black", lw=1.1, ls=":", label="bound applied: the 1.0 cap,\nlower on a spike"
        )
    elif run.thresholds is not None:
        ax.plot(steps, run.thresholds, color="black", lw=1.1, ls="--", label="threshold 1.0")
    else:
        ax.text(0.01, 0.92, "no threshold: nothing is clipped", transform=ax.transAxes, fontsize=8, va="top")
    causes = clip_causes(run, spike_steps)
    for key, marker, size, label in (
        ("corrupt", "o", 26, "clipped: corrupt batch"),
        ("fixed", "o", 12, "clipped: clean step, at 1.0"),
        ("adaptive", "^", 40, "clipped: clean step, below 1.0"),
    ):
        if causes[key]:
            marks = [(i, run.norms[i]) for i in causes[key]]
            ax.scatter(
                *zip(*marks), s=size, marker=marker, color=color, edgecolor="black", lw=0.4, zorder=3, label=label
            )
    note = clean_clip_note(run, spike_steps)
    if note is not None:
        ax.text(
            0.01,
            0.95,
            note,
            transform=ax.transAxes,
            fontsize=7.5,
            va="top",
            linespacing=1.3,
            bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "none", "pad": 1.5},
        )
    ax.set_yscale("log")
    ax.set_ylim(*ylim)
    ax.set_ylabel(f"{run.name}\ngrad norm (log)", color=color)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7.5)


# -- main -----------------------------------------------------------------------------------


def spike_steps_for(steps: int) -> list[int]:
    return [int(f * steps) for f in SPIKE_FRACTIONS]


def run(
    steps: int = DEFAULT_STEPS,
    out: str | None = "out",
    seed: int = 0,
    progress: bool = True,
    runs: int = 3,
    threads: int | None = 1,
    results: list[RunResult] | None = None,
) -> dict:
    """Train the runs; return ``{run name: metrics}`` (and write the PNG and the clipped run's
    checkpoint ``clip_checkpoint.pt`` into ``out``).

    ``runs=2`` leaves out the adaptive run (the test suite's short check). ``threads=1`` by
    default: a model this small loses more to the thread pool than it gains (and one thread
    gives the same numbers on every machine with the same torch build). ``results``: a list
    the runs' :class:`RunResult` are appended to.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    spikes = spike_steps_for(steps)
    batches, vocab = make_batches(steps, set(spikes), seed)
    configs = [
        ("no clipping", None),
        ("max_norm=1.0", {"mode": "norm", "max_norm": 1.0}),
        ("mode=ZClip()", {"mode": ZClip()}),
    ]
    results = [] if results is None else results
    for name, clip in configs[:runs]:
        result = train(name, clip, batches, len(vocab), vocab.index(RARE), seed, progress)
        result.metrics = measure(result, spikes)
        results.append(result)
    print(f"\ncorrupt batches at steps {spikes}\n")
    print(table(results))
    print(attribution(results))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "spike_rescue.png")
        plot(results, spikes, path)
        print(f"\nplot: {path}")
        saved = os.path.join(out, CHECKPOINT)
        torch.save(results[1].checkpoint, saved)  # the max_norm=1.0 run, nanoGPT's layout
        print(f"checkpoint of the {results[1].name} run: {saved}\n  python -m clipped_optim report {saved}")
    return {r.name: r.metrics for r in results}


#: The clipped run's checkpoint in ``--out``: ``{"model": ..., "optimizer": ...}``.
CHECKPOINT = "clip_checkpoint.pt"


def attribution(results: list[RunResult]) -> str:
    """What each clipped run's report says about its outlier steps: which parameters carried
    the gradient norm (see clipped_optim.attribution)."""
    lines = ["\nwhere each clipped run's outlier steps had their gradient norm:"]
    for r in results:
        if r.report is not None:
            lines.append(f"  {r.name}:")
            lines += [f"    {line}" for line in describe(r.report.attributions)] or ["    no outlier steps"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per run (default %(default)s)")
    parser.add_argument("--long", action="store_true", help=f"{4 * DEFAULT_STEPS} steps per run")
    parser.add_argument(
        "--out", default="out", help="directory for spike_rescue.png and clip_checkpoint.pt (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the model is too small to gain from more)"
    )
    args = parser.parse_args(argv)
    steps = 4 * DEFAULT_STEPS if args.long else args.steps
    start = time.perf_counter()
    metrics = run(steps, args.out, args.seed, threads=args.threads)
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
