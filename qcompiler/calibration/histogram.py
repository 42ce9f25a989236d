"""A running histogram of activations with bounded memory: fixed bins, exact re-binning, one pass, no samples kept.

The bins are cells of a global lattice: with the bin width ``w = 2**e`` (a power of two), bin ``j`` (an integer, any
sign) is ``[j * w, (j + 1) * w)``, and an element ``x`` falls in bin ``floor(x / w)``. Dividing by a power of two is
exact in float64, so the bin of every element is determined exactly. The histogram keeps ``bins`` consecutive cells
``j0 .. j0 + bins - 1`` (default 2048): the smallest window that holds every element seen *and 0*, at the smallest
width for which that window fits. When a batch leaves the window:

- the window is moved (no counts change) if the data still fits in ``bins`` cells at the current width; otherwise
- the width doubles, ``e -> e + 1``, merging each pair of cells ``(2m, 2m + 1)`` into cell ``m``, as often as needed.
  A merge is exact (no interpolation): the counts equal those of a histogram built at the wider width from the start.

Because the width only grows when needed and the number of cells needed only shrinks as the width grows, the final
width is the smallest power of two whose window of ``bins`` cells holds ``[min(x_min, 0), max(x_max, 0)]``, whatever
the order or the split of the batches: the final histogram is the same for any order of the same data. Holding 0
keeps 0 a bin edge (bin ``-j0`` starts at 0), so ``|x|`` can be histogrammed exactly by folding the negative bins
onto the positive ones, and the data plus 0 spans between ``bins / 2`` and ``bins`` cells.

The exact ``min``/``max``, the number of exact zeros and the element count are tracked beside the counts. NaN is
ignored; ``+-Inf`` is clamped to ``+-`` the largest float32 (as :class:`~qcompiler.calibration.observers.MinMaxObserver`
does) and counted, so one Inf stretches the histogram over the float32 range. While every element seen is 0 the
histogram has no width yet (``width`` is None) and only counts zeros.

:meth:`Histogram.to_arrays` / :meth:`Histogram.from_arrays` save and restore the whole state as plain arrays (the
on-disk calibration cache, :mod:`qcompiler.calibration.cache`).

Limits: per tensor only; memory is ``bins`` int64 counts plus a chunk of at most 2**20 elements of float64 scratch
during :meth:`Histogram.update`. Resolution: a bin is at most about ``2 * (max(x_max, 0) - min(x_min, 0)) / bins``
wide (the width before the last doubling did not fit), so data far from 0 (``[100, 101]``) occupies few bins; the
quantization grid, which always includes 0, is coarser still there.
"""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["DEFAULT_BINS", "Histogram"]

logger = logging.getLogger(__name__)

#: default number of bins
DEFAULT_BINS = 2048
_FMAX = float(np.finfo(np.float32).max)
_CHUNK = 1 << 20


