"""``python -m clipped_optim report CHECKPOINT``: the clip report of a saved checkpoint.

No model and no training code are needed: the clip state a :class:`~clipped_optim.ClippedOptimizer`
keeps in its ``state_dict()`` holds the history, the attribution and (once given) the
parameter names. The file is loaded with ``torch.load(..., weights_only=True)`` and searched
for that state wherever it sits:

* a wrapper's ``state_dict()`` saved alone (``torch.save(opt.state_dict(), path)``, the Hugging
  Face Trainer's ``optimizer.pt``; a Trainer checkpoint directory may be given instead),
* a dict holding one (nanoGPT's ``{"model": ..., "optimizer": ...}``, a Lightning ``.ckpt``
  with its ``optimizer_states`` list), at any depth,
* the ``"clip"`` bytes of :func:`clipped_optim.distributed.get_optimizer_state_dict`.

Parameter names, in order of preference: the names stored in the clip state
(:meth:`~clipped_optim.ClippedOptimizer.name_parameters`, ``report(model.named_parameters())``
or the package's Lightning and Hugging Face callbacks store them); else a match by shape
against a model state dict found beside the optimizer's (under ``"model"``, ``"state_dict"``,
``"model_state_dict"`` or ``"module"``, or a Trainer directory's ``model.safetensors`` /
``pytorch_model.bin``): a parameter is named only when its shape is that of exactly one
floating-point tensor of the model and of exactly one of the optimizer's parameters; the
others, and every parameter when nothing matches, are given by index in optimizer order and
shape.

Exit codes: 0 printed, 2 the file could not be read or holds no clip state (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from . import stats

__all__ = ["main", "find_clip_states", "load_checkpoint", "match_names_by_shape", "CheckpointError"]

#: Keys under which checkpoints commonly keep the model's state dict.
MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
#: Files of a Hugging Face Trainer checkpoint directory.
HF_OPTIMIZER = "optimizer.pt"
HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_DEPTH = 6  # nested dicts/lists searched for a clip state


class CheckpointError(Exception):
    """A checkpoint that cannot be read, or holds no clip state (printed as one line)."""


class Loaded(NamedTuple):
    """What the command found in a checkpoint.

    Attributes:
        clip: the clip state.
        where: where it was found (keys from the top of the file), for the header line.
        names: the parameter names in optimizer order (``None`` entries: unnamed), or ``None``.
        shapes: the parameter shapes in optimizer order, or ``None``.
        naming: how the names were found, as a sentence.
        found: how many clip states the file holds (the first is reported).
    """

    clip: dict[str, Any]
    where: str
    names: list[str | None] | None
    shapes: list[tuple[int, ...]] | None
    naming: str
    found: int


def _is_clip_state(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("mode"), str) and "steps" in value and "grad_norm" in value


def find_clip_states(obj: Any, where: str = "", depth: int = 0) -> list[tuple[str, dict[str, Any], Any]]:
    """Every clip state in ``obj`` (dicts and lists walked, depth-first in key order), each as
    ``(where, clip state, the dict that holds the optimizer state dict it is in)``."""
    found: list[tuple[str, dict[str, Any], Any]] = []
    if depth > _MAX_DEPTH:
        return found
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{where}[{key!r}]"
            if key == stats.STATE_KEY and _is_clip_state(value):
                found.append((here, value, obj))
            elif key == stats.STATE_KEY and isinstance(value, (bytes, bytearray)):
                found += _from_bytes(here, value, obj)
            else:
                found += find_clip_states(value, here, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += find_clip_states(value, f"{where}[{i}]", depth + 1)
    return found


def _from_bytes(where: str, data: bytes | bytearray, holder: Any) -> list[tuple[str, dict[str, Any], Any]]:
    """The clip state that ``clipped_optim.distributed.get_optimizer_state_dict`` serialised."""
    import io

    try:
        value = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception:  # bytes of something else under a "clip" key: not ours
        return []
    return [(where, value, holder)] if _is_clip_state(value) else []


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # any unreadable file gets the same one-line answer
        first = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): {type(error).__name__}: {first}"
        ) from None


def load_checkpoint(path: str) -> Loaded:
    """Find the clip state in the checkpoint at ``path`` (a file, or a Hugging Face Trainer
    checkpoint directory), with the parameter names and shapes it lets one recover."""
    directory = None
    if os.path.isdir(path):
        directory, path = path, os.path.join(path, HF_OPTIMIZER)
        if not os.path.exists(path):
            raise CheckpointError(f"{directory}: a directory without {HF_OPTIMIZER}; pass the checkpoint file")
    else:
        directory = os.path.dirname(path) if os.path.basename(path) == HF_OPTIMIZER else None
    obj = _load(path)
    found = find_clip_states(obj)
    if not found:
        raise CheckpointError(
            f"{path}: no clip statistics found (no ClippedOptimizer state dict, with its state['clip'], in this file)"
        )
    where, clip, _ = found[0]
    shapes = _shapes(clip.get("param_shapes"))
    names, naming = _names(clip, shapes, obj, directory)
    return Loaded(clip, where or "the top level", names, shapes, naming, len(found))


def _shapes(value: Any) -> list[tuple[int, ...]] | None:
    if not isinstance(value, (list, tuple)):
        return None
    return [tuple(int(d) for d in s) for s in value]


def _names(
    clip: dict[str, Any], shapes: list[tuple[int, ...]] | None, obj: Any, directory: str | None
) -> tuple[list[str | None] | None, str]:
    stored = clip.get("param_names")
    if isinstance(stored, (list, tuple)) and any(stored):
        return list(stored), "parameter names: stored in the checkpoint"
    if shapes is None:
        return None, "parameter names: none stored, and no parameter shapes to match (by index in optimizer order)"
    model, source = _model_shapes(obj, directory)
    if model is None:
        return None, "parameter names: none stored, no model state dict found (by index in optimizer order and shape)"
    names = match_names_by_shape(shapes, model)
    named = sum(n is not None for n in names)
    rest = "" if named == len(shapes) else "; the rest by index in optimizer order and shape"
    return names, (
        f"parameter names: matched by shape to the model state dict in {source} ({named} of {len(shapes)} "
        f"have a shape that no other tensor has{rest})"
    )


def _model_shapes(obj: Any, directory: str | None) -> tuple[dict[str, tuple[int, ...]] | None, str]:
    """The floating-point tensors' shapes of a model state dict in the checkpoint, or beside it."""
    if isinstance(obj, dict):
        for key in MODEL_KEYS:
            value = obj.get(key)
            if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
                shapes = {k: tuple(v.shape) for k, v in value.items() if _floating(v)}
                return shapes, f"[{key!r}]"
    for name in HF_MODEL_FILES if directory is not None else ():
        path = os.path.join(directory, name)  # type: ignore[arg-type]
        if os.path.exists(path):
            return (_safetensors_shapes(path) if name.endswith(".safetensors") else _bin_shapes(path)), name
    return None, ""


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shapes from a safetensors file's JSON header (8-byte length, then JSON): no tensor
    is read, and the safetensors package is not needed."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {
        k: tuple(v["shape"])
        for k, v in header.items()
        if k != "__metadata__" and v.get("dtype", "").startswith(("F", "BF"))
    }


