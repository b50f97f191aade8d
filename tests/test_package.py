"""What a user meets first: the top-level names, a light import, and ``help()`` that stands alone."""

from __future__ import annotations

import pydoc
import subprocess
import sys

import clipped_optim
from clipped_optim import ClippedOptimizer
from clipped_optim.diagnostics import plot_history


def test_top_level_names():
    assert clipped_optim.plot_history is plot_history
    for name in clipped_optim.__all__:
        assert hasattr(clipped_optim, name), name


def test_import_needs_no_optional_dependency():
    """``import clipped_optim`` (and its integrations subpackage) loads no plotting or training framework."""
    code = (
        "import sys, clipped_optim, clipped_optim.integrations\n"
        "heavy = ('matplotlib', 'pytorch_lightning', 'lightning', 'transformers', 'accelerate')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


DEFAULTS = {  # option: its default in each mode that reads it, as the docstring gives them
    "max_norm": "1.0",
    "clip_factor": "0.01",
    "eps": "1e-3",
    "quantile": "0.9",
    "history_length": "1000",
    "per_param": "False",
    "alpha": "0.97",
    "z_thresh": "2.5",
    "warmup_steps": "25",
    "clip_option": '"adaptive_scaling"``',
    "skip_update_on_spike": "False",
    "skip_spikes": "False",
    "spike_sigma": "6.0",
    "spike_window": "128",
}


def test_help_states_the_adaptive_defaults():
    """A pip user has no docs folder: ``help(ClippedOptimizer)`` gives every default itself."""
    text = pydoc.render_doc(ClippedOptimizer, renderer=pydoc.plaintext)
    assert "docs/" not in text
    doc = ClippedOptimizer.__doc__
    args = doc[doc.index("Args:") :]
    entries = {}  # "name: text" entries of the Args section, continuation lines joined
    for line in args.splitlines()[1:]:
        head = line.strip().split(":", 1)[0]
        if line.startswith(" " * 8) and not line.startswith(" " * 12) and head.isidentifier():
            entries[head] = line
        elif entries and line.startswith(" " * 12):
            entries[list(entries)[-1]] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    for name, default in DEFAULTS.items():
        assert name in entries, name
        assert f"default {default}" in entries[name] or f"{default} (default)" in entries[name], entries[name]


def test_documented_defaults_are_the_real_ones():
    """The defaults in the docstring are the ones the constructor applies."""
    cases = {
        "agc": {"clip_factor": 0.01, "eps": 1e-3},
        "autoclip": {"quantile": 0.9, "history_length": 1000, "per_param": False},
        "zclip": {
            "alpha": 0.97,
            "z_thresh": 2.5,
            "warmup_steps": 25,
            "clip_option": "adaptive_scaling",
            "clip_factor": 1.0,
            "skip_update_on_spike": False,
            "max_norm": 1.0,
        },
    }
    import torch

    for mode, expected in cases.items():
        opt = ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1), mode=mode)
        for name, value in expected.items():
            assert getattr(opt.config, name) == value, (mode, name)
    opt = ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), skip_spikes=True)
    assert (opt.config.spike_sigma, opt.config.spike_window) == (6.0, 128)