class Histogram:
    """Running histogram of the elements of every batch passed to :meth:`update` (see the module docstring).

    Args:
        bins: number of cells kept (an even number, at least 16).

    Raises:
        ValueError: for a bad ``bins``.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 16 or bins % 2:
            raise ValueError(f"a histogram needs an even number of bins >= 16, got {bins!r}")
        self._bins = bins
        self._counts = np.zeros(bins, dtype=np.int64)
        self._exp: int | None = None  # the width is 2**exp; None while only zeros were seen
        self._j0 = 0
        self._min = math.inf
        self._max = -math.inf
        self._count = 0
        self._zeros = 0
        self.num_batches = 0
        self.saw_nonfinite = False

    # -- read-only state ------------------------------------------------------------------------------------------
    @property
    def bins(self) -> int:
        """Number of cells."""
        return self._bins

    @property
    def counts(self) -> np.ndarray:
        """A copy of the ``bins`` counts (int64); all 0 while :attr:`width` is None."""
        return self._counts.copy()

    @property
    def width(self) -> float | None:
        """The bin width (a power of two), or None while every element seen is 0."""
        return None if self._exp is None else math.ldexp(1.0, self._exp)

    @property
    def first_cell(self) -> int:
        """The lattice index ``j0`` of the first bin: its lower edge is ``j0 * width``."""
        return self._j0

    @property
    def zero_index(self) -> int:
        """The index of the edge at 0 (``-j0``): bins ``zero_index ..`` hold ``x >= 0``, the ones before ``x < 0``."""
        return -self._j0

    @property
    def count(self) -> int:
        """Elements seen, NaN excluded (clamped Inf included)."""
        return self._count

    @property
    def zeros(self) -> int:
        """Elements exactly equal to 0."""
        return self._zeros

    @property
    def min(self) -> float:
        """Exact minimum seen (``inf`` before any element)."""
        return self._min

    @property
    def max(self) -> float:
        """Exact maximum seen (``-inf`` before any element)."""
        return self._max

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (float64); raises ValueError while :attr:`width` is None."""
        if self._exp is None:
            raise ValueError("the histogram has no bins yet (only zeros were seen)")
        return (self._j0 + np.arange(self._bins + 1, dtype=np.float64)) * self.width

    # -- state ----------------------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The complete state as plain numeric arrays (storable in an ``.npz`` without pickle).

        Returns:
            ``counts`` (int64, ``bins``), ``ints`` (int64: bins, has width, exponent, first cell, count, zeros,
            batches, saw non-finite) and ``floats`` (float64: exact min, max). :meth:`from_arrays` inverts it.
        """
        ints = [self._bins, int(self._exp is not None), self._exp or 0, self._j0, self._count, self._zeros,
                self.num_batches, int(self.saw_nonfinite)]
        return {"counts": self._counts.copy(), "ints": np.array(ints, dtype=np.int64),
                "floats": np.array([self._min, self._max], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Histogram:
        """Rebuild a histogram from :meth:`to_arrays`; it continues exactly as the original would.

        Raises:
            ValueError: when the arrays are not a consistent histogram state (wrong keys, dtypes, shapes or counts).
        """
        try:
            counts, ints, floats = arrays["counts"], arrays["ints"], arrays["floats"]
        except KeyError as exc:
            raise ValueError(f"histogram state lacks {exc}") from None
        if ints.dtype != np.int64 or ints.shape != (8,) or floats.dtype != np.float64 or floats.shape != (2,):
            raise ValueError("histogram state: bad 'ints' or 'floats' array")
        bins, has_width, exp, j0, count, zeros, batches, nonfinite = (int(v) for v in ints)
        hist = cls(bins)
        if counts.dtype != np.int64 or counts.shape != (bins,) or (counts < 0).any():
            raise ValueError("histogram state: bad 'counts' array")
        lo, hi = float(floats[0]), float(floats[1])
        total = int(counts.sum())
        consistent = (count >= 0 and batches >= 0 and 0 <= zeros <= count and nonfinite in (0, 1)
                      and has_width in (0, 1) and not math.isnan(lo) and not math.isnan(hi)
                      and (total == count if has_width else total == 0 and zeros == count)
                      and (count == 0 or lo <= hi) and (count > 0 or (lo, hi) == (math.inf, -math.inf)))
        if not consistent:
            raise ValueError("histogram state: inconsistent counts, min/max or flags")
        hist._counts = counts.copy()
        hist._exp = exp if has_width else None
        hist._j0 = j0
        hist._min, hist._max = lo, hi
        hist._count, hist._zeros = count, zeros
        hist.num_batches = batches
        hist.saw_nonfinite = bool(nonfinite)
        return hist

    # -- update ---------------------------------------------------------------------------------------------------
    def update(self, array: np.ndarray) -> None:
        """Fold one batch in (the array is not kept)."""
        self.num_batches += 1
        a = np.asarray(array).ravel()
        if a.size == 0:
            return
        if a.dtype.kind not in "fiub":
            raise ValueError(f"cannot histogram an array of dtype {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            self.saw_nonfinite = True
            a = a[~np.isnan(a)].astype(np.float64)
            np.clip(a, -_FMAX, _FMAX, out=a)
            if a.size == 0:
                return
        lo, hi = float(np.min(a)), float(np.max(a))
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._count += int(a.size)
        if self._exp is None and self._min == 0.0 and self._max == 0.0:
            self._zeros += int(a.size)
            return
        self._fit()
        scale = math.ldexp(1.0, -self._exp)
        for start in range(0, a.size, _CHUNK):
            chunk = a[start:start + _CHUNK].astype(np.float64, copy=False)
            self._zeros += int(np.count_nonzero(chunk == 0.0))
            cells = np.floor(chunk * scale)
            cells -= self._j0
            index = cells.astype(np.int64)
            np.clip(index, 0, self._bins - 1, out=index)  # guards the last edge only; _fit made the window cover all
            self._counts += np.bincount(index, minlength=self._bins)

    # -- layout ---------------------------------------------------------------------------------------------------
    def _cells(self, exp: int) -> tuple[int, int]:
        """First and last lattice cells of ``[min(x_min, 0), max(x_max, 0)]`` at width ``2**exp``."""
        scale = math.ldexp(1.0, -exp)
        return math.floor(min(self._min, 0.0) * scale), math.floor(max(self._max, 0.0) * scale)

    def _fits(self, exp: int) -> bool:
        first, last = self._cells(exp)
        return last - first < self._bins

    def _fit(self) -> None:
        """Make the window hold every element seen and 0: move it, or double the width, as little as needed."""
        if self._exp is None:
            span = max(self._max, 0.0) - min(self._min, 0.0)
            exp = math.frexp(span / self._bins)[1] - 2  # 2**exp < span / bins: too narrow, so it is searched upward
            while not self._fits(exp):
                exp += 1
            self._exp = exp
            self._j0 = self._cells(exp)[0]
            if self._zeros:  # the zeros seen before the width was known
                self._counts[-self._j0] += self._zeros
            return
        doublings = 0
        while not self._fits(self._exp):
            self._merge_pairs()
            doublings += 1
        first = self._cells(self._exp)[0]
        if first != self._j0:
            self._move(first)
        if doublings:
            logger.debug("histogram: width doubled %d time(s) to %g", doublings, self.width)

    def _merge_pairs(self) -> None:
        """Double the width: lattice cell ``j`` goes to cell ``floor(j / 2)`` (exact)."""
        odd = self._j0 & 1
        padded = np.zeros(self._bins + 2, dtype=np.int64)
        padded[odd:odd + self._bins] = self._counts
        merged = padded[: 2 * ((self._bins + odd + 1) // 2)].reshape(-1, 2).sum(axis=1)
        self._counts = np.zeros(self._bins, dtype=np.int64)
        self._counts[: merged.size] = merged
        self._j0 >>= 1
        self._exp += 1

    def _move(self, first: int) -> None:
        """Move the window to start at lattice cell ``first`` (only ever downward; the dropped cells are empty)."""
        shift = self._j0 - first
        if shift <= 0 or shift >= self._bins or self._counts[self._bins - shift:].any():
            raise AssertionError("histogram window move would drop counts")  # an internal invariant
        moved = np.zeros(self._bins, dtype=np.int64)
        moved[shift:] = self._counts[: self._bins - shift]
        self._counts = moved
        self._j0 = first
