"""The compiler's quantization numerics in torch, bit for bit: what QAT's fake quantization computes.

Each function mirrors one definition in :mod:`qcompiler.formats` or :mod:`qcompiler.qspec` (same formulas, same
float64 intermediates, same round half to even, same clamping) so that the codes a training step sees are the
codes the compiler writes; ``tests/test_torch_numerics.py`` checks every one against its numpy original with
hypothesis. Weights are in torch's layout ``wt[N, K]`` (``nn.Linear.weight``: output rows, input columns), which
is the compiler's code layout (``W^T`` of ``Y = A @ W``). Mirrors:

- :func:`grid`, :func:`codes_on_grid`, :func:`dequantize_grid`: :mod:`qcompiler.formats.blockwise` (int2-int8,
  ternary; blocks of ``block_size`` along K, the last one padded, padding outside the ranges);
- :func:`nf4_codes`, :func:`nf4_dequantize`: :func:`qcompiler.formats.nf4.quantize_nf4` (absmax per block of ``wt``
  flattened, nearest codebook value by the midpoints, ``np.searchsorted`` side left);
- :func:`fp8_scales`, :func:`fp8_round`: :func:`qcompiler.formats.channelwise.quantize_weight_fp8` (one scale per
  output row; float64 values rounded straight to E4M3FN, ties to even, saturating at 448: done by hand, because a
  cast through float32 would round twice);
- :func:`int8_scales`, :func:`int8_codes`: :func:`qcompiler.formats.channelwise.quantize_weight` (symmetric
  per-channel int8, ``qmax`` 127 or 63);
- :func:`activation_qparams`: :func:`qcompiler.qspec.scale_zero_point`; :func:`quantize_activation`: what ONNX
  Runtime's ``QuantizeLinear`` computes at run time (``x / s`` in float32, half to even, then ``+ z`` and clamp).

Known limit: ternary's absmean is a float64 sum whose order differs between numpy and torch; the float32 scale
differs only when that float64 mean lies within one float64 ulp of a float32 rounding boundary (about 2^-29 of
blocks), which the hypothesis tests have not met.
"""

from __future__ import annotations

import torch

from qcompiler.formats.base import WeightSpec
from qcompiler.qspec import MIN_SCALE
from qcompiler.runtime import packing

__all__ = ["FP8_MAX", "activation_qparams", "code_limits", "codes_on_grid", "dequantize_grid", "fp8_round",
           "fp8_scales", "grid", "int8_codes", "int8_scales", "nf4_codebook", "nf4_codes", "nf4_dequantize",
           "quantize_activation", "is_ternary"]

FP8_MAX = 448.0
_F64 = torch.float64


def is_ternary(spec: WeightSpec) -> bool:
    return spec.format == "ternary"


def code_limits(spec: WeightSpec) -> tuple[int, int]:
    """The smallest and largest code of a grid spec (ternary: 1..3)."""
    return (1, 3) if is_ternary(spec) else (0, (1 << spec.bits) - 1)


