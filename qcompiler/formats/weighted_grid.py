"""Importance-weighted grids for blockwise integer formats (llama.cpp's "imatrix" idea).

Round to nearest on the min/max grid of a block spends its few levels on the block's extreme values, whatever they
cost. A layer's output error is ``sum_k E[x_k^2] (w_k - w_q,k)^2`` summed over its outputs (for uncorrelated
inputs): an input channel that carries large activations costs more per unit of weight error. So for each block
this module picks the scale ``s`` (and the zero point ``z``) minimising the *weighted* error::

    e(s, z) = sum_j I_j (w_j - s (q_j - z))^2,    q_j = clip(rint(w_j / s + z), codes)

with ``I_j`` the importance of the block's input channel ``j`` (``E[x_j^2]``, the diagonal of GPTQ's ``H`` over the
rows; all ones: plain MSE). Not bounded: a decoder's "massive activation" channels carry 10^6
times the median energy and deserve their weight (SmolLM2-135M int4 b128 GPTQ: perplexity 22.40 unbounded, 22.64
with importance capped at 10^6 x the median channel's, 23.49 at 100x). Candidates: the min/max range shrunk by each factor of :data:`SHRINK` (both ends), each
followed by a weighted least-squares refit of ``s`` for the codes it gave (``z`` fixed); the round-to-nearest grid
itself is a candidate, so the chosen grid's weighted error is never above round to nearest's. The scales and zero
points come back in the layout and dtypes of :func:`qcompiler.formats.blockwise.grid`.

Cost: ``len(SHRINK) * 2`` roundings of the weight; about 1 s for a 576 x 1536 layer on one core.
"""

from __future__ import annotations

import numpy as np

from qcompiler.formats import blockwise

__all__ = ["SHRINK", "weighted_error", "weighted_grid"]

#: range factors tried (1.0: the min/max grid)
SHRINK = tuple(np.round(np.linspace(1.0, 0.6, 17), 4))


def bounded_importance(importance: np.ndarray) -> np.ndarray:
    """``importance`` made usable: NaN, infinite and negative entries count 0; all zero (nothing seen) weighs
    every channel alike (plain MSE)."""
    values = np.maximum(np.nan_to_num(np.asarray(importance, np.float64), nan=0.0, posinf=0.0), 0.0)
    return values if np.any(values > 0) else np.ones_like(values)


def _importance_blocks(importance: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """``I[K]`` as ``[1, n_blocks, block_size]`` float64, the padding 0 (a padded value costs nothing)."""
    padded = np.zeros(-(-k // block_size) * block_size)
    padded[:k] = bounded_importance(importance)
    return padded.reshape(1, -1, block_size)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, low: int, high: int) -> np.ndarray:
    return np.clip(np.rint(blocks / scale[..., None] + zero[..., None]), low, high)


def _error(blocks: np.ndarray, weights: np.ndarray, scale: np.ndarray, zero: np.ndarray,
           codes: np.ndarray) -> np.ndarray:
    return np.sum(weights * (blocks - scale[..., None] * (codes - zero[..., None])) ** 2, axis=2)


def weighted_error(weight: np.ndarray, importance: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   bits: int, block_size: int, ternary: bool = False) -> float:
    """``sum I_k (W - W_q)^2`` of round to nearest on the given grid (``W[K, N]``, grids ``[N, n_blocks]``)."""
    blocks = blockwise._blocks(weight, block_size)
    weights = _importance_blocks(importance, weight.shape[0], block_size)
    s, z = scale.astype(np.float64), zero.astype(np.float64)
    codes = _codes(blocks, s, z, *blockwise.code_limits(bits, ternary))
    return float(_error(blocks, weights, s, z, codes).sum())


def weighted_grid(weight: np.ndarray, importance: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  float_zero_point: bool = False, ternary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scales ``[N, n_blocks]`` (float32) and zero points (uint8 codes, or float32) of ``W[K, N]`` minimising the
    importance-weighted error of each block (see the module docstring); ``importance``: ``[K]``, non-negative."""
    base_scale, base_zero = blockwise.grid(weight, bits, block_size, symmetric, float_zero_point, ternary)
    blocks = blockwise._blocks(weight, block_size)
    weights = _importance_blocks(importance, weight.shape[0], block_size)
    low_code, high_code = blockwise.code_limits(bits, ternary)
    best_scale = base_scale.astype(np.float64)
    best_zero = base_zero.astype(np.float64)
    best = _error(blocks, weights, best_scale, best_zero, _codes(blocks, best_scale, best_zero, low_code, high_code))
    candidates = SHRINK[1:] if not ternary else tuple(np.round(np.linspace(0.6, 1.6, 21), 4))
    for factor in candidates:
        scale, zero = _shrunk(weight, factor, bits, block_size, symmetric, float_zero_point, ternary)
        for attempt in range(2):  # the shrunk grid, then its weighted least-squares scale for the same codes
            codes = _codes(blocks, scale, zero, low_code, high_code)
            if attempt:
                steps = codes - zero[..., None]
                denominator = np.sum(weights * steps * steps, axis=2)
                fitted = np.sum(weights * blocks * steps, axis=2) / np.where(denominator > 0, denominator, 1.0)
                scale = np.where((denominator > 0) & (fitted > 0), fitted, scale)
                scale = scale.astype(np.float32).astype(np.float64)  # what will be stored
                codes = _codes(blocks, scale, zero, low_code, high_code)
            error = _error(blocks, weights, scale, zero, codes)
            better = error < best
            best = np.where(better, error, best)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    zero_dtype = np.float32 if float_zero_point else np.uint8
    return best_scale.astype(np.float32), best_zero.astype(zero_dtype)


def _shrunk(weight: np.ndarray, factor: float, bits: int, block_size: int, symmetric: bool, float_zero_point: bool,
            ternary: bool) -> tuple[np.ndarray, np.ndarray]:
    """The round-to-nearest grid of ``W * factor`` with the codes of ``W``: the range shrunk (float64)."""
    scale, zero = blockwise.grid(weight * np.float32(factor), bits, block_size, symmetric, float_zero_point, ternary)
    return scale.astype(np.float32).astype(np.float64), zero.astype(np.float64)
