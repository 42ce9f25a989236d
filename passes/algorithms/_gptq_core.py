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

Numerical range: the result does not change when ``H`` is multiplied by a constant, so ``H`` is divided by the
power of two nearest its mean diagonal (exact) before it is inverted; inputs near the float32 limit (``1e19`` and
up, whose squares overflow float32) then give the same result as ordinary ones. :func:`second_moment` builds
``x^T x`` in float32 only where that cannot overflow (``rows * max|x|^2 < 1e36``), otherwise in float64, and
refuses an activation holding NaN or Inf (:class:`~qcompiler.errors.CalibrationError` naming it). When the
factorisation still fails (a Hessian that is not positive definite in float64), the damping is multiplied by 10, up
to :data:`DAMP_RETRIES` times, and then :class:`CholeskyError` is raised: the callers round that layer to nearest
instead and count it.
"""

from __future__ import annotations

import numpy as np

from qcompiler.errors import CalibrationError

__all__ = ["DAMP_RETRIES", "CholeskyError", "activation_absmax", "asymmetric_target", "fits_float32", "gptq_factor",
           "gptq_round", "second_moment"]

#: how many times the damping is multiplied by 10 before GPTQ gives up on a layer
DAMP_RETRIES = 3
#: ``rows * max|x|^2`` below which ``x^T x`` is computed in float32 (far from its limit of about 3.4e38)
_FLOAT32_SAFE = 1e36


class CholeskyError(ArithmeticError):
    """The damped Hessian has no Cholesky factorisation of its inverse, even with more damping."""


def activation_absmax(x: np.ndarray, tensor: str | None, node: str | None = None) -> float:
    """``max |x|`` of one batch of a layer's input.

    Raises:
        CalibrationError: ``x`` holds NaN or Inf (the calibration data drove the activation out of float32).
    """
    absmax = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(absmax):
        where = f" (read by node {node!r})" if node else ""
        raise CalibrationError(f"calibration data makes activation {tensor or '(unnamed)'!r}{where} NaN or Inf: no "
                               "finite statistics can be built from it (check the calibration data; values near the "
                               "float32 limit overflow inside the model)")
    return absmax


def fits_float32(absmax: float, rows: int) -> bool:
    """Whether a sum of ``rows`` products of values up to ``absmax`` stays far inside float32's range."""
    return absmax * absmax * rows < _FLOAT32_SAFE


def second_moment(x: np.ndarray, tensor: str | None, node: str | None = None) -> np.ndarray:
    """``x^T x`` (float64 ``[K, K]``) over the rows of ``x[R, K]``; float32 BLAS where it cannot overflow.

    Raises:
        CalibrationError: ``x`` holds NaN or Inf (see :func:`activation_absmax`).
    """
    if fits_float32(activation_absmax(x, tensor, node), x.shape[0]):
        rows = x.astype(np.float32, copy=False)
        return (rows.T @ rows).astype(np.float64)
    rows = x.astype(np.float64)
    return rows.T @ rows