def _blocks(wt: torch.Tensor, block: int, fill: float, dtype: torch.dtype = _F64) -> torch.Tensor:
    """``wt[N, K]`` as ``[N, n_blocks, block]`` in ``dtype`` (float64 unless asked), the padding ``fill``; no copy
    beyond the cast when ``block`` divides K."""
    n, k = wt.shape
    blocks = -(-k // block)
    if blocks * block == k:
        return wt.to(dtype).reshape(n, blocks, block)
    padded = torch.full((n, blocks * block), fill, dtype=dtype, device=wt.device)
    padded[:, :k] = wt.to(dtype)
    return padded.reshape(n, blocks, block)


def grid(wt: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales ``[N, n_blocks]`` (float32) and zero points (uint8 codes, or float32) of ``wt[N, K]``."""
    k = wt.shape[1]
    block = spec.block_for(k)
    top = (1 << spec.bits) - 1
    if is_ternary(spec):
        blocks = _blocks(wt, block, 0.0)
        counts = torch.full((blocks.shape[1],), float(block), dtype=_F64, device=wt.device)
        counts[-1] = k - (blocks.shape[1] - 1) * block
        scale = blocks.abs().sum(dim=2) / counts
        scale = torch.where(scale > 0, scale, 1.0).to(torch.float32)
        return scale, torch.full(scale.shape, 2, dtype=torch.uint8, device=wt.device)
    if spec.symmetric:
        middle = 1 << (spec.bits - 1)
        scale = _blocks(wt, block, 0.0, torch.float32).abs().amax(dim=2).to(_F64) / (middle - 0.5)
        scale = torch.where(scale > 0, scale, 1.0).to(torch.float32)
        return scale, torch.full(scale.shape, middle, dtype=torch.uint8, device=wt.device)
    # min and max are exact in the weight's float32 (widening to float64 afterwards changes nothing)
    low = _blocks(wt, block, float("inf"), torch.float32).amin(dim=2).to(_F64)
    high = _blocks(wt, block, float("-inf"), torch.float32).amax(dim=2).to(_F64)
    if not spec.float_zero_point:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    flat = high - low <= 0
    scale = torch.where(flat, low.abs() / top, (high - low) / top)
    scale = torch.where(scale > 0, scale, 1.0)
    exact = -low / scale
    if spec.float_zero_point:
        return scale.to(torch.float32), exact.to(torch.float32)
    return scale.to(torch.float32), exact.round().clamp(0, top).to(torch.uint8)


def codes_on_grid(wt: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Round-to-nearest codes ``[N, K]`` (uint8) of ``wt`` on the given grid, clamped to :func:`code_limits`."""
    n, k = wt.shape
    blocks = _blocks(wt, spec.block_for(k), 0.0)
    q = (blocks / scale.to(_F64)[..., None] + zero.to(_F64)[..., None]).round()
    low, high = code_limits(spec)
    return q.clamp(low, high).to(torch.uint8).reshape(n, -1)[:, :k]


def dequantize_grid(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block: int) -> torch.Tensor:
    """``(q - z) * s`` in float32, ``[N, K]``: :meth:`BlockwiseWeight.dequantize` transposed."""
    n, k = codes.shape
    w = (_blocks(codes, block, 0.0, torch.float32) - zero.to(torch.float32)[..., None]) \
        * scale.to(torch.float32)[..., None]
    return w.reshape(n, -1)[:, :k]


# -- NF4 ----------------------------------------------------------------------------------------------------------
def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values (float32), :data:`qcompiler.runtime.packing.NF4_CODEBOOK`."""
    return torch.as_tensor(packing.NF4_CODEBOOK, dtype=torch.float32, device=device)


def nf4_absmax(wt: torch.Tensor, block: int) -> torch.Tensor:
    """float32 absmax per block of ``wt`` flattened (all-zero blocks: 1)."""
    flat = wt.reshape(-1).to(_F64)
    blocks = -(-flat.numel() // block)
    padded = torch.zeros(blocks * block, dtype=_F64, device=wt.device)
    padded[:flat.numel()] = flat
    absmax = padded.reshape(blocks, block).abs().amax(dim=1)
    return torch.where(absmax > 0, absmax, 1.0).to(torch.float32)


def nf4_codes(wt: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """NF4 codes ``[N, K]`` of ``wt`` for the given absmax (float64 division, nearest value by the midpoints)."""
    flat = wt.reshape(-1).to(_F64)
    scale = absmax.to(_F64).repeat_interleave(block)[:flat.numel()]
    book = nf4_codebook(wt.device).to(_F64)
    edges = (book[1:] + book[:-1]) / 2
    return torch.searchsorted(edges, flat / scale).to(torch.uint8).reshape(wt.shape)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``book[q] * absmax`` ``[N, K]``."""
    values = nf4_codebook(codes.device)[codes.reshape(-1).long()]
    scale = absmax.to(torch.float32).repeat_interleave(block)[:values.numel()]
    return (values * scale).reshape(codes.shape)


# -- FP8 E4M3FN, one scale per output row ---------------------------------------------------------------------------
def fp8_scales(wt: torch.Tensor) -> torch.Tensor:
    """float32 ``max(max|wt[n]| / 448, MIN_SCALE)`` per row (the absmax taken in float32, as numpy does)."""
    absmax = wt.to(torch.float32).abs().amax(dim=1).to(_F64)
    return torch.clamp(absmax / FP8_MAX, min=MIN_SCALE).to(torch.float32)


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` saturated to +-448 and rounded straight to the nearest E4M3FN value (ties to even), returned as
    float32 (every E4M3FN value is one)."""
    x = x.to(_F64).clamp(-FP8_MAX, FP8_MAX)
    _, exponent = torch.frexp(x)  # |x| = m 2^e with m in [0.5, 1): the leading bit is 2^(e - 1)
    step_exponent = torch.clamp(exponent - 1, min=-6) - 3  # 3 mantissa bits; subnormals below 2^-6 step 2^-9
    step = torch.ldexp(torch.ones_like(x), step_exponent.to(_F64))
    return ((x / step).round() * step).clamp(-FP8_MAX, FP8_MAX).to(torch.float32)


def fp8_codes(wt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The E4M3FN values (as float32) of ``wt[N, K] / scale[N]`` (float64 division)."""
    return fp8_round(wt.to(_F64) / scale.to(_F64)[:, None])


# -- int8: symmetric per channel (weights) and QuantizeLinear (activations) -----------------------------------------
def int8_scales(w: torch.Tensor, axis: int, qmax: int = 127) -> torch.Tensor:
    """float32 ``max(max|w| / qmax, MIN_SCALE)`` per index of ``axis`` (absmax in the weight's float32)."""
    dims = [d for d in range(w.dim()) if d != axis]
    absmax = w.to(torch.float32).abs().amax(dim=dims) if dims else w.to(torch.float32).abs()
    return torch.clamp(absmax.to(_F64) / qmax, min=MIN_SCALE).to(torch.float32)


def _along(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def int8_codes(w: torch.Tensor, scale: torch.Tensor, axis: int, qmax: int = 127) -> torch.Tensor:
    """``clip(rint(w / s), -qmax, qmax)`` (float64 division) as int8."""
    s = _along(scale.to(_F64), w.dim(), axis)
    return (w.to(_F64) / s).round().clamp(-qmax, qmax).to(torch.int8)


def activation_qparams(rmin: torch.Tensor, rmax: torch.Tensor, qmin: int, qmax: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float32 holding an integer) for ``[rmin, rmax]``: the compiler's
    :func:`~qcompiler.qspec.scale_zero_point` (the range widened to contain 0; ``qmin = -qmax`` when symmetric)."""
    lo = torch.clamp(rmin.to(_F64), max=0.0)
    hi = torch.clamp(rmax.to(_F64), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=MIN_SCALE)
        return scale.to(torch.float32), torch.zeros_like(scale, dtype=torch.float32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=MIN_SCALE)
    zero = (qmin - lo / scale.to(torch.float32).to(_F64)).round().clamp(qmin, qmax)
    return scale.to(torch.float32), zero.to(torch.float32)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """The integer codes (as float32) ONNX Runtime's ``QuantizeLinear`` gives ``x``: ``clip(rint(x / s) + z)`` with
    the division in float32."""
    return ((x.to(torch.float32) / scale.to(torch.float32)).round() + zero.to(torch.float32)).clamp(qmin, qmax)
