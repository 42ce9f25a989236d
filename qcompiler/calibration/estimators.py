"""Clipping-range estimators on a :class:`~qcompiler.calibration.histogram.Histogram`, aware of the target grid.

Each estimator returns a :class:`~qcompiler.qspec.ValueRange` ``[lo, hi]`` for
:func:`~qcompiler.qspec.scale_zero_point` with the spec's ``dtype`` and ``symmetric`` flag:

- **symmetric** (int8, ``z = 0``): the estimator picks a threshold ``t`` on ``|x|`` (the histogram folded at its
  zero edge, exactly), and returns ``[max(x_min, -t), min(x_max, t)]``, whose symmetric scale is ``t / 127``.
- **asymmetric** (uint8, or int8 with a zero point): non-negative data (``x_min >= 0``, e.g. after Relu) only gets its
  upper bound chosen, ``[x_min, hi]`` (the grid is widened to 0 anyway); non-positive data mirrors that; signed data
  gets both bounds.

The estimators:

- ``percentile(p)``: linear interpolation of the cumulative counts inside a bin (so within one bin of the sample
  percentile). Symmetric: ``t`` = the ``p``-th percentile of ``|x|``. Asymmetric: the ``(100 - p) / 2`` lower and
  upper tails are cut, or the upper ``100 - p`` only for non-negative data (the lower for non-positive data).
- ``entropy``: TensorRT's KL-divergence threshold search, generalized to both grids. A candidate keeps a span of
  ``m`` bins from 0 (``[0, i)`` of ``|x|`` for symmetric int8, of ``x`` or ``-x`` for one-signed data;
  ``[-i, i)`` cut to the data for signed asymmetric data). The reference ``P`` is the span's counts with the mass
  outside folded into its end bins; the candidate ``Q`` merges the span's counts (without the outside mass, so
  clipping costs divergence) into ``L`` levels (``L = 128`` for symmetric int8, ``256`` for 8-bit asymmetric): bin
  ``b`` of the span belongs to level ``floor(b * L / m)``, and a level's mass is spread evenly over its bins where
  ``P > 0``. ``Q`` is smoothed, ``Q' = (1 - eps) Q + eps U`` with ``U`` uniform on the support of ``P`` and
  ``eps = 1e-4``, so ``KL(P || Q')`` is finite. Exact zeros (half of a Relu output) are left out of ``P`` and ``Q``:
  every grid holds 0 exactly, and their spike in the first bin would otherwise dominate the divergence and drive
  the threshold down. Candidates: spans from ``L`` bins (all of them, when fewer) to the whole data, 128 evenly
  spaced, then every span between the best one's neighbours (at most ~32 more): ~160 KL evaluations of
  ``O(bins)`` each; ties go to the wider span.
- ``mse``: the expected squared error of quantizing the data with a candidate range's real grid (float32 scale,
  integer zero point, the grid ``{(q - z) * s : qmin <= q <= qmax}``), the data taken uniform inside each bin (bins
  cut to ``[x_min, x_max]``; exact zeros, always representable, apart). Inside the grid the rounding error
  ``(x - s * rint(x / s))**2`` is integrated exactly over each bin; outside it the clipping error
  ``(x - edge)**2`` is integrated exactly. Candidates: 128 evenly spaced thresholds in ``(0, max|x|]`` (symmetric)
  or bounds (upper for non-negative data, lower for non-positive data) scored on the bins merged down to 256, then
  64 around the best one scored on all bins; signed asymmetric data is searched bound by bound (upper, lower,
  upper, lower; 64 + 32 each, the current pair always scored, so the error never increases). The MinMax range is
  kept unless the best candidate is predicted better by at least ``max(1%, 2.7 / sqrt(N))`` (``N`` elements; 3
  standard deviations of the sampling noise of ``N`` squared rounding errors): smaller gains are within the error
  of the model. Limit: a point mass inside a bin (many copies of one non-zero value) is seen as spread over the
  bin, so its real rounding error may differ from the model's.

Fallbacks: no element, no width yet: ``None`` (no range). A constant tensor (``x_min == x_max``) or a histogram with
fewer than :data:`MIN_OCCUPIED_BINS` non-empty bins (discrete data, or a bulk squeezed into a few bins by a far
outlier, e.g. a clamped Inf) gets the MinMax range ``[x_min, x_max]``. Every range is finite, ``lo <= hi`` and inside
``[x_min, x_max]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from qcompiler.calibration.histogram import Histogram
from qcompiler.qspec import ValueRange, qrange, scale_zero_point

__all__ = [
    "MIN_OCCUPIED_BINS",
    "DEFAULT_PERCENTILE",
    "ESTIMATORS",
    "fallback_reason",
    "percentile_range",
    "entropy_range",
    "mse_range",
]

logger = logging.getLogger(__name__)

#: fewer non-empty bins than this: the MinMax range
MIN_OCCUPIED_BINS = 8
#: default percentile of :func:`percentile_range`
DEFAULT_PERCENTILE = 99.99
_KL_EPS = 1e-4
_COARSE, _FINE = 128, 64
_MSE_COARSE_BINS = 256
_MSE_MARGIN = 0.01
_MSE_NOISE = 2.7  # 3 standard deviations of the relative sampling noise of N squared rounding errors: 0.9 / sqrt(N)


# -- common -----------------------------------------------------------------------------------------------------------
def fallback_reason(hist: Histogram) -> str | None:
    """Why the estimators return the MinMax range, or None: ``"constant"`` (``x_min == x_max``) or ``"few_bins"``.

    An empty histogram (no range at all) is ``"empty"``.
    """
    if hist.count == 0:
        return "empty"
    if hist.min == hist.max or hist.width is None:
        return "constant"
    if np.count_nonzero(hist.counts) < MIN_OCCUPIED_BINS:
        return "few_bins"
    return None


def _degenerate(hist: Histogram) -> bool:
    return fallback_reason(hist) is not None


def _checked(hist: Histogram, lo: float, hi: float, method: str) -> ValueRange:
    """``[lo, hi]`` cut to the data; the MinMax range (with a warning) if it came out invalid."""
    lo, hi = max(float(lo), hist.min), min(float(hi), hist.max)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        logger.warning("%s: invalid range [%s, %s]; using min/max", method, lo, hi)
        return ValueRange(hist.min, hist.max)
    return ValueRange(lo, hi)


def _folded(hist: Histogram) -> np.ndarray:
    """Counts of ``|x|`` in bins ``[j w, (j + 1) w)``, trailing empty bins dropped."""
    counts, k = hist.counts, hist.zero_index
    pos, neg = counts[k:], counts[:k][::-1]
    out = np.zeros(max(pos.size, neg.size), dtype=np.int64)
    out[: pos.size] += pos
    out[: neg.size] += neg
    return np.trim_zeros(out, "b")


def _quantile(counts: np.ndarray, q: float, origin: float, width: float) -> float:
    """The ``q``-quantile (0 < q <= 1) of counts in bins ``origin + [j, j + 1) * width``, interpolated in a bin."""
    cum = np.cumsum(counts, dtype=np.float64)
    target = q * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
    before = cum[j - 1] if j else 0.0
    frac = (target - before) / counts[j] if counts[j] else 1.0
    return origin + (j + min(max(frac, 0.0), 1.0)) * width


def _sign(hist: Histogram) -> int:
    """1 for non-negative data, -1 for non-positive data, 0 for signed data."""
    return 1 if hist.min >= 0.0 else -1 if hist.max <= 0.0 else 0


# -- percentile -------------------------------------------------------------------------------------------------------
def percentile_range(hist: Histogram, dtype: str = "uint8", symmetric: bool = False, *,
                     percentile: float = DEFAULT_PERCENTILE) -> ValueRange | None:
    """Clip at a percentile (see the module docstring).

    Args:
        hist: the data's histogram.
        dtype: target integer type ("uint8"/"int8").
        symmetric: a symmetric target grid (percentile of ``|x|``).
        percentile: in ``(50, 100]``.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    if hist.count == 0:
        return None
    if _degenerate(hist) or percentile == 100.0:
        return ValueRange(hist.min, hist.max)
    w, q = hist.width, percentile / 100.0
    if symmetric:
        t = _quantile(_folded(hist), q, 0.0, w)
        return _checked(hist, -t, t, "percentile")
    counts, origin = hist.counts, hist.first_cell * w
    sign = _sign(hist)
    lo = hist.min if sign == 1 else _quantile(counts, (1.0 - q) if sign else (1.0 - q) / 2, origin, w)
    hi = hist.max if sign == -1 else _quantile(counts, q if sign else 1.0 - (1.0 - q) / 2, origin, w)
    return _checked(hist, lo, hi, "percentile")


