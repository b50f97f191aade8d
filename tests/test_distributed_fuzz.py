"""Randomized multi-process check: every rank's parameters and clip state equal one process's.

Each case draws a small model (a few parameters of random shapes and dtypes), lays it out over
the ranks, and runs a few steps on the same random gradients in one process and on every rank:

* ``zero`` (``process_group=``): the parameters, as one flat vector, are cut into one slice per
  rank at random points (empty slices included); a rank holds the pieces of its slice as 1-D
  parameters, some parameters instead as DTensor shards (uneven, empty shards included);
* ``dtensor`` (no ``process_group``): DTensor shards, plus plain parameters complete on every rank.

Random too: the clip mode and its options, the norm type, the inner optimizer, which parameters
sit in an opted-out group (``"clip": False``, so on the ranks that own them only), gradients
missing in a step, NaN/Inf on a random element (so on a random rank), a spike, an opted-out
group added in the middle of the run, a save/load round trip.

After every step: each rank's pieces equal the one-process parameters; each rank's clip state
(all of it but ``param_norms``, its own pieces' norms) equals one process's and is identical, to
the bit, on every rank. A raise is a raise on every rank and in one process.

Profiles: ``CLIPPED_OPTIM_DIST_FUZZ`` unset: a few fixed cases on 2 ranks (CI). ``=long``: batches
of cases on 2 and 3 ranks for ``CLIPPED_OPTIM_DIST_FUZZ_MINUTES`` (default 10) minutes from seed
``CLIPPED_OPTIM_DIST_FUZZ_SEED`` (default 1000); every failure is printed with its seed, and
the test fails at the end if there was any. Rerun cases with ``CLIPPED_OPTIM_DIST_FUZZ_SEEDS=17,23``
(and ``CLIPPED_OPTIM_DIST_FUZZ_WORLD=3`` for a case drawn on 3 ranks).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from clipped_optim import ClippedOptimizer
from test_distributed import _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

PROFILE = os.environ.get("CLIPPED_OPTIM_DIST_FUZZ", "short")
MINUTES = float(os.environ.get("CLIPPED_OPTIM_DIST_FUZZ_MINUTES", "10"))
SHORT_SEEDS = [0, 1, 2, 3, 4, 5]
BATCH = 20  # cases per spawn in the long profile


# -- a case, drawn from its seed (the same on every rank) -------------------------------
@dataclass
class Case:
    seed: int
    world: int
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    optout: list[bool]
    layout: str
    dtensor: list[bool]  # per parameter: a DTensor shard (else a plain piece or replica)
    cuts: list[int]  # zero layout: rank r holds the flat elements [cuts[r], cuts[r + 1])
    options: dict
    inner: str
    steps: int
    missing: list[set[int]]  # per step: parameters without a gradient
    bad: dict[int, tuple[int, int, float]]  # step -> (parameter, element, NaN/Inf)
    factors: list[float]
    add_optout_at: int | None  # the opted-out group joins at this step (None: from the start)
    reload_at: int | None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        names = [
            f"{tuple(s)}:{str(d)[6:]}{'/out' if o else ''}{'/dt' if t else ''}"
            for s, d, o, t in zip(self.shapes, self.dtypes, self.optout, self.dtensor)
        ]
        return (
            f"seed={self.seed} world={self.world} layout={self.layout} cuts={self.cuts} params={names} "
            f"options={self.options} inner={self.inner} missing={self.missing} bad={self.bad} "
            f"factors={self.factors} add_optout_at={self.add_optout_at} reload_at={self.reload_at}"
        )


def draw(seed: int, world: int) -> Case:
    rnd = random.Random(seed)
    n = rnd.randint(1, 6)
    shapes = [tuple(rnd.randint(1, 5) for _ in range(rnd.choice([1, 1, 2]))) for _ in range(n)]
    dtypes = [rnd.choice([torch.float32, torch.float32, torch.float64]) for _ in range(n)]
    optout = [rnd.random() < 0.25 for _ in range(n)]
    if all(optout):
        optout[0] = False
    layout = rnd.choice(["zero", "zero", "dtensor"])
    dtensor = [rnd.random() < (0.3 if layout == "zero" else 0.7) for _ in range(n)]
    total = sum(math.prod(s) for s in shapes)
    inner_cuts = sorted(rnd.choice([0, total, rnd.randint(0, total)]) for _ in range(world - 1))
    steps = rnd.randint(3, 7)
    options = _draw_options(rnd)
    bad = {}
    if rnd.random() < 0.5:
        i = rnd.randrange(n)
        bad[rnd.randrange(steps)] = (
            i,
            rnd.randrange(math.prod(shapes[i])),
            rnd.choice([math.nan, math.inf, -math.inf]),
        )
    return Case(
        seed=seed,
        world=world,
        shapes=shapes,
        dtypes=dtypes,
        optout=optout,
        layout=layout,
        dtensor=dtensor,
        cuts=[0, *inner_cuts, total],
        options=options,
        inner=rnd.choice(["sgd", "adamw"]),
        steps=steps,
        missing=[{i for i in range(n) if rnd.random() < 0.15} for _ in range(steps)],
        bad=bad,
        factors=[rnd.choice([1.0, 1.0, 1.0, 0.1, 20.0]) for _ in range(steps)],
        add_optout_at=rnd.choice([None, None, rnd.randrange(steps)]) if any(optout) else None,
        reload_at=rnd.choice([None, None, rnd.randrange(steps)]),
    )


def _draw_options(rnd: random.Random) -> dict:
    mode = rnd.choice(["norm", "norm", "value", "autoclip", "zclip"])
    options: dict = {"mode": mode, "nonfinite": rnd.choice(["skip", "skip", "propagate", "raise"])}
    if mode in ("norm", "value", "autoclip"):
        options["norm_type"] = rnd.choice([2.0, 2.0, 1.0, math.inf])
    if mode == "norm":
        options["max_norm"] = rnd.choice([0.05, 0.5, 3.0])
        if rnd.random() < 0.3:
            options.update(skip_spikes=True, spike_window=3)
    elif mode == "value":
        options["clip_value"] = rnd.choice([0.01, 0.3])
    elif mode == "autoclip":
        options.update(quantile=rnd.choice([0.5, 0.9]), history_length=rnd.choice([2, 5]))
    else:
        options.update(warmup_steps=rnd.choice([1, 2, 3]), max_norm=rnd.choice([None, 2.0]))
    return options


# -- the model, in one process and laid out over the ranks --------------------------------
def full_values(case: Case) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    return [torch.randn(s, generator=g).to(d) for s, d in zip(case.shapes, case.dtypes)]


def full_grads(case: Case, step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(case.seed * 1000 + step)
    grads: list[torch.Tensor | None] = []
    for i, (s, d) in enumerate(zip(case.shapes, case.dtypes)):
        t = (torch.randn(s, generator=g) * case.factors[step]).to(d)
        grads.append(None if i in case.missing[step] else t)
    if step in case.bad:
        i, element, value = case.bad[step]
        if grads[i] is not None:
            grads[i].view(-1)[element] = value
    return grads


class Layout:
    """This rank's parameters, and how each maps to the full ones."""

    def __init__(self, case: Case, rank: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.case, self.rank = case, rank
        self.mesh = init_device_mesh("cpu", (case.world,)) if any(case.dtensor) else None
        self.params: list[tuple[int, torch.Tensor, slice | None]] = []  # (full index, parameter, flat range)
        offset = 0
        lo, hi = case.cuts[rank], case.cuts[rank + 1]
        for i, full in enumerate(full_values(case)):
            n = full.numel()
            if case.dtensor[i]:
                self.params.append((i, self._shard(full).requires_grad_(), None))
            elif case.layout == "zero":  # this rank's piece of the flat vector (maybe empty)
                a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
                piece = slice(a, max(a, b))
                if b > a or random.Random(case.seed + i).random() < 0.5:  # empty pieces too, sometimes
                    self.params.append((i, full.reshape(-1)[piece].clone().requires_grad_(), piece))
            else:  # a replica, complete on every rank
                self.params.append((i, full.clone().requires_grad_(), slice(0, n)))
            offset += n

    def _shard(self, full: torch.Tensor):
        from torch.distributed.tensor import Shard, distribute_tensor

        return distribute_tensor(full, self.mesh, [Shard(0)], src_data_rank=None)

    def set_grads(self, grads: list[torch.Tensor | None]) -> None:
        for i, p, piece in self.params:
            g = grads[i]
            if g is None:
                p.grad = None
            elif piece is None:
                p.grad = self._shard(g.clone())
            else:
                p.grad = g.reshape(-1)[piece].clone() if self.case.layout == "zero" else g.clone()

    def full_of(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _groups(case: Case, params: list[tuple[int, torch.Tensor]], optout: bool | None) -> list[dict]:
    """Param groups: clipped ones, then (``optout`` not False) the opted-out ones; DTensors and
    plain tensors apart (foreach kernels do not mix them)."""
    groups = []
    for out in (False, True):
        if out and optout is False:
            continue
        for is_dt in (False, True):
            chosen = [p for i, p in params if case.optout[i] == out and case.dtensor[i] == is_dt]
            if chosen:
                groups.append({"params": chosen, **({"clip": False} if out else {})})
    return groups


def _inner(case: Case, groups: list[dict]) -> torch.optim.Optimizer:
    if not groups:  # a rank with nothing: torch refuses an empty optimizer
        groups = [{"params": [torch.zeros(0, requires_grad=True)]}]
    if case.inner == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.05)


def build(case: Case, params: list[tuple[int, torch.Tensor]], sharded: bool) -> ClippedOptimizer:
    first = _groups(case, params, optout=case.add_optout_at is None)
    group = dist.group.WORLD if sharded and case.layout == "zero" else None
    return ClippedOptimizer(_inner(case, first), process_group=group, **case.options)


def add_optout(case: Case, opt: ClippedOptimizer, params: list[tuple[int, torch.Tensor]]) -> None:
    for group in _groups(case, [(i, p) for i, p in params if case.optout[i]], optout=True):
        opt.add_param_group(group)


# -- running and comparing --------------------------------------------------------------
def _step(opt: ClippedOptimizer) -> str | None:
    """Step; the name of the exception it raised, if any."""
    try:
        opt.step()
        return None
    except FloatingPointError:
        return "FloatingPointError"


def _reload(opt: ClippedOptimizer) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _clip_state(opt: ClippedOptimizer) -> dict:
    return {k: v for k, v in opt.state["clip"].items() if k != "param_norms"}


def _compare_state(mine: dict, ref: dict) -> list[str]:
    errors = []
    if set(mine) != set(ref):
        return [f"clip state keys {sorted(mine)} != {sorted(ref)}"]
    for key, want in ref.items():
        got = mine[key]
        if isinstance(want, torch.Tensor):
            try:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, equal_nan=True, check_dtype=False)
            except AssertionError as exc:
                errors.append(f"clip state {key!r}: {exc}")
        elif got != want:
            errors.append(f"clip state {key!r}: {got!r} != {want!r}")
    return errors


