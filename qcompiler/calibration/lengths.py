"""Token calibration data seen at its real lengths: padding cut off, short crops added, coverage recorded.

Calibration data for a text model is usually padded to one length (``attention_mask`` 0 on the padding). Two things
then go wrong with activation ranges (measured on all-MiniLM-L6-v2, bench/RESULTS.md, issue 17):

- the padding positions run through the model like real tokens and widen the ranges, although the model's outputs
  there are never used;
- ranges set on long inputs do not hold for short ones (a single word is ``[CLS] word [SEP]``: three positions whose
  activations are larger than a long document's): calibrated on 128-token documents, static int8 gave a mean cosine
  of 0.990 and a minimum of 0.93 on single words.

:func:`length_view` wraps :class:`~qcompiler.calibration.data.CalibrationData` so that every pass sees each sample
cut to its real span (the positions between its first and its last mask 1: right or left padding alike) and, after
every :data:`CROP_EVERY`-th sample, a crop of it: its first ``L - 1`` real tokens and its last one (special tokens
that open and close a sequence stay), ``L`` cycling through :data:`CROP_LENGTHS`. Samples of equal length share a
batch; others run alone, so no batch holds padding. The padding mask is a graph input of an integer or bool type,
rank 2, named ``*mask*``, with a dynamic second axis; the inputs cut with it are the rank-2 inputs whose second axis
is the same dimension (``input_ids``, ``token_type_ids``, ``position_ids``; at least one besides the mask: a
KV-cache decoder's ``total_sequence`` mask is left alone). A sample whose mask is not 0/1 or has no 1 is passed as it
is. A model without such an input, a fixed sequence length or a fixed batch size above one sees
the data unchanged.

:class:`LengthCoverage` records the real lengths the passes saw, for the report: a model that accepts any length
but was calibrated on one length only is named there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.calibration._batches import regroup

__all__ = ["CROP_EVERY", "CROP_LENGTHS", "LengthCoverage", "TokenLayout", "length_view", "token_layout"]

logger = logging.getLogger(__name__)

#: crop lengths in tokens (special tokens included), used in turn
CROP_LENGTHS = (3, 4, 5, 6, 8, 12, 16, 32)
#: one crop after every this many samples
CROP_EVERY = 3

_INTEGER_TYPES = frozenset({
    ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
})


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """The padding mask input and every input cut along axis 1 with it (the mask included)."""

    mask: str
    inputs: tuple[str, ...]


def token_layout(model: ir.Model) -> TokenLayout | None:
    """The model's token layout (see the module docstring), or None when it has none."""
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]

    def sequence_dim(value: ir.Value) -> Any:
        shape = value.shape
        if shape is None or shape.rank() != 2 or isinstance(shape[0], int) and shape[0] != 1:
            return None
        dim = shape[1]
        return None if isinstance(dim, int) else dim

    masks = [v for v in inputs if "mask" in (v.name or "").lower() and v.dtype in _INTEGER_TYPES
             and sequence_dim(v) is not None]
    if len(masks) != 1:
        if len(masks) > 1:
            logger.info("calibration: several mask inputs (%s); padding is kept", ", ".join(v.name for v in masks))
        return None
    mask = masks[0]
    axis = sequence_dim(mask)
    named = getattr(axis, "value", None)
    cut = [v.name for v in inputs if sequence_dim(v) is not None
           and (getattr(sequence_dim(v), "value", None) == named if named else v.dtype in _INTEGER_TYPES)]
    if len(cut) < 2:  # nothing else runs along the mask (a KV-cache decoder's mask spans past + new tokens)
        return None
    return TokenLayout(mask.name, tuple(cut))