# -- entropy ----------------------------------------------------------------------------------------------------------
def _kl(counts: np.ndarray, csum: np.ndarray, a: int, b: int, levels: int) -> float:
    """``KL(P || Q')`` of the span ``[a, b)`` of ``counts`` quantized to ``levels`` levels (module docstring)."""
    inside = counts[a:b]
    if not inside.any():
        return np.inf
    p = inside.copy()
    p[0] += csum[a]
    p[-1] += csum[-1] - csum[b]
    m = b - a
    level = (np.arange(m) * levels) // m
    support = p > 0
    mass = np.bincount(level, weights=inside, minlength=levels)
    nonzero = np.bincount(level, weights=support, minlength=levels)
    q = np.where(support, mass[level] / np.maximum(nonzero[level], 1.0), 0.0)
    p_n = p[support] / p.sum()
    q_n = q[support] / q.sum()
    q_n = (1.0 - _KL_EPS) * q_n + _KL_EPS / q_n.size
    return float(np.sum(p_n * np.log(p_n / q_n)))


def _best_span(counts: np.ndarray, span: Callable[[int], tuple[int, int]], first: int, last: int,
               levels: int) -> int:
    """The ``i`` in ``[first, last]`` whose span ``span(i)`` has the smallest KL: coarse grid, then refinement."""
    c = counts.astype(np.float64)
    csum = np.concatenate(([0.0], np.cumsum(c)))
    seen: dict[int, float] = {}

    def evaluate(candidates: np.ndarray) -> None:
        for i in candidates:
            i = int(i)
            if i not in seen:
                seen[i] = _kl(c, csum, *span(i), levels)

    coarse = np.unique(np.round(np.linspace(first, last, _COARSE)).astype(np.int64))
    evaluate(coarse)
    best = min(coarse, key=lambda i: (seen[int(i)], -i))
    pos = int(np.searchsorted(coarse, best))
    lo, hi = int(coarse[max(pos - 1, 0)]), int(coarse[min(pos + 1, coarse.size - 1)])
    evaluate(np.arange(lo, hi + 1))
    return min(seen, key=lambda i: (seen[i], -i))


