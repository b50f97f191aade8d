"""Bad input fails at construction with the argument, its value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from clipped_optim import ClippedOptimizer


def _inner():
    return torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(max_norm=0.0), ValueError, r"max_norm=0\.0.*positive finite"),
        (dict(max_norm=-1), ValueError, r"max_norm=-1.*positive finite"),
        (dict(max_norm=math.inf), ValueError, r"max_norm=inf"),
        (dict(max_norm=math.nan), ValueError, r"max_norm=nan"),
        (dict(max_norm="1.0"), ValueError, r"max_norm='1\.0'"),
        (dict(max_norm=True), ValueError, r"max_norm=True"),
        (dict(norm_type=0), ValueError, r"norm_type=0.*> 0"),
        (dict(norm_type=-2.0), ValueError, r"norm_type=-2\.0"),
        (dict(norm_type=math.nan), ValueError, r"norm_type=nan"),
        (dict(norm_type="fro"), ValueError, r"norm_type='fro'"),
        (dict(mode="value"), ValueError, r"clip_value=None.*mode='value' needs clip_value"),
        (dict(mode="value", clip_value=-0.5), ValueError, r"clip_value=-0\.5"),
        (dict(mode="norm", clip_value=0.5), ValueError, r"clip_value is only used with mode='value'"),
        (dict(mode="global"), ValueError, r"mode='global'.*'norm', 'value', 'per_param'"),
        (dict(nonfinite="ignore"), ValueError, r"nonfinite='ignore'.*'skip', 'raise', 'propagate'"),
        (dict(foreach="yes"), ValueError, r"foreach='yes'"),
        (dict(max_nrom=1.0), TypeError, r"unexpected keyword argument 'max_nrom' \(did you mean 'max_norm'\?\)"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ClippedOptimizer(_inner(), **kwargs)


def test_optimizer_must_be_an_optimizer():
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer, got list"):
        ClippedOptimizer([torch.nn.Parameter(torch.randn(2))])


def test_positional_options_are_refused():
    with pytest.raises(TypeError):
        ClippedOptimizer(_inner(), 1.0)  # type: ignore[misc]


def test_double_wrapping_is_refused():
    with pytest.raises(ValueError, match="already a ClippedOptimizer"):
        ClippedOptimizer(ClippedOptimizer(_inner()))


def test_accepted_spellings():
    assert ClippedOptimizer(_inner(), norm_type="inf").config.norm_type == math.inf
    assert ClippedOptimizer(_inner(), max_norm=2).config.max_norm == 2.0
    assert ClippedOptimizer(_inner(), mode="value", clip_value=1).config.clip_value == 1.0


def test_flat_grads_with_per_parameter_autoclip_is_refused():
    with pytest.raises(ValueError, match="flat_grads=True is not supported with mode='autoclip', per_param=True"):
        ClippedOptimizer(_inner(), mode="autoclip", per_param=True, flat_grads=True)
