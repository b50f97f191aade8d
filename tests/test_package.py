"""What a user meets first: the top-level names, a light import, and ``help()`` that stands alone."""

from __future__ import annotations

import dataclasses
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


DEFAULTS = {  # the constructor's options and their defaults, as the docstring gives them
    "max_norm": "1.0",
    "norm_type": "2.0",
    "history_size": "1000",
    "skip_spikes": "False",
}


def test_help_states_the_defaults():
    """A pip user has no docs folder: ``help(ClippedOptimizer)`` gives every default itself."""
    text = pydoc.render_doc(ClippedOptimizer, renderer=pydoc.plaintext)
    assert "docs/" not in text
    entries = _args(ClippedOptimizer.__doc__)
    for name, default in DEFAULTS.items():
        assert name in entries, name
        assert f"default {default}" in entries[name] or f"{default} (default)" in entries[name], entries[name]


def _args(doc: str, section: str = "Args:") -> dict[str, str]:
    """The ``name: text`` entries of a docstring section, continuation lines joined."""
    lines = doc[doc.index(section) :].splitlines()[1:]
    first = next(line for line in lines if line.strip())
    indent = len(first) - len(first.lstrip())
    entries: dict[str, str] = {}
    for line in lines:
        head = line.strip().split(":", 1)[0]
        if line.startswith(" " * indent) and not line.startswith(" " * (indent + 1)) and head.isidentifier():
            entries[head] = line
        elif entries and line.startswith(" " * (indent + 1)):
            entries[list(entries)[-1]] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * indent):
            break
    return entries


def test_policies_document_their_real_defaults():
    """Each policy's docstring gives every field's default, and it is the one the field has."""
    for cls in (clipped_optim.AGC, clipped_optim.AutoClip, clipped_optim.ZClip, clipped_optim.SpikeSkip):
        entries = _args(cls.__doc__, "Attributes:")
        for field in dataclasses.fields(cls):
            assert field.name in entries, (cls.__name__, field.name)
            default = field.default
            shown = {repr(default), str(default), f"{default:g}" if isinstance(default, float) else str(default)}
            shown.add('"adaptive_scaling"') if default == "adaptive_scaling" else None
            assert any(f"(default {d}" in entries[field.name] for d in shown), (cls.__name__, entries[field.name])


def test_mode_names_give_the_policies_defaults():
    import torch

    for mode, cls in (("agc", clipped_optim.AGC), ("autoclip", clipped_optim.AutoClip), ("zclip", clipped_optim.ZClip)):
        opt = ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1), mode=mode)
        assert opt.config.policy == cls(), mode
    opt = ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), skip_spikes=True)
    assert opt.config.skip == clipped_optim.SpikeSkip(sigma=6.0, window=128)