def entropy_range(hist: Histogram, dtype: str = "uint8", symmetric: bool = False) -> ValueRange | None:
    """The KL-divergence-minimizing clipping range (see the module docstring)."""
    if hist.count == 0:
        return None
    if _degenerate(hist):
        return ValueRange(hist.min, hist.max)
    qmin, qmax = qrange(dtype, symmetric)
    levels = qmax + 1 if symmetric else qmax - qmin + 1
    w = hist.width
    sign = 1 if symmetric else _sign(hist)
    if sign:  # one-sided: a threshold on |x| (symmetric), x (non-negative) or -x (non-positive)
        counts = _folded(hist)
        counts[0] -= hist.zeros  # exact zeros are on every grid: left out of P and Q
        i = _best_span(counts, lambda i: (0, i), min(levels, counts.size), counts.size, levels)
        t = i * w
        lo, hi = (-t, t) if symmetric else (hist.min, t) if sign == 1 else (-t, hist.max)
        return _checked(hist, lo, hi, "entropy")
    counts, k = hist.counts, hist.zero_index
    counts[k] -= hist.zeros
    nz = np.flatnonzero(counts)
    first_bin, end_bin = int(nz[0]), int(nz[-1]) + 1

    def span(i: int) -> tuple[int, int]:
        return max(k - i, first_bin), min(k + i, end_bin)

    reach = max(k - first_bin, end_bin - k)
    smallest = next((i for i in range(1, reach + 1) if span(i)[1] - span(i)[0] >= levels), reach)
    a, b = span(_best_span(counts, span, smallest, reach, levels))
    lo = hist.min if a == first_bin else (a - k) * w
    hi = hist.max if b == end_bin else (b - k) * w
    return _checked(hist, lo, hi, "entropy")