@dataclasses.dataclass
class LengthCoverage:
    """The real lengths of the samples the passes were fed (originals and crops), first pass over the data."""

    lengths: list[int] = dataclasses.field(default_factory=list)
    crops: list[int] = dataclasses.field(default_factory=list)
    padded_tokens: int = 0
    uncut: int = 0

    def summary(self) -> dict[str, Any]:
        """Figures for the report (empty before any sample was read)."""
        if not self.lengths:
            return {}
        lengths = np.asarray(self.lengths)
        found: dict[str, Any] = {"samples": len(self.lengths), "min_tokens": int(lengths.min()),
                                 "median_tokens": float(np.median(lengths)), "max_tokens": int(lengths.max()),
                                 "padding_tokens_removed": self.padded_tokens}
        if self.crops:
            found.update(crops=len(self.crops), crop_tokens=sorted(set(self.crops)))
        if self.uncut:
            found["samples_not_cut"] = self.uncut
        return found

    def warning(self) -> str | None:
        """A sentence when the originals cover one length only and no crop made up for it, else None."""
        if self.lengths and not self.crops and len(set(self.lengths)) == 1:
            return (f"every calibration sample has {self.lengths[0]} real tokens: activation ranges of other "
                    f"lengths were not seen")
        return None


class _LengthView:
    """:class:`~qcompiler.calibration.data.CalibrationData`'s interface over cut samples and their crops."""

    def __init__(self, data: Any, layout: TokenLayout, crops: bool) -> None:
        self._data = data
        self.layout = layout
        self.crops = crops
        self.input_names = data.input_names
        self.fixed_batch = data.fixed_batch
        self.num_samples = data.num_samples + (len(range(0, data.num_samples, CROP_EVERY)) if crops else 0)
        self.coverage = LengthCoverage()

    def __repr__(self) -> str:
        return f"LengthView({self._data!r}, mask={self.layout.mask!r}, crops={self.crops})"

    def _samples(self) -> Iterator[dict[str, np.ndarray]]:
        """Each sample cut to its real span, then (every CROP_EVERY-th) its crop; one-sample feeds. The first
        complete pass over the data sets :attr:`coverage`."""
        seen = LengthCoverage()
        for index, feed in enumerate(self._data.iter_batches(1)):
            cut = self._cut(feed, seen)
            yield cut
            if self.crops and index % CROP_EVERY == 0:
                crop = self._crop(cut, CROP_LENGTHS[(index // CROP_EVERY) % len(CROP_LENGTHS)])
                if crop is not None:
                    seen.crops.append(int(crop[self.layout.mask].shape[1]))
                    yield crop
        if not self.coverage.lengths:
            self.coverage = seen

    def _cut(self, feed: dict[str, np.ndarray], seen: LengthCoverage) -> dict[str, np.ndarray]:
        mask = feed[self.layout.mask]
        width = mask.shape[1]
        real = np.flatnonzero(mask[0])
        if not np.isin(mask, (0, 1)).all() or real.size == 0 or \
                any(feed[name].shape[:2] != mask.shape for name in self.layout.inputs):
            seen.lengths.append(int(width))
            seen.uncut += 1
            return feed
        span = slice(int(real[0]), int(real[-1]) + 1)
        seen.lengths.append(span.stop - span.start)
        seen.padded_tokens += width - (span.stop - span.start)
        return {name: np.ascontiguousarray(a[:, span]) if name in self.layout.inputs else a
                for name, a in feed.items()}

    def _crop(self, feed: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray] | None:
        mask = feed[self.layout.mask]
        n = mask.shape[1]
        if length >= n or not (mask == 1).all():
            return None
        keep = np.r_[0:length - 1, n - 1]
        return {name: np.ascontiguousarray(a[:, keep]) if name in self.layout.inputs else a
                for name, a in feed.items()}

    def iter_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Like :meth:`CalibrationData.iter_batches`; consecutive samples of equal length share a batch."""
        if batch_size < 1:
            from qcompiler.errors import CalibrationError

            raise CalibrationError(f"batch size must be positive, got {batch_size}")
        limit = self.num_samples if max_samples is None else min(max_samples, self.num_samples)
        return regroup(self._samples(), batch_size, limit)


def length_view(data: Any, model: ir.Model, *, trim_padding: bool = True, crops: bool = True) -> Any:
    """``data`` as the passes should see it (see the module docstring): unchanged when ``trim_padding`` is off or
    the model has no token layout."""
    if not trim_padding or (data.fixed_batch is not None and data.fixed_batch > 1):
        return data
    layout = token_layout(model)
    if layout is None or not set(layout.inputs) <= set(data.input_names):
        return data
    logger.info("calibration: samples cut at the padding of '%s' (%s)%s", layout.mask, ", ".join(layout.inputs),
                ", with short crops" if crops else "")
    return _LengthView(data, layout, crops)
