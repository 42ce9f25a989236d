"""Quantization intent and calibrated ranges, stored as in-memory metadata on IR values.

An annotate pass writes a frozen :class:`QuantSpec` into ``value.meta["qcompiler.qspec"]``; calibration writes a
:class:`ValueRange` into ``value.meta["qcompiler.range"]``; lowering reads both. Nothing here is serialized.

The math (``r`` real, ``q`` integer, ``s`` scale, ``z`` zero point; ``r = s * (q - z)``):

- symmetric (weights; int8): ``s = max|r| / qmax`` with ``qmax = 127`` (the range is ``[-127, 127]``, -128 is never
  used, so the grid is symmetric), ``z = 0``.
- asymmetric (activations; uint8 by default): the range is first widened to contain 0,
  ``rmin' = min(rmin, 0)``, ``rmax' = max(rmax, 0)``; ``s = (rmax' - rmin') / (qmax - qmin)`` and
  ``z = clip(round(qmin - rmin' / s), qmin, qmax)``. Because ``z`` is an integer, the real 0 is represented exactly
  (padding and ReLU zeros stay exact).
- symmetric activations (int8, int16): ``s = max(|rmin|, |rmax|) / qmax``, ``z = 0``.
- 16-bit integers: uint16 is asymmetric over ``[0, 65535]`` (``s = (rmax' - rmin') / 65535``), int16 symmetric
  over ``[-32767, 32767]`` (``s = max|r| / 32767``); the formulas above apply unchanged.
- FP8 E4M3FN (``"float8e4m3fn"``): symmetric only, ``s = max(|rmin|, |rmax|) / 448`` (448 is the largest finite
  E4M3FN value), zero point the FP8 zero. :func:`quantize` computes ``x / s`` in float64, saturates to
  ``[-448, 448]`` and rounds to the nearest FP8 value (ties to even) like ONNX ``QuantizeLinear`` with
  ``saturate=1``; the relative rounding error of a normal value is at most ``2^-4`` (3 mantissa bits).

Limits: scales are computed in float64 and stored as float32. A zero range (all values 0) or a range whose scale
would fall below :data:`MIN_SCALE` (1e-12) gets ``s = MIN_SCALE``: never 0, NaN or Inf, and the product of two such
scales (an int32 bias scale) is still a normal float32. Non-finite ranges are rejected with ``ValueError``.
Supported element types: int8, uint8, int16, uint16 and float8e4m3fn (numpy arrays of ``ml_dtypes.float8_e4m3fn``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.metadata import QSPEC_KEY, RANGE_KEY

__all__ = [
    "ObserverSpec",
    "QSPEC_KEY",
    "RANGE_KEY",
    "MIN_SCALE",
    "Granularity",
    "QuantSpec",
    "ValueRange",
    "get_qspec",
    "set_qspec",
    "get_range",
    "set_range",
    "qrange",
    "onnx_dtype",
    "numpy_dtype",
    "FP8_DTYPES",
    "is_float_dtype",
    "scale_zero_point",
    "quantize",
    "dequantize",
]

logger = logging.getLogger(__name__)

#: the smallest scale ever produced (zero or tiny ranges); two of them multiplied stay a normal float32
MIN_SCALE = 1e-12

Granularity = Literal["per_tensor", "per_channel", "block"]
_DTYPES = {
    "int8": (-128, 127, np.int8, ir.DataType.INT8),
    "uint8": (0, 255, np.uint8, ir.DataType.UINT8),
    "int16": (-32768, 32767, np.int16, ir.DataType.INT16),
    "uint16": (0, 65535, np.uint16, ir.DataType.UINT16),
    "float8e4m3fn": (-448, 448, ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN),
}
#: floating-point quantized element types (symmetric only, zero point 0, no integer grid)
FP8_DTYPES = frozenset({"float8e4m3fn"})


def is_float_dtype(dtype: str) -> bool:
    """True for a floating-point quantized type (FP8), False for an integer one."""
    return dtype in FP8_DTYPES


#: the observers' defaults (equal to qcompiler.calibration's: a test keeps them so)
DEFAULT_PERCENTILE = 99.99
DEFAULT_BINS = 2048
OBSERVER_KINDS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class ObserverSpec:
    """Which observer calibrates a value, with its arguments: the spec is the constructor call.

    Attributes:
        kind: "minmax" (exact min/max), or on a histogram "percentile", "entropy" (KL) or "mse".
        percentile: the percentile "percentile" clips at, in ``(50, 100]``.
        bins: the histogram bins of the histogram kinds.
    """

    kind: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if self.kind not in OBSERVER_KINDS:
            raise ValueError(f"unknown observer {self.kind!r} (known: {', '.join(OBSERVER_KINDS)})")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
            raise ValueError(f"the percentile observer's percentile must be a number in (50, 100], got {p!r}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 16:
            raise ValueError(f"observer bins must be an integer of at least 16, got {self.bins!r}")

    def create(self) -> Any:
        """A new observer (:mod:`qcompiler.calibration.observers`) as this spec describes it."""
        from qcompiler.calibration.observers import make_observer

        return make_observer(self.kind, percentile=self.percentile, bins=self.bins)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is to be quantized.

    Attributes:
        dtype: element type: "int8", "uint8", "int16", "uint16" or "float8e4m3fn" (symmetric only).
        granularity: "per_tensor", "per_channel" (one scale per index of ``axis``) or "block" (``block_size``
            consecutive elements along ``axis`` share a scale).
        axis: the channel or block axis (non-negative), None for per-tensor.
        block_size: elements per block, only for "block".
        symmetric: zero point 0 and a range symmetric around 0.
        observer: the calibration observer of a static activation (an :class:`ObserverSpec`; a kind name is taken
            as ``ObserverSpec(kind)``); None when no calibration is needed (constant weights, or activations
            quantized at run time).
        dynamic: the scale is computed at run time (dynamic activation quantization).
    """

    dtype: str = "int8"
    granularity: Granularity = "per_tensor"
    axis: int | None = None
    block_size: int | None = None
    symmetric: bool = True
    observer: ObserverSpec | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.observer, str):
            object.__setattr__(self, "observer", ObserverSpec(self.observer))
        if self.dtype not in _DTYPES:
            raise ValueError(f"QuantSpec.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.granularity == "per_tensor":
            if self.axis is not None or self.block_size is not None:
                raise ValueError("a per-tensor QuantSpec takes no axis or block_size")
        elif self.granularity == "per_channel":
            if self.axis is None or self.axis < 0 or self.block_size is not None:
                raise ValueError("a per-channel QuantSpec needs a non-negative axis and no block_size")
        elif self.granularity == "block":
            if self.axis is None or self.axis < 0 or not self.block_size or self.block_size < 1:
                raise ValueError("a block QuantSpec needs a non-negative axis and a positive block_size")
        else:
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.symmetric and self.dtype in ("uint8", "uint16"):
            raise ValueError(f"a symmetric QuantSpec needs a signed dtype, got {self.dtype!r}")
        if self.dtype in FP8_DTYPES:
            if not self.symmetric:
                raise ValueError(f"a {self.dtype} QuantSpec must be symmetric")
            if self.granularity == "block":
                raise ValueError(f"a {self.dtype} QuantSpec is per tensor or per channel")
        if self.dynamic and self.observer is not None:
            raise ValueError("a dynamic QuantSpec needs no observer")


@dataclasses.dataclass(frozen=True)
class ValueRange:
    """A calibrated range ``[min, max]`` of a tensor (per tensor), plus how many samples produced it."""

    min: float
    max: float
    num_samples: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min) and np.isfinite(self.max)):
            raise ValueError(f"a calibrated range must be finite, got [{self.min}, {self.max}]")
        if self.min > self.max:
            raise ValueError(f"a calibrated range needs min <= max, got [{self.min}, {self.max}]")


