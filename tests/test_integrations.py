"""Real runs with Lightning, Accelerate and the Hugging Face Trainer (skipped when not installed),
and the AMP example."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections import Counter

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


def _count_stats_calls(monkeypatch) -> list[int]:
    """Count ``ClippedOptimizer.stats`` calls: the callbacks' one host read per log."""
    calls: list[int] = []
    original = ClippedOptimizer.stats

    def counted(self, *args, **kwargs):
        calls.append(int(self.state["clip"]["steps"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClippedOptimizer, "stats", counted)
    return calls


def test_lightning_fit_with_a_clipped_optimizer(tmp_path, monkeypatch):
    _lightning()
    import csv

    from clipped_optim.integrations.lightning import ClipStatsCallback

    calls = _count_stats_calls(monkeypatch)
    example = _load("lightning_example")
    trainer, _model = example.main(max_epochs=2, root=str(tmp_path), log_every_n_steps=5)
    opt = trainer.optimizers[0]
    assert isinstance(opt, ClippedOptimizer)
    assert trainer.gradient_clip_val is None  # Lightning's own clipping is off
    state = opt.state["clip"]
    assert int(state["steps"]) == trainer.global_step == 16
    # The targets are large: every step's norm is far above max_norm=1, and every step clipped.
    assert int(state["clipped_steps"]) == 16 and float(state["grad_norm"]) > 1.0
    logged = trainer.logged_metrics
    assert "clip/grad_norm" in logged and "clip/clipped_steps" in logged and "clip/clip_rate" in logged
    assert any(k.startswith("clip/grad_norm/net.") for k in logged)  # per-layer, by parameter name
    # Through Lightning's own logger: the CSV file has the statistics on its logging steps only.
    (callback,) = [c for c in trainer.callbacks if isinstance(c, ClipStatsCallback)]
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("clip/grad_norm")]
    assert [float(r["clip/steps"]) for r in rows] == [5.0, 10.0, 15.0]  # log_every_n_steps=5 of 16 steps
    assert all(float(r["clip/grad_norm"]) > 1.0 and float(r["clip/threshold"]) == 1.0 for r in rows)
    # One stats() read per log line, none on the 13 other steps (report() at the end reads no stats()).
    assert calls == callback.logged_steps == [5, 10, 15]
    # The LR scheduler Lightning drives stepped the wrapper (StepLR, step_size=10 epochs -> still 1e-2).
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_lightning_callback_with_gradient_accumulation(tmp_path, monkeypatch):
    """Accumulating batches make no optimizer step and no log: the callback reads nothing there."""
    pl = _lightning()
    from clipped_optim.integrations.lightning import ClipStatsCallback

    calls = _count_stats_calls(monkeypatch)
    example = _load("lightning_example")
    callback = ClipStatsCallback(prefix="clipping/")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        logger=pl.loggers.CSVLogger(str(tmp_path)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(example.Regressor(), example.data())  # 8 batches: 4 optimizer steps
    assert trainer.global_step == 4
    assert calls == callback.logged_steps == [2, 4]
    assert trainer.logged_metrics["clipping/steps"] == 4.0 and "clip/steps" not in trainer.logged_metrics


def test_lightning_step_clips_the_gradients(tmp_path):
    pl = _lightning()
    example = _load("lightning_example")
    seen = []

    class Check(pl.Callback):
        def on_before_zero_grad(self, trainer, module, optimizer):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            seen.append(float(torch.nn.utils.get_total_norm(grads)))

    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Check()],
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
    stats = _load("accelerate_example").main(cpu=True)
    assert stats["clip/steps"] == 16 and stats["clip/clipped_steps"] == 16


def _kill_tree(proc) -> None:
    """Kill ``proc`` and every process it started, wherever their sessions are."""
    import signal

    import psutil  # accelerate's own dependency

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_accelerate_example_on_two_processes():
    """The example's multi-process command as its docstring gives it: ``torchrun
    --nproc_per_node 2`` on CPU (gloo). Accelerate shards the batches (8 steps per rank instead
    of 16) and every rank records the same norm of the all-reduced gradients."""
    pytest.importorskip("accelerate")
    import re
    import subprocess
    import tempfile

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: the default 29500 may be another test's
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "examples", "accelerate_example.py"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    attempts = 3
    for attempt in range(attempts):
        # Alone it takes 10-30 s. Seen in full-suite runs: a rank that has printed its results
        # never exits (a hang at gloo teardown, at interpreter exit). The run is killed after
        # 120 s, torchrun's workers with it (each is in a session of its own, so killing
        # torchrun's process group leaves them: such an orphan made the next run hang too),
        # and repeated, as for a worker killed by a signal.
        # The output goes to a file, not a pipe: a worker that outlived a kill would hold a
        # pipe open and block the read, and with it the rerun.
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
            )
            try:
                proc.wait(timeout=120)
                killed = ""
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                killed = "\n[killed after 120 s]"
            log.seek(0)
            out = log.read() + killed
        last = attempt == attempts - 1
        if killed and not last:
            continue
        # A gloo worker occasionally dies by a signal (SIGABRT at teardown) with plain torch too;
        # rerun for that and nothing else.
        if proc.returncode != 0 and not last and re.search(r"Signal \d+|SIGABRT|SIGSEGV", out):
            continue
        break
    assert proc.returncode == 0, out[-3000:]
    match = re.search(r"processes: (\d+); last grad_norm on each rank: \[([^\]]*)\]", out)
    assert match, out[-3000:]
    assert int(match.group(1)) == 2
    norms = [float(v) for v in match.group(2).split(",")]
    assert len(norms) == 2 and norms[0] == norms[1] > 1.0
    assert "'clip/steps': 8.0" in out and "'clip/clipped_steps': 8.0" in out