def _prepare(h: np.ndarray, damp: float, order: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The damped Hessian(s) times a power of two, a mask of dead inputs (zero diagonal), and that power of two;
    with ``order``, rows and columns in that order (the one copy made; the same values as permuting afterwards)."""
    diag = np.diagonal(h, axis1=-2, axis2=-1).astype(np.float64)
    dead = diag <= 0
    diag = np.where(dead, 1.0, diag)
    mean = np.mean(diag, axis=-1, keepdims=True)
    if order is not None:
        h = np.asarray(h, dtype=np.float64)[..., order[:, None], order[None, :]]
        diag, dead = diag[..., order], dead[..., order]
    else:
        h = np.array(h, dtype=np.float64, copy=True)
    k = h.shape[-1]
    idx = np.arange(k)
    h[..., idx, idx] = diag
    h[..., idx, idx] += damp * mean
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        power = np.where(np.isfinite(mean) & (mean > 0), -np.round(np.log2(mean)), 0.0)
    factor = np.exp2(power)
    h *= factor[..., None]  # exact: a power of two near 1 / mean(diag H)
    return h, dead, factor


def _symmetrize(a: np.ndarray, tile: int = 1024) -> None:
    """``a = (a + a^T) / 2`` in place, tile by tile (one tile of temporaries, not a ``[K, K]`` one; the same values)."""
    if a.ndim != 2:
        a += np.swapaxes(a, -1, -2).copy()
        a *= 0.5
        return
    k = a.shape[0]
    for i in range(0, k, tile):
        for j in range(0, i + 1, tile):
            lower = a[i:i + tile, j:j + tile]
            mean = 0.5 * (lower + a[j:j + tile, i:i + tile].T)
            a[i:i + tile, j:j + tile] = mean
            a[j:j + tile, i:i + tile] = mean.T


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """``U`` with ``U^T U = H^-1`` (upper triangular), batched over leading axes. Pass ``h`` unbound (no other
    reference): it is freed as soon as it is inverted.

    Raises:
        numpy.linalg.LinAlgError: ``H`` or its inverse is not positive definite (or not finite).
    """
    if not np.all(np.isfinite(h)):
        raise np.linalg.LinAlgError("the Hessian is not finite")
    inverse = np.linalg.inv(h)
    del h
    _symmetrize(inverse)
    lower = np.linalg.cholesky(inverse)
    del inverse
    if not np.all(np.isfinite(lower)) or not np.all(np.diagonal(lower, axis1=-2, axis2=-1) > 0):
        raise np.linalg.LinAlgError("the Cholesky factor is not finite")
    return np.swapaxes(lower, -1, -2)


def _damped_factor(hessian: np.ndarray, damp: float, order: np.ndarray | None) -> np.ndarray:
    """``U`` of the damped Hessian (columns in ``order``), more damping on failure (see the module docstring)."""
    for attempt in range(DAMP_RETRIES + 1):
        try:
            return _upper_inverse_cholesky(_prepare(hessian, min(damp * 10.0 ** attempt, 1e3), order)[0])
        except np.linalg.LinAlgError:
            continue
    raise CholeskyError(f"no Cholesky factorisation even with damping {min(damp * 10.0 ** DAMP_RETRIES, 1e3):g}")


def gptq_factor(hessian: np.ndarray, damp: float = 0.01, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The column order and ``U`` (:func:`gptq_round`'s factorisation of ``H``), to reuse over slices of one layer's
    rows: for ``K = 8192`` it is an ``O(K^3)`` inverse and Cholesky, seconds each.

    Raises:
        CholeskyError: see :func:`gptq_round`.
    """
    k = hessian.shape[-1]
    if act_order and hessian.ndim == 2:  # the damped diagonal's order (damping and scaling keep it): no [K, K] copy
        diag = np.diagonal(hessian).astype(np.float64)
        diag = np.where(diag <= 0, 1.0, diag)
        order = np.argsort(-(diag + damp * diag.mean()), kind="stable")
    else:
        order = np.arange(k)
    return order, _damped_factor(hessian, damp, order)


def gptq_round(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
               zero_point: np.ndarray | None = None, *, damp: float = 0.01, act_order: bool = True,
               block: int = 128, factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
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
        factor: :func:`gptq_factor` of the same ``hessian``, ``damp`` and ``act_order`` (computed when None).

    Returns:
        ``q`` as int64 ``[M, K]``.

    Raises:
        CholeskyError: the Hessian could not be factorised even with more damping (round to nearest instead).
    """
    w = np.asarray(weight, dtype=np.float64)  # not written: the ordering below copies
    m, k = w.shape
    per_row = hessian.ndim == 3
    # dead inputs keep their weights (GPTQ's reference zeroes them): an input never seen on a small calibration set
    # may well be alive on other data
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(m, -1), (m, k))
    z = np.zeros((m, k)) if zero_point is None else \
        np.broadcast_to(np.asarray(zero_point, dtype=np.float64).reshape(m, -1), (m, k))
    order, u = factor if factor is not None else gptq_factor(hessian, damp, act_order)
    if per_row:
        q = _round_per_row(w[:, order], s[:, order], z[:, order], u, qmin, qmax, block)
    else:  # columns as rows: each step reads and updates contiguous memory (strided columns cost 2x the time)
        q = _round_shared(np.ascontiguousarray(w[:, order].T), np.ascontiguousarray(s[:, order].T),
                          np.ascontiguousarray(z[:, order].T), u, qmin, qmax, block).T
    out = np.empty_like(q)
    out[:, order] = q
    return out


def _round_shared(wt: np.ndarray, st: np.ndarray, zt: np.ndarray, u: np.ndarray, qmin: int, qmax: int,
                  block: int) -> np.ndarray:
    """GPTQ's loop for one ``U[K, K]`` over the transposed weights ``wt[K, M]`` (updated in place); codes ``[K, M]``.
    Lazy batch updates: rank-1 updates inside a block of columns, one matmul for the columns after it."""
    k, m = wt.shape
    q = np.empty((k, m), dtype=np.int64)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = np.empty((end - start, m))
        for j in range(start, end):
            column, sj, zj = wt[j], st[j], zt[j]
            qj = np.clip(np.rint(column / sj) + zj, qmin, qmax)
            q[j] = qj.astype(np.int64)
            err = (column - (qj - zj) * sj) / u[j, j]
            wt[j + 1:end] -= np.outer(u[j, j + 1:end], err)
            errors[j - start] = err
        if end < k:
            wt[end:] -= u[start:end, end:].T @ errors
    return q


def _round_per_row(w: np.ndarray, s: np.ndarray, z: np.ndarray, u: np.ndarray, qmin: int, qmax: int,
                   block: int) -> np.ndarray:
    """GPTQ's loop with one ``U[K, K]`` per row of ``w[M, K]`` (a depthwise convolution); codes ``[M, K]``."""
    m, k = w.shape
    q = np.empty((m, k), dtype=np.int64)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = np.empty((m, end - start))
        for j in range(start, end):
            column, sj, zj = w[:, j], s[:, j], z[:, j]
            qj = np.clip(np.rint(column / sj) + zj, qmin, qmax)
            q[:, j] = qj.astype(np.int64)
            err = (column - (qj - zj) * sj) / u[:, j, j]
            w[:, j + 1:end] -= err[:, None] * u[:, j, j + 1:end]
            errors[:, j - start] = err
        if end < k:
            w[:, end:] -= np.einsum("mb,mbk->mk", errors, u[:, start:end, end:])
    return q


def asymmetric_target(weight: np.ndarray, hessian: np.ndarray, drift: np.ndarray, alpha: float, *,
                      damp: float = 0.01) -> np.ndarray:
    """GPTAQ's target: the weights whose output on the quantized model's inputs best matches the float model's.

    For a layer ``y = x W`` (``W[K, N]``) whose input in the partly quantized model is ``x_q`` while the float model
    feeds it ``x_f``, the asymmetric objective ``sum ||x_f W - x_q Q||^2`` equals ``sum ||x_q (W* - Q)||^2`` plus a
    constant, with ``W* = W + H^-1 D W``, ``H = sum x_q^T x_q``, ``D = sum x_q^T (x_f - x_q)`` (least squares). So
    GPTQ (and the grid search) on ``W*`` with the same ``H`` solves it, and at ``alpha = 1`` its greedy steps are
    those of Li et al. 2025 ("GPTAQ"/"GPTQv2"), who apply a share of it (their ``alpha = 0.25``) because ``H^-1 D``
    fitted on a small calibration set over-corrects. Returns ``W + alpha H_d^-1 D W`` (``H_d``: damped as GPTQ's,
    more on a failed factorisation).

    Raises:
        CholeskyError: the damped Hessian cannot be factorised.
    """
    for attempt in range(DAMP_RETRIES + 1):
        h, _, factor = _prepare(hessian, min(damp * 10.0 ** attempt, 1e3))
        try:  # M = (cH)^-1 (cD) = H^-1 D, [K, K], then W + alpha M W
            lower = np.linalg.cholesky(h)
            solved = np.linalg.solve(lower.T, np.linalg.solve(lower, np.asarray(drift, np.float64) * factor))
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(solved)):
            target = np.asarray(weight, dtype=np.float32).copy()
            for start in range(0, target.shape[1], 4096):  # bounded float64 temporaries for a wide lm_head
                part = target[:, start:start + 4096].astype(np.float64)
                target[:, start:start + 4096] = part + alpha * (solved @ part)
            if np.all(np.isfinite(target)):
                return target
    raise CholeskyError(f"no Cholesky factorisation even with damping {min(damp * 10.0 ** DAMP_RETRIES, 1e3):g}")
