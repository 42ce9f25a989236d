"""A tiny QAT (or QLoRA) regression run, shared by tests/test_qat_train.py: in-process, and under torchrun (2
processes).

Usage under torchrun: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _qat_train_job.py OUT
[qat|qlora]``; process 0 saves the trained state dict to OUT.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from qcompiler.torch import prepare_qat, prepare_qlora
from qcompiler.torch.train import TrainConfig, TrainResult, exit_now, finish_distributed, init_distributed, train

FEATURES, TARGETS = 16, 4


def build(mode: str = "qat") -> tuple[nn.Module, torch.Tensor]:
    """The model (``qat``: int4 QAT with learned scales; ``qlora``: an NF4 base with rank-2 adapters) and 64 samples
    of features + targets, all from fixed seeds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, TARGETS))
    if mode == "qlora":
        prepare_qlora(model, "nf4", rank=2, alpha=4, block_size=16)
        with torch.no_grad():  # start away from B = 0 so both adapter matrices learn from the first step
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    else:
        prepare_qat(model, "int4", block_size=16, learn_scale=True)
    data = torch.randn(64, FEATURES + TARGETS, generator=torch.Generator().manual_seed(1))
    return model, data


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch[:, :FEATURES]) - batch[:, FEATURES:]).square().mean()


def run(steps: int = 6, checkpoint: str | None = None, loss: object = loss_fn,
        mode: str = "qat") -> tuple[nn.Module, TrainResult]:
    model, data = build(mode)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, progress=False, checkpoint=checkpoint,
                         checkpoint_every=3)
    return model, train(model, data, loss, config)  # type: ignore[arg-type]


if __name__ == "__main__":
    rank, world = init_distributed()
    model, result = run(mode=sys.argv[2] if len(sys.argv) > 2 else "qat")
    finish_distributed()
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": result.losses, "world": world}, sys.argv[1])
    exit_now()  # torch 2.13's CPU build aborts in a few % of DDP process exits (see exit_now)