def test_hf_trainer_with_clipped_optimizer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from clipped_optim.integrations.hf import ClipStatsCallback

    calls = _count_stats_calls(monkeypatch)
    example = _load("hf_trainer_example")
    trainer = example.main(max_steps=6, output_dir=str(tmp_path), max_norm=0.05, logging_steps=4)
    opt = trainer.optimizer.optimizer  # AcceleratedOptimizer -> ClippedOptimizer
    assert isinstance(opt, ClippedOptimizer)
    state = opt.state["clip"]
    assert int(state["steps"]) == trainer.state.global_step == 6
    # max_grad_norm=0: the Trainer did not clip first, so the wrapper saw norms above 0.05 and clipped.
    assert int(state["clipped_steps"]) == 6 and float(state["grad_norm"]) > 0.05
    # The statistics are on the Trainer's own log lines: its training log at step 4 (next to its
    # loss and grad_norm) and its end-of-training summary at step 6, with the values of that step.
    logs = [entry for entry in trainer.state.log_history if "clip/grad_norm" in entry]
    assert [entry["step"] for entry in logs] == [4, 6]
    assert "loss" in logs[0] and logs[0]["clip/steps"] == 4.0 and logs[0]["clip/threshold"] == pytest.approx(0.05)
    assert logs[0]["clip/clipped_steps"] == 4.0 and logs[1]["clip/steps"] == 6.0
    # The Trainer measures the norm itself for its grad_norm entry: the same pre-clip norm.
    assert logs[0]["grad_norm"] == pytest.approx(logs[0]["clip/grad_norm"], rel=1e-5)
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, ClipStatsCallback)]
    assert trainer.callback_handler.callbacks[0] is callback  # add_to: ahead of report_to's callbacks
    assert calls == [4, 6] and callback.logged_steps == [4, 6]  # one read per log line, none per step
    # The Trainer stepped our scheduler: LambdaLR warm-up reached the full LR.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_hf_callback_reaches_later_callbacks(tmp_path):
    """Passed in ``callbacks=``: the statistics reach log_history and the callbacks after it."""
    transformers = pytest.importorskip("transformers")
    from clipped_optim.integrations.hf import ClipStatsCallback

    example = _load("hf_trainer_example")
    seen = []

    class Recorder(transformers.TrainerCallback):  # stands in for a report_to integration after ours
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    )
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), max_norm=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        max_grad_norm=0,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=example.RandomTokens(),
        optimizers=(opt, None),
        callbacks=[ClipStatsCallback(per_parameter=True), Recorder()],
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    assert all(entry["clip/steps"] == entry["step"] for entry in train_logs)
    assert any(k.startswith("clip/grad_norm/transformer.") for k in train_logs[0])
    assert [entry["clip/steps"] for entry in seen if "loss" in entry] == [2.0, 4.0]