def _compare_params(layout: Layout, ref_params: list[torch.Tensor]) -> list[str]:
    errors = []
    for i, p, piece in layout.params:
        got = layout.full_of(p)
        want = ref_params[i].detach()
        if piece is not None and layout.case.layout == "zero":
            want = want.reshape(-1)[piece]
        try:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
        except AssertionError as exc:
            errors.append(f"parameter {i}: {exc}")
    return errors


def _all_errors(mine: list[str]) -> list[str]:
    """Every rank's errors, on every rank: the ranks stop (or go on) together."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [f"rank {r}: {e}" for r, errs in enumerate(every) for e in errs]


def _bits(state: dict) -> list:
    """The clip state, but ``param_norms``, as exact host values (floats as their bits)."""
    out = []
    for key in sorted(state):
        value = state[key]
        if key == "param_norms":
            continue
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().reshape(-1)
            out.append((key, str(t.dtype), t.view(torch.uint8).tolist()))
        else:
            out.append((key, repr(value)))
    return out


def _same_on_every_rank(opt: ClippedOptimizer) -> list[str]:
    digest = hashlib.sha256(repr(_bits(opt.state["clip"])).encode()).hexdigest()  # str hash() is per process
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, digest)
    return [] if len(set(every)) == 1 else [f"clip states differ between ranks: {every}"]


def run_case(case: Case, rank: int) -> list[str]:
    ref_params = [v.clone().requires_grad_() for v in full_values(case)]
    ref = build(case, list(enumerate(ref_params)), sharded=False)
    layout = Layout(case, rank)
    mine = [(i, p) for i, p, _ in layout.params]
    opt = build(case, mine, sharded=True)
    for step in range(case.steps):
        if step == case.add_optout_at:
            add_optout(case, ref, list(enumerate(ref_params)))
            add_optout(case, opt, mine)
        if step == case.reload_at:
            _reload(ref)
            _reload(opt)
        grads = full_grads(case, step)
        for p, g in zip(ref_params, grads):
            p.grad = g
        layout.set_grads(grads)
        want, got = _step(ref), None
        errors: list[str] = []
        try:
            got = _step(opt)
        except Exception as exc:
            errors.append(f"step {step} raised {type(exc).__name__}: {exc}")
        if not errors and got != want:
            errors.append(f"step {step}: raised {got}, one process {want}")
        errors = _all_errors(errors)  # agreed before the comparisons' collectives (full_tensor)
        if errors:
            return errors
        errors = [f"step {step}: {e}" for e in _compare_state(_clip_state(opt), _clip_state(ref))]
        errors += [f"step {step}: {e}" for e in _compare_params(layout, ref_params)]
        errors = _all_errors(errors) or _same_on_every_rank(opt)
        if errors:
            return errors
    return []


def _worker(rank: int, world: int, seeds: list[int], keep_going: bool) -> None:
    failures = []
    for seed in seeds:
        case = draw(seed, world)
        try:
            errors = run_case(case, rank)
        except Exception as exc:  # a collective gone wrong: the ranks cannot go on together
            raise RuntimeError(f"{case.describe()}\n  rank {rank}: {type(exc).__name__}: {exc}") from exc
        if errors:
            failures.append(f"{case.describe()}\n  " + "\n  ".join(errors[:6]))
            if not keep_going:
                break
    if failures:
        raise AssertionError(f"{len(failures)} of {len(seeds)} cases failed:\n" + "\n".join(failures))


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(PROFILE == "long", reason="the long profile runs instead")
def test_ranks_match_one_process_on_random_cases():
    seeds = [int(s) for s in os.environ.get("CLIPPED_OPTIM_DIST_FUZZ_SEEDS", "").split(",") if s] or SHORT_SEEDS
    _spawn(_worker, int(os.environ.get("CLIPPED_OPTIM_DIST_FUZZ_WORLD", "2")), seeds, False)


@pytest.mark.slow
@pytest.mark.timeout(int(MINUTES * 60) + 600)
@pytest.mark.skipif(PROFILE != "long", reason="set CLIPPED_OPTIM_DIST_FUZZ=long")
def test_ranks_match_one_process_long():
    seed = int(os.environ.get("CLIPPED_OPTIM_DIST_FUZZ_SEED", "1000"))
    deadline = time.monotonic() + MINUTES * 60
    ran, failed = 0, []
    while time.monotonic() < deadline:
        world = 2 if (seed // BATCH) % 3 else 3
        seeds = list(range(seed, seed + BATCH))
        try:
            _spawn(_worker, world, seeds, True)
        except Exception as exc:
            failed.append(f"world {world}, seeds {seeds[0]}..{seeds[-1]}: {exc}")
            print(failed[-1], flush=True)
        ran += len(seeds)
        seed += BATCH
    print(f"long profile: {ran} cases, {len(failed)} failing batches", flush=True)
    assert not failed, "\n".join(failed)
