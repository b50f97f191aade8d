"""``python -m clipped_optim report``: checkpoints of several layouts, names, errors, the plot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from clipped_optim import ClippedOptimizer, cli
from clipped_optim.distributed import get_optimizer_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyGPT(nn.Module):
    """nanoGPT's layout in miniature: a token embedding, one block, a head (shapes all distinct)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(11, 8)
        self.block = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, idx):
        return self.head(self.ln(torch.tanh(self.block(self.tok_emb(idx)))))


def _train(named: bool, steps: int = 40):
    """Train with the token 10 (never seen otherwise) in the batches of steps 7, 17, 27, 37,
    scaled up so that those steps are outliers carried by the embedding row of token 10."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), top_k=3)
    if named:
        opt.name_parameters(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, 10, (4, 6), generator=g)
        if step % 10 == 7:
            idx[:, :] = 10
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        if step % 10 == 7:
            model.tok_emb.weight.grad.mul_(500)
        opt.step()
        opt.zero_grad()
    return model, opt


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "clipped_optim", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("named", [True, False], ids=["stored names", "matched by shape"])
def test_a_nanogpt_checkpoint_names_the_spiked_layer(tmp_path, capsys, named):
    model, opt = _train(named)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 40}, path)
    if named:  # once as the installed command runs it
        done = _run("report", str(path))
        assert done.returncode == 0, done.stderr
        out = done.stdout
    else:
        assert cli.main(["report", str(path)]) == 0
        out = capsys.readouterr().out
    assert "clip state at ['optimizer']['state']['clip']" in out
    # by shape: the LayerNorm's weight and bias and the block's bias are all (6,): not named
    naming = "stored in the checkpoint" if named else "matched by shape to the model state dict in ['model'] (3 of 6"
    assert naming in out
    assert "steps 7, 17, 27, 37: " in out and "of the squared norm in tok_emb.weight" in out
    if named:
        assert str(opt.report()) in out


def test_without_names_or_model_parameters_are_given_by_index_and_shape(tmp_path, capsys):
    _, opt = _train(named=False)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    assert cli.main(["report", str(path), "--window", "20"]) == 0
    out = capsys.readouterr().out
    assert "no model state dict found" in out and "last 20 of 40 steps" in out
    assert "steps 27, 37: " in out and "of the squared norm in param #0 (11x8)" in out


def test_an_ambiguous_shape_is_not_named():
    names = cli.match_names_by_shape([(4, 4), (4,), (4, 4), (2,)], {"a.w": (4, 4), "a.b": (4,), "c.w": (4, 4)})
    assert names == [None, "a.b", None, None]


def test_the_distributed_helper_s_checkpoint_is_read(tmp_path, capsys):
    model, opt = _train(named=True, steps=20)
    path = tmp_path / "dcp.pt"
    torch.save(get_optimizer_state_dict(model, opt), path)  # the statistics as bytes under "clip"
    assert cli.main(["report", str(path)]) == 0
    assert "steps 7, 17: " in capsys.readouterr().out


def test_a_file_without_clip_state_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(
        {"model": TinyGPT().state_dict(), "optimizer": torch.optim.SGD(TinyGPT().parameters()).state_dict()}, path
    )
    done = _run("report", str(path))  # as a user sees it: no traceback
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"clipped-optim: {path}: no clip statistics found "
        + ("(no ClippedOptimizer state dict, with its state['clip'], in this file)")
    ]
    pickled = tmp_path / "pickled.pt"
    torch.save({"optimizer": ClippedOptimizer(torch.optim.SGD(TinyGPT().parameters()))}, pickled)
    for target, says in (
        (tmp_path / "missing.pt", "no such file"),
        (tmp_path, "a directory without optimizer.pt"),
        (pickled, "cannot be read with torch.load(weights_only=True)"),
    ):
        assert cli.main(["report", str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and says in captured.err


def test_the_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, opt = _train(named=True, steps=20)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert cli.main(["report", str(tmp_path / "opt.pt"), "--plot", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 0 and "plot written to" in capsys.readouterr().out


def test_a_bad_window_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "x.pt", "--window", "0"])
    assert exit_.value.code == 2 and "positive number of steps" in capsys.readouterr().err
