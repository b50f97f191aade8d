"""Spike rescue: the same tiny language model trained three times through a few bad batches.

    python examples/spike_rescue.py            # ~1 minute on 2 CPU cores
    python examples/spike_rescue.py --long     # 4x the steps
    python examples/spike_rescue.py --steps 200 --out /tmp/spikes

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
3. ``mode="zclip"``: an adaptive threshold from the running mean and spread of the norms
   (Kumar et al. 2025), capped at ``max_norm=1.0`` as the zclip package does by default.

It prints a table (final loss, worst loss spike, steps to recover, clipped / skipped steps)
and writes ``spike_rescue.png`` (loss and pre-clip gradient norm against step, the threshold
drawn, clipped steps marked) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

try:
    from clipped_optim import ClippedOptimizer
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer

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


def make_batches(steps: int, spike_steps: set[int], seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
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
        layer = nn.TransformerEncoderLayer(
            D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True, norm_first=True
        )
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
    thresholds: list[float] | None  # None: no clipping
    clipped: list[bool]
    skipped: list[bool]
    metrics: dict[str, float] = field(default_factory=dict)


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
    opt = inner if clip is None else ClippedOptimizer(inner, history_size=len(batches), **clip)
    losses, norms = [], []
    bar = _progress(len(batches), name, progress)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss, clean_loss = buggy_lm_loss(model(x), y, pad_id)
        loss.backward()
        if clip is None:  # measured for the plot only; nothing is clipped
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
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
    return RunResult(name, losses_f, report.norms, report.thresholds, clipped, report.skipped_mask)


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


def plot(runs: list[RunResult], spike_steps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:red", "tab:blue", "tab:green"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    loss_ax, norm_ax = axes
    for run, color in zip(runs, colors):
        steps = range(len(run.losses))
        clean = [math.nan if i in spike_steps else v for i, v in enumerate(run.losses)]
        loss_ax.plot(steps, clean, color=color, lw=1, label=run.name)
        norm_ax.plot(steps, run.norms, color=color, lw=0.9, alpha=0.85, label=f"{run.name}: pre-clip norm")
        if run.thresholds is not None:
            norm_ax.plot(steps, run.thresholds, color=color, lw=1.3, ls="--", label=f"{run.name}: threshold")
            marks = [(i, n) for i, (n, c) in enumerate(zip(run.norms, run.clipped)) if c]
            if marks:
                norm_ax.scatter(*zip(*marks), s=22, color=color, marker="o", edgecolor="black", lw=0.5, zorder=3)
    for s in spike_steps:
        for ax in axes:
            ax.axvline(s, color="gray", ls=":", lw=1)
    loss_ax.set_ylabel("training loss (clean batches)")
    loss_ax.set_title("Corrupt batches (dotted lines): the same model and data, three optimizers")
    loss_ax.legend(loc="upper right")
    top = max(max(r.losses[: max(1, len(r.losses) // 10)]) for r in runs)
    finite = [v for r in runs for v in r.losses if math.isfinite(v)]
    loss_ax.set_ylim(min(finite) * 0.9, min(top * 1.1, max(finite) * 1.05))
    norm_ax.set_yscale("log")
    norm_ax.set_ylabel("gradient norm (log)")
    norm_ax.set_xlabel("step (filled dots: clipped steps)")
    norm_ax.annotate("corrupt batches", xy=(spike_steps[0], max(runs[0].norms)), xytext=(8, -12),
                     textcoords="offset points", fontsize=8, color="gray")
    norm_ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
) -> dict:
    """Train the runs; return ``{run name: metrics}`` (and write the PNG into ``out``).

    ``runs=2`` leaves out the adaptive run (the test suite's short check). ``threads=1`` by
    default: a model this small loses more to the thread pool than it gains (and one thread
    gives the same numbers on every machine with the same torch build).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    spikes = spike_steps_for(steps)
    batches, vocab = make_batches(steps, set(spikes), seed)
    configs = [
        ("no clipping", None),
        ("max_norm=1.0", {"mode": "norm", "max_norm": 1.0}),
        ("mode=zclip", {"mode": "zclip"}),
    ]
    results = []
    for name, clip in configs[:runs]:
        result = train(name, clip, batches, len(vocab), vocab.index(RARE), seed, progress)
        result.metrics = measure(result, spikes)
        results.append(result)
    print(f"\ncorrupt batches at steps {spikes}\n")
    print(table(results))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "spike_rescue.png")
        plot(results, spikes, path)
        print(f"\nplot: {path}")
    return {r.name: r.metrics for r in results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per run (default %(default)s)")
    parser.add_argument("--long", action="store_true", help=f"{4 * DEFAULT_STEPS} steps per run")
    parser.add_argument("--out", default="out", help="directory for spike_rescue.png (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is too small to gain from more)")
    args = parser.parse_args(argv)
    steps = 4 * DEFAULT_STEPS if args.long else args.steps
    start = time.perf_counter()
    metrics = run(steps, args.out, args.seed, threads=args.threads)
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
