"""AWQ's two searches on sampled input rows: the per-channel scale exponent, and each block's grid.

Scales: ``s = mean|x|^alpha`` normalised by ``sqrt(max(s) min(s))`` (:func:`awq_scales`); the pass tries every
``alpha`` of :data:`ALPHAS` and keeps the one whose scaled weights, rounded to nearest, give the group the least
output error on the sampled rows.

Grids (:func:`best_codes`): for every block (of ``block_size`` input rows, one output column) the candidates are
the round-to-nearest grid with the block's range shrunk to each ratio of :data:`CLIP_RATIOS` (AWQ's clipping;
1.0 is plain round to nearest) and, given an importance ``I[K]`` (``E[x_k^2]``), the importance-weighted grid of
:meth:`~qcompiler.formats.GridFormat.weighted_grid` (a weighted least-squares fit over shrunk ranges). Each block
keeps the candidate with the least ``||x_b (W_b - Q(W_b))||^2`` on the sampled rows ``x`` (``b``: the block's
rows; cross-block terms ignored, as in AWQ), so a block takes the weighted grid only where the rows say it pays.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from qcompiler.formats import GridFormat, WeightSpec
from qcompiler.runtime import packing

__all__ = ["ALPHAS", "CLIP_RATIOS", "SCALE_LIMIT", "awq_scales", "best_codes", "clipped_codes", "grid_clipped"]

logger = logging.getLogger(__name__)

ALPHAS = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 21))

#: AWQ's scales are clamped to ``[1 / SCALE_LIMIT, SCALE_LIMIT]``: a ratio of ``1e8`` between two input channels
#: weights is far beyond what real activations call for (massive LLM activations are ~1e4 times typical ones), and
#: a larger one only pushes ``x / s`` toward the float32 limit
SCALE_LIMIT = 1e4

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(10))  # 1.0 down to 0.55


def awq_scales(mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = mean^alpha`` normalised by ``sqrt(max(s) min(s))`` and clamped to ``[1e-4, 1e4]`` (float64)."""
    s = np.asarray(mean, dtype=np.float64) ** alpha
    s = s / math.sqrt(float(s.max() * s.min()))
    return np.clip(s, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def grid_clipped(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The block grids of ``W`` with every block's range shrunk to ``ratio`` of its extremes."""
    if ratio == 1.0:
        return fmt.grid(weight, spec)
    block_size = spec.block_for(weight.shape[0])
    clipped = np.array(weight, dtype=np.float32, copy=True)
    for start in range(0, weight.shape[0], block_size):
        part = weight[start:start + block_size]
        clipped[start:start + block_size] = np.clip(part, part.min(axis=0) * ratio, part.max(axis=0) * ratio)
    return fmt.grid(clipped, spec)


def best_codes(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, x: np.ndarray,
               importance: np.ndarray | None = None,
               ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[Any, float, float]:
    """Codes for ``W[K, N]`` whose every block takes the candidate grid (see the module docstring) with the least
    share of the output error on the rows ``x[R, K]``. Returns the codes (the format's quantized weight), the
    layer's output error on ``x`` and the share of blocks that took the importance-weighted grid (0 without
    ``importance``)."""
    k, n = weight.shape
    block_size = spec.block_for(k)
    blocks = packing.block_count(k, block_size)
    x64 = x.astype(np.float64)
    w64 = weight.astype(np.float64)
    best = np.full((n, blocks), np.inf)
    scale = np.zeros((n, blocks), np.float32)
    zero = np.zeros((n, blocks), np.float32 if spec.float_zero_point else np.uint8)
    weighted = np.zeros((n, blocks), bool)
    candidates: list[tuple[bool, Any]] = [(False, ratio) for ratio in ratios]
    if importance is not None:
        candidates.append((True, None))
    for is_weighted, ratio in candidates:
        s_c, z_c = fmt.weighted_grid(weight, spec, importance) if is_weighted else \
            grid_clipped(fmt, spec, weight, ratio)
        diff = w64 - fmt.from_codes(fmt.codes_on_grid(weight, s_c, z_c, spec), s_c, z_c, spec, k).dequantize()
        for b in range(blocks):
            rows = slice(b * block_size, min((b + 1) * block_size, k))
            part = x64[:, rows] @ diff[rows]
            error = np.einsum("rn,rn->n", part, part)
            better = error < best[:, b]
            best[better, b] = error[better]
            scale[better, b], zero[better, b] = s_c[better, b], z_c[better, b]
            weighted[better, b] = is_weighted
    chosen = fmt.from_codes(fmt.codes_on_grid(weight, scale, zero, spec), scale, zero, spec, k)
    part = x64 @ (w64 - chosen.dequantize())
    return chosen, float(np.vdot(part, part)), float(weighted.mean())


def clipped_codes(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, x: np.ndarray) -> tuple[Any, float]:
    """AWQ's clipping search alone (:func:`best_codes` without an importance): the codes and the output error."""
    codes, error, _ = best_codes(fmt, spec, weight, x)
    return codes, error