def get_qspec(value: ir.Value) -> QuantSpec | None:
    """The value's quantization spec, or None."""
    spec = value.meta.get(QSPEC_KEY)
    return spec if isinstance(spec, QuantSpec) else None


def set_qspec(value: ir.Value, spec: QuantSpec) -> bool:
    """Store ``spec`` on the value; return True if that changed anything."""
    if get_qspec(value) == spec:
        return False
    value.meta[QSPEC_KEY] = spec
    return True


def get_range(value: ir.Value) -> ValueRange | None:
    """The value's calibrated range, or None."""
    found = value.meta.get(RANGE_KEY)
    return found if isinstance(found, ValueRange) else None


def set_range(value: ir.Value, value_range: ValueRange) -> bool:
    """Store a calibrated range on the value; return True if that changed anything."""
    if get_range(value) == value_range:
        return False
    value.meta[RANGE_KEY] = value_range
    return True


def qrange(dtype: str, symmetric: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of a type; symmetric int8 is ``(-127, 127)``, float8e4m3fn is ``(-448, 448)``."""
    qmin, qmax = _DTYPES[dtype][:2]
    if symmetric:
        qmin = -qmax
    return qmin, qmax


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a quantized type (``ml_dtypes.float8_e4m3fn`` for "float8e4m3fn")."""
    return np.dtype(_DTYPES[dtype][2])


def onnx_dtype(dtype: str) -> ir.DataType:
    """The ONNX element type of a quantized type."""
    return _DTYPES[dtype][3]


def scale_zero_point(rmin: float | np.ndarray, rmax: float | np.ndarray, dtype: str,
                     symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``dtype``) for real ranges ``[rmin, rmax]`` (scalars or arrays).

    See the module docstring for the formulas; 0 is always exactly representable and scales are never below
    :data:`MIN_SCALE`.
    """
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("cannot compute a scale from a non-finite range")
    qmin, qmax = qrange(dtype, symmetric)
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / qmax, MIN_SCALE)
        zero_point = np.zeros(scale.shape, dtype=np.float64)
    else:
        scale = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE)
        scale32 = scale.astype(np.float32).astype(np.float64)
        zero_point = np.clip(np.rint(qmin - lo / scale32), qmin, qmax)
    return scale.astype(np.float32), zero_point.astype(numpy_dtype(dtype))


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str, *, axis: int | None = None,
             symmetric: bool = False) -> np.ndarray:
    """``clip(rint(x / scale) + z, qmin, qmax)`` as ONNX ``QuantizeLinear`` computes it (half to even).

    For "float8e4m3fn": ``fp8(clip(x / scale, -448, 448))`` (``saturate=1``; ``zero_point`` is 0).

    ``scale``/``zero_point`` are scalars, or 1-D along ``axis``. The division is done in float64.
    """
    qmin, qmax = qrange(dtype, symmetric)
    s = np.asarray(scale, dtype=np.float64)
    fp8 = is_float_dtype(dtype)
    z = np.asarray(zero_point, dtype=np.float64)
    if axis is not None and s.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    if fp8:  # saturate, then round to nearest even in FP8, once (see channelwise.round_e4m3)
        from qcompiler.formats.channelwise import round_e4m3

        return round_e4m3(np.asarray(x, dtype=np.float64) / s)
    q = np.rint(np.asarray(x, dtype=np.float64) / s) + z
    return np.clip(q, qmin, qmax).astype(numpy_dtype(dtype))


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, axis: int | None = None) -> np.ndarray:
    """``(q - z) * scale`` in float64 (``scale``/``zero_point`` scalars or 1-D along ``axis``)."""
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    if axis is not None and s.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (q.astype(np.float64) - z) * s
