"""Hold back every fourth calibration sample for judging an accuracy budget, never for setting ranges.

``--max-accuracy-drop`` / ``min_sqnr_db`` let ``select-precision`` leave layers in float until the quantized model
meets the budget. Judged on the very samples that set the activation ranges, the budget is met too easily: those
samples fit their own ranges best. :func:`split_holdout` wraps the calibration data so that every pass reads only
the samples that set ranges (``i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1``) and ``select-precision`` judges on the rest
(:attr:`HeldOutSplit.held_out`). Fewer than :data:`MIN_SAMPLES` samples, or a fixed batch size above one, cannot be
split: the data is returned as it is (and the report says the budget was judged on calibration samples).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from qcompiler.calibration._batches import regroup

__all__ = ["HOLDOUT_EVERY", "MIN_SAMPLES", "HeldOutSplit", "split_holdout"]

logger = logging.getLogger(__name__)

#: one sample in this many is held back
HOLDOUT_EVERY = 4
#: below this many samples nothing is held back
MIN_SAMPLES = 8


class _Part:
    """The samples of one side of the split, with :class:`~qcompiler.calibration.data.CalibrationData`'s
    interface."""

    def __init__(self, data: Any, held: bool) -> None:
        self._data = data
        self._held = held
        self.input_names = data.input_names
        self.fixed_batch = data.fixed_batch
        total = data.num_samples
        held_count = total // HOLDOUT_EVERY
        self.num_samples = held_count if held else total - held_count

    def iter_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        if batch_size < 1:
            from qcompiler.errors import CalibrationError

            raise CalibrationError(f"batch size must be positive, got {batch_size}")
        limit = self.num_samples if max_samples is None else min(max_samples, self.num_samples)
        mine = (feed for index, feed in enumerate(self._data.iter_batches(1))
                if (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == self._held)
        return regroup(mine, batch_size, limit)


class HeldOutSplit(_Part):
    """The samples that set ranges (what every pass reads); :attr:`held_out` the ones that judge the budget."""

    def __init__(self, data: Any) -> None:
        super().__init__(data, held=False)
        self.held_out = _Part(data, held=True)

    @property
    def coverage(self) -> Any:
        """The wrapped data's length coverage (:mod:`qcompiler.calibration.lengths`), or None."""
        return getattr(self._data, "coverage", None)

    def __repr__(self) -> str:
        return f"HeldOutSplit({self._data!r}, held_out={self.held_out.num_samples})"


def split_holdout(data: Any) -> Any:
    """``data`` with every :data:`HOLDOUT_EVERY`-th sample held back (see the module docstring), or ``data`` itself
    when it cannot be split."""
    if data.num_samples < MIN_SAMPLES or (data.fixed_batch is not None and data.fixed_batch > 1):
        logger.warning("the accuracy budget is judged on the calibration samples themselves: %s",
                       f"{data.num_samples} samples are too few to hold some back" if data.num_samples < MIN_SAMPLES
                       else f"the model's batch size is fixed at {data.fixed_batch}")
        return data
    return HeldOutSplit(data)