# -- mse --------------------------------------------------------------------------------------------------------------
def _rounding_integral(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``G(y) = integral_0^y (x - s * rint(x / s))**2 dx`` (exact; ``s`` broadcasts with ``y``)."""
    t = y / s + 0.5
    n = np.floor(t)
    d = t - n - 0.5
    return (s * s * s) * (n / 12.0 + (d * d * d + 0.125) / 3.0 - 1.0 / 24.0)


class _MSEModel:
    """Expected squared quantization error of the histogram's data for candidate ranges (module docstring).

    A bin ``[u, v]`` contributes ``count * (F(v) - F(u)) / (v - u)`` with ``F`` the integral of the error from 0, so
    ``F`` is evaluated once per edge. ``merge`` bins are merged into one first (a coarse model for a coarse search).
    """

    def __init__(self, hist: Histogram, dtype: str, symmetric: bool, merge: int = 1) -> None:
        self.dtype, self.symmetric = dtype, symmetric
        self.qmin, self.qmax = qrange(dtype, symmetric)
        counts = hist.counts.astype(np.float64)
        counts[hist.zero_index] -= hist.zeros  # exact zeros: always on the grid, error 0
        edges = hist.edges()
        if merge > 1:
            counts = counts.reshape(-1, merge).sum(axis=1)
            edges = edges[::merge]
        used = np.flatnonzero(counts)
        counts = counts[used[0]:used[-1] + 1]
        edges = np.clip(edges[used[0]:used[-1] + 2], hist.min, hist.max)
        length = np.diff(edges)
        weight = counts / hist.count
        spread = length > 0  # a bin cut to one point (the maximum on an edge) is a point mass
        self.edges = edges[None, :]
        self.density = np.where(spread, weight / np.where(spread, length, 1.0), 0.0)
        self.points, self.point_weight = edges[:-1][~spread & (counts > 0)], weight[~spread & (counts > 0)]

    def errors(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Expected error per element for each candidate range ``[lo[c], hi[c]]``."""
        scale, zp = scale_zero_point(lo, hi, self.dtype, self.symmetric)
        s = scale.astype(np.float64)[:, None]
        z = zp.astype(np.float64)[:, None]
        g_lo, g_hi = (self.qmin - z) * s, (self.qmax - z) * s
        e = self.edges
        above, below = np.maximum(e - g_hi, 0.0), np.maximum(g_lo - e, 0.0)
        f = _rounding_integral(np.clip(e, g_lo, g_hi), s) + (above * above * above - below * below * below) / 3.0
        error = np.diff(f, axis=1) @ self.density
        if self.points.size:
            p = self.points[None, :]
            at = np.clip(p, g_lo, g_hi)
            error += ((p - at) ** 2 + (at - s * np.rint(at / s)) ** 2) @ self.point_weight
        return error


def _search(coarse_errors: Callable[[np.ndarray], np.ndarray], fine_errors: Callable[[np.ndarray], np.ndarray],
            start: float, end: float, current: float, coarse: int, fine: int) -> tuple[float, float]:
    """Minimize over ``(start, end]``: a coarse grid on the coarse model, then the fine model around its best point.

    The fine model also scores ``current``, so the result is never worse than it (on the fine model).
    """
    step = (end - start) / coarse
    grid = start + step * np.arange(1, coarse + 1)
    best = float(grid[int(np.argmin(coarse_errors(grid)))])
    refined = np.clip(best + step * np.linspace(-1.0, 1.0, fine), min(start, end), max(start, end))
    candidates = np.unique(np.append(refined[refined != start], [best, current]))
    errors = fine_errors(candidates)
    i = int(np.argmin(errors))
    return float(candidates[i]), float(errors[i])


def mse_range(hist: Histogram, dtype: str = "uint8", symmetric: bool = False) -> ValueRange | None:
    """The clipping range minimizing the expected squared quantization error (see the module docstring)."""
    if hist.count == 0:
        return None
    if _degenerate(hist):
        return ValueRange(hist.min, hist.max)
    merge = 1
    while hist.bins % (2 * merge) == 0 and hist.bins // (2 * merge) >= _MSE_COARSE_BINS:
        merge *= 2
    fine, rough = _MSEModel(hist, dtype, symmetric), _MSEModel(hist, dtype, symmetric, merge)
    x_min, x_max = hist.min, hist.max
    if symmetric:
        top = max(-x_min, x_max)
        baseline = float(fine.errors(np.array([-top]), np.array([top]))[0])
        t, best = _search(lambda t: rough.errors(-t, t), lambda t: fine.errors(-t, t), 0.0, top, top,
                          _COARSE, _FINE)
        lo, hi = -t, t
    else:
        lo, hi = x_min, x_max
        baseline = best = float(fine.errors(np.array([lo]), np.array([hi]))[0])
        sign = _sign(hist)
        rounds, coarse, refine = (1, _COARSE, _FINE) if sign else (2, _COARSE // 2, _FINE // 2)
        for _ in range(rounds):
            if sign >= 0:
                hi, best = _search(lambda h, lo=lo: rough.errors(np.full_like(h, lo), h),
                                   lambda h, lo=lo: fine.errors(np.full_like(h, lo), h),
                                   max(x_min, 0.0), x_max, hi, coarse, refine)
            if sign <= 0:
                lo, best = _search(lambda m, hi=hi: rough.errors(m, np.full_like(m, hi)),
                                   lambda m, hi=hi: fine.errors(m, np.full_like(m, hi)),
                                   min(x_max, 0.0), x_min, lo, coarse, refine)
    margin = max(_MSE_MARGIN, _MSE_NOISE / np.sqrt(hist.count))
    if not best <= (1.0 - margin) * baseline:
        return ValueRange(x_min, x_max)
    return _checked(hist, lo, hi, "mse")


#: estimator functions by calibrator name
ESTIMATORS: dict[str, Callable[..., ValueRange | None]] = {
    "percentile": percentile_range, "entropy": entropy_range, "mse": mse_range,
}
