"""A tiny QAT regression run, shared by tests/test_qat_train.py: in-process, and under torchrun (2 processes).

Usage under torchrun: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _qat_train_job.py OUT``;
process 0 saves the trained state dict to OUT.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from qcompiler.torch import prepare_qat
from qcompiler.torch.train import TrainConfig, TrainResult, init_distributed, train

FEATURES, TARGETS = 16, 4


def build() -> tuple[nn.Module, torch.Tensor]:
    """The model (int4 QAT with learned scales) and 64 samples of features + targets, all from fixed seeds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, TARGETS))
    prepare_qat(model, "int4", block_size=16, learn_scale=True)
    data = torch.randn(64, FEATURES + TARGETS, generator=torch.Generator().manual_seed(1))
    return model, data


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch[:, :FEATURES]) - batch[:, FEATURES:]).square().mean()


def run(steps: int = 6, checkpoint: str | None = None, loss: object = loss_fn) -> tuple[nn.Module, TrainResult]:
    model, data = build()
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, progress=False, checkpoint=checkpoint,
                         checkpoint_every=3)
    return model, train(model, data, loss, config)  # type: ignore[arg-type]


if __name__ == "__main__":
    rank, world = init_distributed()
    model, result = run()
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": result.losses, "world": world}, sys.argv[1])