def _bin_shapes(path: str) -> dict[str, tuple[int, ...]]:
    value = _load(path)
    return {k: tuple(v.shape) for k, v in value.items() if _floating(v)} if isinstance(value, dict) else {}


def match_names_by_shape(shapes: Sequence[tuple[int, ...]], model: dict[str, tuple[int, ...]]) -> list[str | None]:
    """A name for each parameter whose shape is that of exactly one of the ``model``'s tensors
    and of exactly one of ``shapes``; ``None`` for the others (an ambiguous match is no match:
    tied weights, the layers of a stack, a weight and a bias of the same size)."""
    in_model = Counter(model.values())
    in_optimizer = Counter(tuple(s) for s in shapes)
    by_shape = {shape: name for name, shape in model.items()}
    return [by_shape[s] if in_model[s] == 1 and in_optimizer[s] == 1 else None for s in map(tuple, shapes)]


def _report(args: argparse.Namespace) -> int:
    from .diagnostics import plot_history, state_report

    try:
        loaded = load_checkpoint(args.checkpoint)
        report = state_report(loaded.clip, args.window, loaded.names, loaded.shapes)
    except (CheckpointError, ValueError) as error:
        print(f"clipped-optim: {error}", file=sys.stderr)
        return 2
    more = f" (the first of {loaded.found})" if loaded.found > 1 else ""
    print(f"{args.checkpoint}: clip state at {loaded.where}{more}")
    print(loaded.naming)
    print(report)
    if args.plot:
        plot_history(report, path=args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of steps, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipped-optim", description="Read the clip statistics a ClippedOptimizer saved in a checkpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="print the clip report of a checkpoint",
        description="Print the clip report (figures, advice, the parameters behind the outlier steps) of a "
        "checkpoint, without the model or the training code.",
    )
    report.add_argument("checkpoint", help="a file holding a ClippedOptimizer state dict, or a Trainer checkpoint dir")
    report.add_argument("--plot", metavar="PATH", help="also draw the norm history there (needs matplotlib)")
    report.add_argument("--window", type=_positive, metavar="N", help="cover only the last N recorded steps")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