def test_amp_example_clips_unscaled_gradients():
    amp = _load("amp")
    plain = amp.bf16_autocast(steps=5).stats()
    scaled = amp.grad_scaler(steps=5).stats()
    # GradScaler multiplies by a power of two: the unscaled norms are bit-identical.
    assert scaled["clip/grad_norm"] == plain["clip/grad_norm"]
    assert scaled["clip/steps"] == 5 and scaled["clip/skipped_steps"] == 0


def test_amp_example_without_cuda_ends_with_a_message():
    """``examples/amp.py --cuda`` on a machine without CUDA: a usage error, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --cuda runs")
    import subprocess

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "amp.py"), "--cuda"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--cuda needs a CUDA GPU" in proc.stderr and "Run without --cuda" in proc.stderr


# -- the command line on the checkpoints these frameworks write ---------------------------------
def _cli(capsys, *args: str) -> tuple[int, str]:
    from clipped_optim import cli

    code = cli.main(["report", *args])
    return code, capsys.readouterr().out


def test_cli_reports_a_lightning_checkpoint(tmp_path, capsys):
    _lightning()
    example = _load("lightning_example")
    trainer, model = example.main(max_epochs=1, root=str(tmp_path), log_every_n_steps=5)
    opt = trainer.optimizers[0]
    # the callback named the parameters when training started
    assert opt.state["clip"]["param_names"] == [name for name, _ in model.named_parameters()]
    path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(path)
    capsys.readouterr()
    code, out = _cli(capsys, path)
    assert code == 0
    assert "clip state at ['optimizer_states'][0]['state']['clip']" in out
    assert "parameter names: stored in the checkpoint" in out
    assert str(opt.report()) in out


def test_cli_reports_a_hf_trainer_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers")
    example = _load("hf_trainer_example")
    trainer = example.main(max_steps=4, output_dir=str(tmp_path), max_norm=0.05, logging_steps=4, save_steps=4)
    opt = trainer.optimizer.optimizer
    names = [name for name, _ in trainer.model.named_parameters()]
    assert opt.state["clip"]["param_names"] == names
    checkpoint = tmp_path / "checkpoint-4"
    capsys.readouterr()
    code, out = _cli(capsys, str(checkpoint))  # the directory: its optimizer.pt is read
    assert code == 0 and "parameter names: stored in the checkpoint" in out
    assert str(opt.report()) in out
    # Without stored names, the model file beside optimizer.pt is matched by shape: only the
    # parameters whose shape no other tensor has are named.
    sd = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    del sd["state"]["clip"]["param_names"]
    torch.save(sd, checkpoint / "optimizer.pt")
    from clipped_optim import cli

    loaded = cli.load_checkpoint(str(checkpoint / "optimizer.pt"))
    assert "matched by shape to the model state dict in model.safetensors" in loaded.naming
    shapes = [tuple(p.shape) for p in trainer.model.parameters()]
    in_file = Counter(cli._safetensors_shapes(str(checkpoint / "model.safetensors")).values())
    for name, got, shape in zip(names, loaded.names, shapes):
        unique = in_file[shape] == 1 and shapes.count(shape) == 1
        assert got == (name if unique else None), (name, got, shape)
    # Two identical blocks and tied embeddings: every shape of this GPT-2 repeats, so no parameter
    # is named (an ambiguous match is no match), and the report gives index and shape.
    assert loaded.names == [None] * len(names)
    assert "parameter names: matched by shape" in _cli(capsys, str(checkpoint))[1]
