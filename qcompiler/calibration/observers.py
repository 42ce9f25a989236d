"""Range observers: fold batches of activations into a running range, keeping no activation.

:class:`MinMaxObserver` keeps the running ``min`` and ``max`` over every element it has seen (float64), so its range
equals ``np.min``/``np.max`` of the concatenated batches. NaN is ignored in a batch that also holds finite values;
a range is refused (``None``) until a finite element has been seen, and Inf is clamped to the largest finite float32
so a range is always finite. Per-tensor only.
"""

from __future__ import annotations

import logging

import numpy as np

from qcompiler.qspec import ValueRange

__all__ = ["Observer", "MinMaxObserver", "OBSERVERS", "make_observer"]

logger = logging.getLogger(__name__)

_FMAX = float(np.finfo(np.float32).max)


class Observer:
    """Base class: ``update(array)`` per batch, ``range()`` at the end."""

    name: str = ""

    def update(self, array: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> ValueRange | None:
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

    def range(self) -> ValueRange | None:
        """The range seen so far, or None before any finite element."""
        if not (np.isfinite(self._min) and np.isfinite(self._max)):
            return None
        return ValueRange(self._min, self._max, self._batches)


OBSERVERS: dict[str, type[Observer]] = {"minmax": MinMaxObserver}


def make_observer(name: str) -> Observer:
    """A new observer by its name (as in ``QuantSpec.observer``)."""
    try:
        return OBSERVERS[name]()
    except KeyError:
        raise ValueError(f"unknown observer {name!r} (known: {', '.join(OBSERVERS)})") from None
