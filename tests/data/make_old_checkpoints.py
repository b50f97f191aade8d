"""Write ``old_checkpoints.pt``: checkpoints of clipped_optim 0.1.0 (before clip policies became
objects), taken mid-run for every stateful mode, and the parameters that 0.1.0 reached when it
continued from each. ``tests/test_custom_policy.py::test_old_checkpoint_loads_and_continues``
loads them with today's package and checks that it continues to the same parameters.

Run it with the 0.1.0 package first on ``PYTHONPATH`` (it takes the per-mode keyword arguments
that 0.1.0 had): ``python tests/data/make_old_checkpoints.py``.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from clipped_optim import ClippedOptimizer

#: name -> 0.1.0's keyword arguments
OLD_KWARGS = {
    "agc": dict(mode="agc", clip_factor=0.02),
    "autoclip": dict(mode="autoclip", quantile=0.8, history_length=6),
    "autoclip_per_param": dict(mode="autoclip", quantile=0.5, history_length=5, per_param=True),
    "zclip": dict(mode="zclip", z_thresh=2.0, warmup_steps=4, max_norm=5.0),
    "spikes": dict(mode="norm", max_norm=0.5, skip_spikes=True, spike_sigma=3.0, spike_window=4),
}
BEFORE, AFTER = 12, 8  # steps before the checkpoint, and after it


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def backward(m: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    factor = 30.0 if step in (7, 15) else 1.0 + (step % 3)
    m.zero_grad(set_to_none=True)
    (m(x).pow(2).mean() * factor).backward()


def main() -> None:
    out = {}
    for name, kw in OLD_KWARGS.items():
        m = model()
        opt = ClippedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), history_size=8, **kw)
        for step in range(BEFORE):
            backward(m, step)
            opt.step()
        # a deep copy: state_dict() shares the tensors the next steps update in place
        checkpoint = copy.deepcopy({"model": m.state_dict(), "optimizer": opt.state_dict()})
        for step in range(BEFORE, BEFORE + AFTER):
            backward(m, step)
            opt.step()
        out[name] = {"checkpoint": checkpoint, "final": [p.detach().clone() for p in m.parameters()]}
        out[name]["final_clip"] = {k: v for k, v in opt.state["clip"].items() if torch.is_tensor(v)}
    torch.save(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_checkpoints.pt"))


if __name__ == "__main__":
    main()
