"""Batches of one-sample feeds: consecutive samples of the same shapes stacked, others run alone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["regroup"]


def regroup(samples: Iterator[dict[str, np.ndarray]], batch_size: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """One-sample feeds as batches of up to ``batch_size`` consecutive samples of the same shapes (at most
    ``limit`` samples in all)."""
    pending: list[dict[str, np.ndarray]] = []
    taken = 0
    for sample in samples:
        if taken >= limit:
            break
        taken += 1
        if pending and (len(pending) == batch_size or any(pending[0][k].shape != v.shape for k, v in sample.items())):
            yield _stack(pending)
            pending = []
        pending.append(sample)
    if pending:
        yield _stack(pending)


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(samples) == 1:
        return samples[0]
    return {name: np.concatenate([s[name] for s in samples], axis=0) for name in samples[0]}
