import os
import sys

import pytest

from clipped_optim import policy

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=["host", "device"])
def rule_path(request, monkeypatch):
    """Run a test on both paths a clip rule can take: deciding on the host (a CPU step) and on
    the device with ``where``/``clamp`` only (an accelerator's path, run here on the CPU)."""
    monkeypatch.setattr(policy, "HOST_SCALARS", request.param == "host")
    return request.param


@pytest.fixture
def device_path(monkeypatch):
    """Take the path an accelerator takes, on the CPU: decide with tensor ops only, read nothing
    on the host (a CPU step reads its decision there, where it costs a load from memory)."""
    monkeypatch.setattr(policy, "HOST_SCALARS", False)
