"""Per-channel and per-tensor weight numerics of the int8 path and of FP8 weights: symmetric int8 and FP8 E4M3FN.

For a weight ``w`` and a channel axis ``a`` (or the whole tensor):

- ``s[c] = max(max|w[..c..]| / qmax, MIN_SCALE)`` (float32), zero point 0, ``qmax = 127`` (or 63 with
  ``reduce_range``);
- ``q = clip(rint(w / s[c]), -qmax, qmax)`` (int8, round half to even like ONNX ``QuantizeLinear``), so
  ``|w - s[c] q| <= s[c] / 2`` elementwise;
- ``SQNR = 10 log10(sum w^2 / sum (w - s q)^2)`` in dB, accumulated in float64. An exact round trip (zero noise)
  reports :data:`SQNR_CAP_DB` so reports stay finite JSON.

FP8 E4M3FN weights (:func:`quantize_weight_fp8`): ``s[c] = max(max|w[..c..]| / 448, MIN_SCALE)`` and
``q = fp8(clip(w / s[c], -448, 448))`` (round to nearest even, saturating, like ``QuantizeLinear`` with
``saturate=1``), so ``|w - s[c] q| <= 2^-4 |w|`` for values in the normal FP8 range (E4M3 has 3 mantissa bits).

Weights are handled one tensor at a time, in slices along the first axis of at most :data:`_CHUNK` elements, so
peak extra memory is a few slices, not a float64 copy of the tensor. This module is the one definition of these
numerics: the int8 lowerings and the ``fp8`` weight format use it, and a fake-quant must match it bit for bit.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from qcompiler.qspec import MIN_SCALE

__all__ = ["SQNR_CAP_DB", "FP8_MAX", "QuantizedWeight", "broadcast_scale", "quantize_symmetric", "quantize_weight",
           "quantize_weight_fp8", "round_e4m3", "sqnr_db", "sqnr_from_energies", "symmetric_scales"]

#: SQNR reported for an exact round trip
SQNR_CAP_DB = 300.0
_QMAX = 127
#: the largest finite float8e4m3fn value
FP8_MAX = 448.0
_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A symmetric int8 weight: ``w ~ q * scale`` (scale 1-D along ``axis``, or a scalar when ``axis`` is None)."""

    q: np.ndarray
    scale: np.ndarray
    axis: int | None
    sqnr_db: float


def _slices(n: int, row_elems: int) -> list[slice]:
    step = max(1, _CHUNK // max(row_elems, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def broadcast_scale(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """``scale`` shaped to broadcast against a tensor of rank ``ndim`` along ``axis`` (as is when per tensor)."""
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def symmetric_scales(w: np.ndarray, axis: int | None, qmax: float = _QMAX) -> np.ndarray:
    """Float32 scales ``max|w| / qmax`` per index of ``axis`` (a 0-d array for per-tensor), at least MIN_SCALE."""
    if w.size == 0:
        raise ValueError("cannot quantize an empty weight")
    if axis is None:
        absmax = np.asarray(np.max(np.abs(w)), dtype=np.float64)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.max(np.abs(w), axis=reduce_axes).astype(np.float64) if reduce_axes else np.abs(w).astype(
            np.float64)
    if not np.all(np.isfinite(absmax)):
        raise ValueError("weight holds NaN or Inf")
    return np.maximum(absmax / qmax, MIN_SCALE).astype(np.float32)


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, axis: int | None, qmax: int = _QMAX) -> np.ndarray:
    """``clip(rint(w / scale), -qmax, qmax)`` as int8, slice by slice along the first axis."""
    w = np.asarray(w)
    s = broadcast_scale(np.asarray(scale, dtype=np.float64), w.ndim, axis)
    out = np.empty(w.shape, dtype=np.int8)
    if w.ndim == 0:
        return np.clip(np.rint(w / s), -qmax, qmax).astype(np.int8)
    row = w[0].size if w.shape[0] else 1
    for sl in _slices(w.shape[0], row):
        s_part = s[sl] if (axis == 0 and s.ndim) else s
        out[sl] = np.clip(np.rint(w[sl].astype(np.float64) / s_part), -qmax, qmax)
    return out


