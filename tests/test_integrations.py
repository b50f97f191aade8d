"""Real runs with Lightning, Accelerate and the Hugging Face Trainer (skipped when not installed),
and the AMP example."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from clipped_optim import ClippedOptimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _lightning():
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = pytest.importorskip("lightning.pytorch")
    return pl


def test_lightning_fit_with_a_clipped_optimizer(tmp_path):
    _lightning()
    example = _load("lightning_example")
    trainer, model = example.main(max_epochs=2, root=str(tmp_path))
    opt = trainer.optimizers[0]
    assert isinstance(opt, ClippedOptimizer)
    assert trainer.gradient_clip_val is None  # Lightning's own clipping is off
    state = opt.state["clip"]
    assert int(state["steps"]) == trainer.global_step == 16
    # The targets are large: every step's norm is far above max_norm=1, and every step clipped.
    assert int(state["clipped_steps"]) == 16 and float(state["grad_norm"]) > 1.0
    logged = trainer.logged_metrics
    assert "clip/grad_norm" in logged and "clip/clipped_steps" in logged
    assert any(k.startswith("clip/grad_norm/net.") for k in logged)  # per-layer, by parameter name
    # The LR scheduler Lightning drives stepped the wrapper (StepLR, step_size=10 epochs -> still 1e-2).
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_lightning_step_clips_the_gradients(tmp_path):
    pl = _lightning()
    example = _load("lightning_example")
    seen = []

    class Check(pl.Callback):
        def on_before_zero_grad(self, trainer, module, optimizer):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            seen.append(float(torch.nn.utils.get_total_norm(grads)))

    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Check()],
    )
    trainer.fit(example.Regressor(max_norm=0.5), example.data())
    # After each step (before the next zero_grad) the gradients left in p.grad are the clipped ones.
    assert seen and all(n == pytest.approx(0.5, rel=1e-4) for n in seen[1:])


def test_accelerate_prepare_and_step_clips():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.25)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    assert isinstance(prepared, AcceleratedOptimizer) and prepared.optimizer is opt
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 4)
    accelerator.backward(model(x).mul(100).pow(2).mean())
    pre = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    prepared.step()
    post = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert pre > 0.25 and post == pytest.approx(0.25, rel=1e-5)
    assert float(opt.state["clip"]["grad_norm"]) == pytest.approx(pre, rel=1e-5)
    moved = sum(float((p.detach() - b).norm() ** 2) for p, b in zip(model.parameters(), before)) ** 0.5
    assert moved == pytest.approx(0.1 * 0.25, rel=1e-4)  # SGD step of the clipped gradient


def test_accelerate_example_runs():
    pytest.importorskip("accelerate")
    stats = _load("accelerate_example").main()
    assert stats["clip/steps"] == 16 and stats["clip/clipped_steps"] == 16


def test_hf_trainer_with_clipped_optimizer(tmp_path):
    pytest.importorskip("transformers")
    example = _load("hf_trainer_example")
    trainer = example.main(max_steps=6, output_dir=str(tmp_path), max_norm=0.05)
    opt = trainer.optimizer.optimizer  # AcceleratedOptimizer -> ClippedOptimizer
    assert isinstance(opt, ClippedOptimizer)
    state = opt.state["clip"]
    assert int(state["steps"]) == trainer.state.global_step == 6
    # max_grad_norm=0: the Trainer did not clip first, so the wrapper saw norms above 0.05 and clipped.
    assert int(state["clipped_steps"]) == 6 and float(state["grad_norm"]) > 0.05
    logs = [entry for entry in trainer.state.log_history if "clip/grad_norm" in entry]
    assert logs and logs[0]["clip/threshold"] == pytest.approx(0.05)
    # The Trainer stepped our scheduler: LambdaLR warm-up reached the full LR.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_amp_example_clips_unscaled_gradients():
    amp = _load("amp")
    plain = amp.bf16_autocast(steps=5).stats()
    scaled = amp.grad_scaler(steps=5).stats()
    # GradScaler multiplies by a power of two: the unscaled norms are bit-identical.
    assert scaled["clip/grad_norm"] == plain["clip/grad_norm"]
    assert scaled["clip/steps"] == 5 and scaled["clip/skipped_steps"] == 0
