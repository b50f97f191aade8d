"""The README's first command: the spike-rescue demo's claim, checked on a short run."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

from clipped_optim import ZClip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def spike_rescue():
    return _load("spike_rescue")


@pytest.fixture(scope="module")
def short_run(spike_rescue, tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        has_mpl = importlib.util.find_spec("matplotlib") is not None
        out = tmp_path_factory.mktemp("spike_rescue") if has_mpl else None  # the claim needs no plot
        results: list = []
        metrics = spike_rescue.run(
            steps=200, out=None if out is None else str(out), progress=False, runs=2, results=results
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return metrics, out, results


def test_unclipped_run_spikes_and_clipped_run_does_not(short_run):
    metrics, _, _ = short_run
    plain, clipped = metrics["no clipping"], metrics["max_norm=1.0"]
    # The corrupt batches are ~10,000x the usual norm in both runs: same data, same weights.
    assert plain["max_norm_seen"] > 1000 and clipped["max_norm_seen"] > 1000
    assert plain["worst_spike"] > 0.15, plain
    assert plain["worst_spike"] > 2 * clipped["worst_spike"], (plain, clipped)
    assert clipped["steps_to_recover"] < plain["steps_to_recover"]
    assert plain["final_loss"] > clipped["final_loss"] + 0.3, (plain, clipped)
    assert clipped["clipped_steps"] >= 3  # at least the three corrupt batches
    assert plain["clipped_steps"] == 0


def test_png_written(short_run):
    _, out, _ = short_run
    if out is None:
        pytest.skip("matplotlib is not installed (extra 'examples')")
    path = out / "spike_rescue.png"
    assert path.stat().st_size > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_corrupt_batches_and_loss_bug(spike_rescue):
    spikes = spike_rescue.spike_steps_for(100)
    batches, vocab = spike_rescue.make_batches(100, set(spikes), seed=0)
    pad = vocab.index(spike_rescue.RARE)
    for step, (x, y) in enumerate(batches):
        assert bool((y == pad).all()) == (step in spikes)
        assert bool((x == pad).any()) == (step in spikes)  # never seen in clean text
    logits = torch.randn(*batches[0][1].shape, len(vocab))
    loss, clean = spike_rescue.buggy_lm_loss(logits, batches[0][1], pad)
    assert torch.allclose(loss, clean)  # no padding: the bug is invisible
    loss, clean = spike_rescue.buggy_lm_loss(logits, batches[spikes[0]][1], pad)
    assert math.isclose(float(loss), float(clean) * batches[0][1].numel(), rel_tol=1e-5)


def test_training_is_deterministic(spike_rescue):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        batches, vocab = spike_rescue.make_batches(12, {6}, seed=3)
        pad = vocab.index(spike_rescue.RARE)
        a = spike_rescue.train("a", {"max_norm": 1.0}, batches, len(vocab), pad, seed=3, progress=False)
        b = spike_rescue.train("b", {"max_norm": 1.0}, batches, len(vocab), pad, seed=3, progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert a.losses == b.losses and a.norms == b.norms
    assert a.clipped[6] and len(a.thresholds) == 12


def test_zclip_run_records_its_own_bound(spike_rescue):
    """The picture's ZClip panel: the spike line from its EMA (NaN in the warm-up), and every
    clipped step attributed to one cause."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = 60
        spikes = [45]
        batches, vocab = spike_rescue.make_batches(steps, set(spikes), seed=0)
        pad = vocab.index(spike_rescue.RARE)
        run = spike_rescue.train("z", {"mode": ZClip()}, batches, len(vocab), pad, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    warmup = 25  # zclip's default: no EMA before it, so no spike line
    assert all(math.isnan(v) for v in run.spike_line[:warmup])
    assert all(math.isfinite(v) and v > 0 for v in run.spike_line[warmup:])
    causes = spike_rescue.clip_causes(run, spikes)
    assert causes["corrupt"] == spikes  # the corrupt batch is clipped
    clipped = sorted(causes["corrupt"] + causes["fixed"] + causes["adaptive"])
    assert clipped == [i for i, c in enumerate(run.clipped) if c]
    for i in causes["fixed"]:
        assert run.thresholds[i] == pytest.approx(1.0) and run.norms[i] > 1.0
    for i in causes["adaptive"]:
        assert run.thresholds[i] < 1.0
    note = spike_rescue.clean_clip_note(run, spikes)
    assert note.startswith("1 corrupt batch clipped")
    assert (
        spike_rescue.clean_clip_note(spike_rescue.RunResult("none", [0.0], [1.0], None, [False], [False]), spikes)
        is None
    )


def test_the_report_names_the_parameters_behind_the_corrupt_batches(short_run, spike_rescue, capsys):
    """The clipped run's report explains exactly the corrupt batches, by the LM head's share of
    their squared norm; the command line prints the same from the saved checkpoint."""
    _, out, results = short_run
    report = results[1].report
    spikes = spike_rescue.spike_steps_for(200)
    (found,) = report.attributions
    assert found.steps == spikes and not found.nonfinite
    assert found.labels[0] == "head.weight" and found.low > 0.2
    line = f"steps {', '.join(map(str, spikes))}: "
    assert line in str(report) and "of the squared norm in head.weight" in str(report)
    if out is None:
        pytest.skip("the checkpoint is written beside the plot (matplotlib)")
    from clipped_optim import cli

    assert cli.main(["report", str(out / spike_rescue.CHECKPOINT)]) == 0
    printed = capsys.readouterr().out
    assert "parameter names: stored in the checkpoint" in printed
    assert str(report) in printed
