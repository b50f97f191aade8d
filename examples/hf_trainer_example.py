"""Hugging Face ``Trainer``: pass ``optimizers=(ClippedOptimizer(...), scheduler)``, ``max_grad_norm=0``.

    pip install "clipped_optim[transformers]"
    python examples/hf_trainer_example.py

A 2-layer GPT-2 built from a config (random weights, nothing downloaded) trains on random
tokens. ``max_grad_norm=0`` turns the Trainer's own ``clip_grad_norm_`` off, so the clip
happens once, inside ``ClippedOptimizer.step()``. The clip statistics join the Trainer's logs
(``trainer.state.log_history`` and every ``report_to`` integration) through
``clipped_optim.integrations.hf.ClipStatsCallback``: one host sync per logging step, none on
the other steps.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

try:
    from clipped_optim import ClippedOptimizer
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from clipped_optim import ClippedOptimizer
from clipped_optim.integrations.hf import add_to


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 32, vocab: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(
    max_steps: int = 12,
    output_dir: str = "out/hf_trainer",
    max_norm: float = 1.0,
    logging_steps: int = 4,
    save_steps: int | None = None,
) -> Trainer:
    """Train; with ``save_steps`` the Trainer writes ``checkpoint-<step>`` directories whose
    ``optimizer.pt`` ``python -m clipped_optim report`` reads."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), max_norm=max_norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        max_grad_norm=0,  # the Trainer's clip off: ClippedOptimizer clips
        logging_steps=logging_steps,
        report_to=[],
        save_strategy="no" if save_steps is None else "steps",
        save_steps=save_steps or 500,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, scheduler))
    # ClipStatsCallback first among the callbacks, so the report_to integrations (TensorBoard,
    # W&B, ...) that the Trainer places before user callbacks see clip/grad_norm and the rest too.
    add_to(trainer)
    trainer.train()
    print(opt.report())
    return trainer


if __name__ == "__main__":
    main()
