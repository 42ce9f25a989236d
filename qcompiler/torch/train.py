"""The training loop of QAT and fine-tuning: one process, or several under ``torchrun`` with DistributedDataParallel.

The data is a tensor of samples (token windows, images) along axis 0. The order is fixed by the seed: each epoch is
a permutation of the samples, and step ``s`` takes the global batch ``s * batch_size ... (s + 1) * batch_size`` of
that order. Under ``torchrun`` each of the ``W`` processes takes every ``W``-th sample of the global batch and
DistributedDataParallel averages the gradients, so a run on ``W`` processes computes the same gradient as one
process with the same global batch (up to the order of float sums); ``batch_size`` must be a multiple of ``W``.
Backend: NCCL when the processes use CUDA, Gloo otherwise (:func:`init_distributed`).

Optimizer AdamW, learning rate with a linear warmup and a cosine decay to a tenth, gradients clipped by norm.
Checkpoints (``checkpoint``: one file, written by process 0 atomically every ``checkpoint_every`` steps and at the
end) hold the model, optimizer, scheduler, step and losses: a killed run started again with the same file resumes
at the step it had saved, with the same data order, and ends where an uninterrupted run ends. A progress bar on
process 0 shows the loss, tokens (or samples) per second and the time left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from qcompiler.errors import ConfigError

__all__ = ["TrainConfig", "TrainResult", "init_distributed", "train"]

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TrainConfig:
    """Options of :func:`train` (``batch_size`` is global: the sum over processes)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 50
    progress: bool = True
    #: what else a resumed run must share with the run that wrote the checkpoint (model, data, recipe), as a digest
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"training: {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"training: lr must be a positive number, got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"training: warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")

    def resumable_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        fields = {k: getattr(self, k) for k in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "seed")}
        if self.fingerprint:
            fields["fingerprint"] = self.fingerprint
        return fields


@dataclasses.dataclass
class TrainResult:
    """The loss of every step (global mean), the step the run started at (after a resume), seconds and tokens."""

    losses: list[float]
    start_step: int
    seconds: float
    items: int


def init_distributed() -> tuple[int, int]:
    """Join the ``torchrun`` process group when the environment names one (``WORLD_SIZE`` > 1); return
    ``(rank, world_size)``, ``(0, 1)`` for a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("QCOMPILER_DIST_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Leave the process group together (a barrier, then its teardown), so that no process exits while another is
    still in a collective (Gloo aborts the process then). Nothing for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int = 0) -> NoReturn:
    """End a ``torchrun`` worker whose work is done and written: flush, then leave without the interpreter's
    teardown. torch 2.13's CPU build aborts in a few percent of the exits of processes that trained with
    DistributedDataParallel ("terminate called without an active exception", a C++ thread destroyed unjoined at
    teardown; also with a plain ``nn.Linear`` model), which would turn a finished run into a failed one."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(config.steps - config.warmup_steps, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _global_batch(step: int, samples: int, batch: int, seed: int) -> torch.Tensor:
    """The sample indices of step ``step``'s global batch (epochs are seeded permutations, wrapped as needed)."""
    start = step * batch
    picked: list[torch.Tensor] = []
    while sum(p.numel() for p in picked) < batch:
        epoch, offset = divmod(start, samples)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = order[offset:offset + batch - sum(p.numel() for p in picked)]
        picked.append(take)
        start += take.numel()
    return torch.cat(picked)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many kinds
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") \
            from None
    if not isinstance(state, dict) or state.get("config") != config.resumable_fields():
        raise ConfigError(f"checkpoint {path} was written by a run with other settings; delete it or use another "
                          "--checkpoint")
    return state


def train(model: nn.Module, data: torch.Tensor, loss_fn: LossFn, config: TrainConfig, *,
          device: torch.device | str = "cpu", items_per_sample: int = 1) -> TrainResult:
    """Train ``model`` (in place) on ``data`` with ``loss_fn(model, batch) -> mean loss`` (see the module docstring).

    ``items_per_sample``: what one sample counts for in the progress bar's rate (tokens per window, 1 per image).
    Under ``torchrun`` call :func:`init_distributed` first; the model is wrapped in DistributedDataParallel here.
    """
    rank, world = _world()
    if config.batch_size % world:
        raise ConfigError(f"training: batch_size {config.batch_size} is not a multiple of the {world} processes")
    if data.shape[0] < 1:
        raise ConfigError("training: no samples")
    device = torch.device(device)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    losses: list[float] = []
    start = 0
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    if checkpoint is not None and (state := _load_checkpoint(checkpoint, config)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = int(state["step"]), list(state["losses"])
    runner: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bar = _progress_bar(config, start, rank)
    began = time.perf_counter()
    for step in range(start, config.steps):
        indices = _global_batch(step, data.shape[0], config.batch_size, config.seed)[rank::world]
        batch = data[indices].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(runner, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {float(loss)}")
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(_global_mean(loss.detach(), world))
        if bar is not None:
            elapsed = time.perf_counter() - began
            rate = (step + 1 - start) * config.batch_size * items_per_sample / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", rate=f"{rate:,.0f}/s", refresh=False)
            bar.update(1)
        if checkpoint is not None and rank == 0 and ((step + 1) % config.checkpoint_every == 0 or
                                                     step + 1 == config.steps):
            _save_checkpoint(checkpoint, {"step": step + 1, "model": model.state_dict(),
                                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "losses": losses, "config": config.resumable_fields()})
    if bar is not None:
        bar.close()
    done = config.steps - start
    return TrainResult(losses, start, time.perf_counter() - began, done * config.batch_size * items_per_sample)


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def _progress_bar(config: TrainConfig, start: int, rank: int) -> Any:
    if not config.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, desc="training", unit="step", dynamic_ncols=True)
