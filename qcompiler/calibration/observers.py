"""Range observers: fold batches of activations into a running range, keeping no activation.

:class:`MinMaxObserver` keeps the running ``min`` and ``max`` over every element it has seen (float64), so its range
equals ``np.min``/``np.max`` of the concatenated batches. NaN is ignored in a batch that also holds finite values;
a range is refused (``None``) until a finite element has been seen, and Inf is clamped to the largest finite float32
so a range is always finite. Per-tensor only. Its state round-trips through plain arrays
(:meth:`MinMaxObserver.to_arrays` / :meth:`MinMaxObserver.from_arrays`) for the on-disk calibration cache.

The histogram observers (:class:`PercentileObserver`, :class:`EntropyObserver`, :class:`MSEObserver`) fold batches
into a :class:`~qcompiler.calibration.histogram.Histogram` (bounded memory, exact re-binning, same NaN/Inf rules) and
choose a clipping range at the end with the estimators of :mod:`qcompiler.calibration.estimators`, for the target
grid of the value's :class:`~qcompiler.qspec.QuantSpec` (``range(spec)``: its dtype and symmetric flag; without a
spec, uint8 asymmetric, the default activation type). Their ranges lie inside the MinMax range, and are the MinMax
range for a constant tensor or a histogram with too few distinct values (``fallback`` then says why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qcompiler.calibration.estimators import (
    DEFAULT_PERCENTILE,
    entropy_range,
    fallback_reason,
    mse_range,
    percentile_range,
)
from qcompiler.calibration.histogram import DEFAULT_BINS, Histogram
from qcompiler.qspec import ValueRange

if TYPE_CHECKING:
    from qcompiler.qspec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
    "fold_batches",
]

logger = logging.getLogger(__name__)

_FMAX = float(np.finfo(np.float32).max)


class Observer:
    """Base class: ``update(array)`` per batch, ``range(spec)`` at the end."""

    name: str = ""
    saw_nonfinite: bool = False

    @classmethod
    def create(cls, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> Observer:
        """A new observer from the calibration options; each class takes the ones it uses."""
        return cls()

    def update(self, array: np.ndarray) -> None:
        raise NotImplementedError

    def range(self, spec: QuantSpec | None = None) -> ValueRange | None:
        """The range for quantizing with ``spec`` (its dtype and symmetric flag), or None without data."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min/max of every element seen."""

    name = "minmax"

    def __init__(self) -> None:
        self._min = np.inf
        self._max = -np.inf
        self._batches = 0
        self.saw_nonfinite = False

    def update(self, array: np.ndarray) -> None:
        """Fold one batch into the range (the array is not kept)."""
        a = np.asarray(array)
        self._batches += 1
        if a.size == 0:
            return
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.saw_nonfinite = True
            finite = a[np.isfinite(a)]
            has_pos_inf = bool(np.any(np.isposinf(a)))
            has_neg_inf = bool(np.any(np.isneginf(a)))
            lo = float(np.min(finite)) if finite.size else np.inf
            hi = float(np.max(finite)) if finite.size else -np.inf
            if has_neg_inf:
                lo = -_FMAX
            if has_pos_inf:
                hi = _FMAX
            if has_neg_inf and not np.isfinite(hi):
                hi = -_FMAX
            if has_pos_inf and not np.isfinite(lo):
                lo = _FMAX
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays: ``floats`` (float64: min, max) and ``ints`` (int64: batches, saw non-finite)."""
        return {"floats": np.array([self._min, self._max], dtype=np.float64),
                "ints": np.array([self._batches, int(self.saw_nonfinite)], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MinMaxObserver:
        """Rebuild an observer from :meth:`to_arrays`.

        Raises:
            ValueError: when the arrays are not a consistent MinMax state.
        """
        try:
            floats, ints = arrays["floats"], arrays["ints"]
        except KeyError as exc:
            raise ValueError(f"minmax state lacks {exc}") from None
        if floats.dtype != np.float64 or floats.shape != (2,) or ints.dtype != np.int64 or ints.shape != (2,):
            raise ValueError("minmax state: bad 'floats' or 'ints' array")
        lo, hi = float(floats[0]), float(floats[1])
        batches, nonfinite = int(ints[0]), int(ints[1])
        seen = np.isfinite(lo) and np.isfinite(hi) and lo <= hi
        if batches < 0 or nonfinite not in (0, 1) or not (seen or (lo, hi) == (np.inf, -np.inf)):
            raise ValueError("minmax state: inconsistent min/max or flags")
        observer = cls()
        observer._min, observer._max = lo, hi
        observer._batches = batches
        observer.saw_nonfinite = bool(nonfinite)
        return observer

    def range(self, spec: QuantSpec | None = None) -> ValueRange | None:
        """The range seen so far, or None before any finite element (``spec`` is not needed)."""
        if not (np.isfinite(self._min) and np.isfinite(self._max)):
            return None
        return ValueRange(self._min, self._max, self._batches)


class HistogramObserver(Observer):
    """Base of the histogram observers: a running histogram, and a range estimator applied at the end.

    Args:
        bins: histogram bins (even, at least 16).

    Attributes:
        fallback: after :meth:`range`, why the MinMax range was returned (``"constant"``, ``"few_bins"``) or None.
    """

    def __init__(self, *, bins: int = DEFAULT_BINS) -> None:
        self.histogram = Histogram(bins)
        self.fallback: str | None = None

    @classmethod
    def create(cls, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> Observer:
        return cls(bins=bins)

    @property
    def saw_nonfinite(self) -> bool:
        """Whether a NaN or an Inf was seen."""
        return self.histogram.saw_nonfinite

    def update(self, array: np.ndarray) -> None:
        """Fold one batch into the histogram (the array is not kept)."""
        self.histogram.update(array)

    def range(self, spec: QuantSpec | None = None) -> ValueRange | None:
        """The estimated clipping range for ``spec``'s grid (uint8 asymmetric without a spec), or None."""
        hist = self.histogram
        if hist.count == 0:
            return None
        dtype, symmetric = (spec.dtype, spec.symmetric) if spec is not None else ("uint8", False)
        found = self._estimate(dtype, symmetric)
        self.fallback = fallback_reason(hist)
        return ValueRange(found.min, found.max, hist.num_batches)

    def _estimate(self, dtype: str, symmetric: bool) -> ValueRange:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """Clip at a percentile of the data (of ``|x|`` for a symmetric grid).

    Args:
        percentile: in ``(50, 100]`` (default 99.99).
        bins: histogram bins.
    """

    name = "percentile"

    def __init__(self, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
        super().__init__(bins=bins)
        self.percentile = float(percentile)

    @classmethod
    def create(cls, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> Observer:
        return cls(percentile=percentile, bins=bins)

    def _estimate(self, dtype: str, symmetric: bool) -> ValueRange:
        return percentile_range(self.histogram, dtype, symmetric, percentile=self.percentile)


class EntropyObserver(HistogramObserver):
    """The clipping range minimizing the KL divergence between the data and its quantized form (TensorRT)."""

    name = "entropy"

    def _estimate(self, dtype: str, symmetric: bool) -> ValueRange:
        return entropy_range(self.histogram, dtype, symmetric)


class MSEObserver(HistogramObserver):
    """The clipping range minimizing the expected squared quantization error (rounding plus clipping)."""

    name = "mse"

    def _estimate(self, dtype: str, symmetric: bool) -> ValueRange:
        return mse_range(self.histogram, dtype, symmetric)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, *, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> Observer:
    """A new observer by its name (as in ``QuantSpec.observer``).

    Args:
        name: a key of :data:`OBSERVERS`.
        percentile: the percentile observer's percentile (ignored by the others).
        bins: histogram bins of the histogram observers (ignored by MinMax).

    Raises:
        ValueError: for an unknown name or a bad option.
    """
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r} (known: {', '.join(OBSERVERS)})") from None
    return cls.create(percentile=percentile, bins=bins)


def fold_batches(session: Any, folders: Mapping[str, Any], batches: Iterable[dict[str, np.ndarray]],
                 on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``session`` on every batch and fold each requested output into ``folders[name].update``.

    The activations of one batch are dropped before the next is run, so memory is one batch whatever the number
    of samples. ``on_batch`` gets the number of samples of each batch (progress).
    """
    names = list(folders)
    for feed in batches:
        results = session.run(names, feed)
        for name, array in zip(names, results, strict=True):
            folders[name].update(array)
        del results
        if on_batch is not None and feed:
            first = next(iter(feed.values()))
            on_batch(int(first.shape[0]) if first.ndim else 1)
