"""The GPTQ rounding algorithm (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), on numpy, for any fixed quantization grid.

For one layer with weight rows ``W[M, K]`` (one row per output channel) and inputs ``x[K]`` whose second moment is
``H = E[x x^T]``, GPTQ picks integer weights that minimize the layer's output error ``sum_m (w_m - q_m)^T H
(w_m - q_m)`` greedily, one input column at a time (Optimal Brain Quantization): after column ``k`` is rounded, the
rounding error is spread over the columns not yet rounded through the inverse Hessian::

    e_k   = (w_k - quant(w_k)) / U[k, k]            U = chol(H^-1)^T (upper), the column order optionally by diag(H)
    W[:, k+1:] -= e_k  U[k, k+1:]

``H`` is damped by ``damp * mean(diag H)`` on its diagonal (and dead inputs, ``H[k, k] = 0``, get 1) so the
Cholesky factorisation exists; unlike the reference implementation, the weights of dead inputs are rounded, not
zeroed. The grid is fixed beforehand (the caller's scales and zero points), so the result is
exactly what the lowering will emit. ``H`` may be shared by all rows (``[K, K]``) or given per row (``[M, K, K]``,
a depthwise convolution, where each output channel sees its own input channel). Work is float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gptq_round"]


def _prepare(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """The damped Hessian(s) and a mask of dead inputs (zero diagonal)."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diagonal(h, axis1=-2, axis2=-1)
    dead = diag <= 0
    k = h.shape[-1]
    idx = np.arange(k)
    h[..., idx, idx] = np.where(dead, 1.0, diag)
    mean = np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1, keepdims=True)
    h[..., idx, idx] += damp * mean
    return h, dead


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """``U`` with ``U^T U = H^-1`` (upper triangular), batched over leading axes."""
    inverse = np.linalg.inv(h)
    inverse = 0.5 * (inverse + np.swapaxes(inverse, -1, -2))
    lower = np.linalg.cholesky(inverse)
    return np.swapaxes(lower, -1, -2)


def gptq_round(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
               zero_point: np.ndarray | None = None, *, damp: float = 0.01, act_order: bool = True,
               block: int = 128) -> np.ndarray:
    """Integer weights for ``weight[M, K]`` on the grid ``scale * (q - zero_point)``, ``q in [qmin, qmax]``.

    Args:
        weight: float rows (output channels) by columns (inputs).
        hessian: ``[K, K]`` shared by all rows, or ``[M, K, K]`` per row.
        scale: positive scales, per row ``[M]`` or per weight ``[M, K]`` (blockwise grids: each column keeps the
            grid of its block, also under ``act_order``, i.e. static groups).
        qmin, qmax: the integer range.
        zero_point: zero points shaped like ``scale`` (None: 0, symmetric).
        damp: diagonal damping as a fraction of the mean diagonal.
        act_order: round columns in order of decreasing ``diag(H)`` (the inputs with the most energy first).
        block: columns per lazy-batch block (the same result as column by column, in far less memory traffic).

    Returns:
        ``q`` as int64 ``[M, K]``.
    """
    w = np.array(weight, dtype=np.float64, copy=True)
    m, k = w.shape
    per_row = hessian.ndim == 3
    h, _ = _prepare(hessian, damp)  # dead inputs keep their weights (GPTQ's reference zeroes them): an input
    # never seen on a small calibration set may well be alive on other data
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(m, -1), (m, k))
    z = np.zeros((m, k)) if zero_point is None else \
        np.broadcast_to(np.asarray(zero_point, dtype=np.float64).reshape(m, -1), (m, k))
    if act_order and not per_row:
        order = np.argsort(-np.diagonal(h), kind="stable")
    else:
        order = np.arange(k)
    w, s, z = w[:, order], s[:, order], z[:, order]
    h = h[..., order[:, None], order[None, :]]
    u = _upper_inverse_cholesky(h)
    q = np.empty((m, k), dtype=np.int64)
    for start in range(0, k, block):  # lazy batch updates: rank-1 updates inside a block, one matmul after it
        end = min(start + block, k)
        errors = np.empty((m, end - start))
        for j in range(start, end):
            column, sj, zj = w[:, j], s[:, j], z[:, j]
            qj = np.clip(np.rint(column / sj) + zj, qmin, qmax)
            q[:, j] = qj.astype(np.int64)
            if per_row:
                err = (column - (qj - zj) * sj) / u[:, j, j]
                w[:, j + 1:end] -= err[:, None] * u[:, j, j + 1:end]
            else:
                err = (column - (qj - zj) * sj) / u[j, j]
                w[:, j + 1:end] -= np.outer(err, u[j, j + 1:end])
            errors[:, j - start] = err
        if end < k:
            if per_row:
                w[:, end:] -= np.einsum("mb,mbk->mk", errors, u[:, start:end, end:])
            else:
                w[:, end:] -= errors @ u[start:end, end:]
    out = np.empty_like(q)
    out[:, order] = q
    return out
