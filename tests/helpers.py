"""Shared test fixtures: small problems for every row of the optimizer table."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from optim_table import OptimRow


class Problem:
    """A tiny model and a fixed stream of batches whose loss scale varies per step, so some
    steps are clipped and some are not."""

    def __init__(self, row: OptimRow, dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 6):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.sparse = row.sparse
        self.create_graph = row.create_graph
        if row.sparse:
            self.model = nn.Embedding(12, 5, sparse=True).to(dtype)
            self.batches = [(torch.randint(0, 12, (7,), generator=g), None) for _ in range(steps)]
        else:
            bias = not row.matrix_only
            self.model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)).to(dtype)
            self.batches = [
                (torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype))
                for _ in range(steps)
            ]
        self.factors = [0.2, 3.0, 1.0, 8.0, 0.05, 2.0, 0.5, 4.0][:steps] * (1 + steps // 8)

    def backward(self, model: nn.Module, step: int) -> torch.Tensor:
        loss = self.loss(model, step)
        loss.backward(create_graph=self.create_graph)
        return loss

    def clone_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        x, y = self.batches[step]
        if self.sparse:
            return model(x).pow(2).sum() * self.factors[step]
        return nn.functional.mse_loss(model(x), y) * self.factors[step]

    def typical_norm(self, norm_type: float = 2.0, per_param: bool = False) -> float:
        """The step-0 gradient norm (global, or the largest per-parameter one)."""
        model = self.clone_model()
        self.loss(model, 0).backward()
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
        if per_param:
            return max(float(torch.linalg.vector_norm(g, norm_type)) for g in grads)
        return float(torch.nn.utils.get_total_norm(grads, norm_type))


def reference_clip_(params, mode: str, max_norm: float, norm_type: float, clip_value: float | None) -> torch.Tensor:
    """torch's own functions, applied as a user would before ``inner.step()``. Returns the
    pre-clip global norm (sparse gradients are densified: torch has no sparse norm)."""
    params = [p for p in params if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce().to_dense()
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    elif mode == "per_param":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    for p in sparse:  # back to row-sparse, as an embedding produces it
        p.grad = p.grad.to_sparse(sparse_dim=1)
    return total


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 0.0, atol: float = 0.0) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


INF = math.inf


def assert_same_state_dict(a, b, path: str = "") -> None:
    """Two optimizer state dicts hold the same keys and bit-identical values (NaN equal to NaN)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same_state_dict(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state_dict(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


@contextlib.contextmanager
def no_host_sync():
    """Fail on every Python-level read of a tensor's value (``.item()``, ``if t``, ``float(t)``...).

    On CPU there is no ``cuda.set_sync_debug_mode``; a device-to-host sync from Python must go
    through one of these methods, so patching them proves the code path never reads a value.
    """
    names = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host during the step")

    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