def sqnr_db(w: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int | None) -> float:
    """Signal-to-quantization-noise ratio of ``w`` against ``q * scale`` in dB (float64 sums, sliced)."""
    w = np.asarray(w)
    s = broadcast_scale(np.asarray(scale, dtype=np.float64), w.ndim, axis)
    signal = noise = 0.0
    if w.ndim == 0:
        err = float(w) - float(q) * float(s)
        signal, noise = float(w) ** 2, err * err
    else:
        row = w[0].size if w.shape[0] else 1
        for sl in _slices(w.shape[0], row):
            s_part = s[sl] if (axis == 0 and s.ndim) else s
            part = w[sl].astype(np.float64)
            err = part - q[sl].astype(np.float64) * s_part
            signal += float(np.vdot(part, part))
            noise += float(np.vdot(err, err))
    return sqnr_from_energies(signal, noise)


def sqnr_from_energies(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB, capped at :data:`SQNR_CAP_DB` (exact: +cap; no signal, or a noise that is
    not finite: -cap), so it is never NaN."""
    if not np.isfinite(noise) or np.isnan(signal):
        return -SQNR_CAP_DB
    if noise <= 0.0:
        return SQNR_CAP_DB
    if signal <= 0.0:
        return -SQNR_CAP_DB
    return float(min(10.0 * np.log10(signal / noise), SQNR_CAP_DB))


def quantize_weight(w: np.ndarray, axis: int | None, *, scale: np.ndarray | None = None,
                    qmax: int = _QMAX) -> QuantizedWeight:
    """Quantize one weight tensor to symmetric int8 (per channel along ``axis``, or per tensor when None).

    Args:
        w: the float weight (any float dtype; a memory map is fine).
        axis: the channel axis (non-negative), or None for one scale.
        scale: use these scales instead of ``max|w| / qmax`` (e.g. widened so an int32 bias fits).
        qmax: 127, or 63 for ORT's "reduce_range" (7-bit weights, see the lowering passes).
    """
    w = np.asarray(w)
    if axis is not None and not 0 <= axis < w.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of rank {w.ndim}")
    s = symmetric_scales(w, axis, qmax) if scale is None else np.asarray(scale, dtype=np.float32)
    q = quantize_symmetric(w, s, axis, qmax)
    return QuantizedWeight(q, s, axis, sqnr_db(w, q, s, axis))


def round_e4m3(x: np.ndarray) -> np.ndarray:
    """``x`` (float64) saturated to +-448 and rounded to the nearest E4M3FN value, ties to even, as
    ``ml_dtypes.float8_e4m3fn`` values. The rounding is done here in float64 (3 mantissa bits; subnormals step
    ``2^-9``) so that it is one rounding whatever the ml_dtypes version: ml_dtypes 0.5 casts float64 through float32
    first, which rounds twice (``84.0000029`` became 80, not 88)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -FP8_MAX, FP8_MAX)
    _, exponent = np.frexp(x)
    step = np.ldexp(1.0, np.maximum(exponent - 1, -6) - 3)
    return np.clip(np.rint(x / step) * step, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_weight_fp8(w: np.ndarray, axis: int | None, *, scale: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize one weight tensor to FP8 E4M3FN (``q`` of ``ml_dtypes.float8_e4m3fn``), scale ``max|w| / 448``.

    Args:
        w: the float weight (any float dtype; a memory map is fine).
        axis: the channel axis (non-negative), or None for one scale.
        scale: use these scales instead of ``max|w| / 448``.
    """
    w = np.asarray(w)
    if axis is not None and not 0 <= axis < w.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of rank {w.ndim}")
    s = symmetric_scales(w, axis, FP8_MAX) if scale is None else np.asarray(scale, dtype=np.float32)
    sb = broadcast_scale(s.astype(np.float64), w.ndim, axis)
    out = np.empty(w.shape, dtype=ml_dtypes.float8_e4m3fn)
    if w.ndim == 0:
        out = round_e4m3(np.asarray(w, dtype=np.float64) / sb)
    else:
        row = w[0].size if w.shape[0] else 1
        for sl in _slices(w.shape[0], row):
            s_part = sb[sl] if (axis == 0 and sb.ndim) else sb
            out[sl] = round_e4m3(w[sl].astype(np.float64) / s_part)
    return QuantizedWeight(out, s, axis, sqnr_db(w, out, s, axis))
