"""The quantized ``com.microsoft`` operators of the GPU executor: MatMulNBits, MatMulBnb4, GatherBlockQuantized.

On a CUDA device with triton, the matmuls run qcompiler's Triton kernels (:mod:`qcompiler.runtime.cuda.kernels`)
on the packed initializers as the compiler wrote them: activations go in as float16 (float32 ones are cast) and
the result comes back in the activations' dtype, so a float32 graph stays float32 around them. Elsewhere (a CPU in
CI, or a GPU without triton) each weight is dequantized once with torch ops (:mod:`qcompiler.runtime.cuda.dequant`),
kept, and multiplied in the activations' dtype: the reference path, exact up to float rounding.

GatherBlockQuantized dequantizes only the gathered rows (torch ops; an embedding lookup is small).

Limits: MatMulNBits without ``g_idx`` (act-order), bits 2/4/8; GatherBlockQuantized with ``gather_axis = 0`` and
``quantize_axis`` the last axis of a 2-D table (what the compiler writes).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from qcompiler.runtime.cuda.dequant import dequantize_bnb4, dequantize_nbits, dequantize_rows
from qcompiler.runtime.cuda.ops import Ctx, op

__all__ = ["kernels_available"]

logger = logging.getLogger(__name__)
_CONTRIB = "com.microsoft"


@functools.cache
def kernels_available(device_type: str) -> bool:
    """Whether the Triton kernels can run on this device type (CUDA with triton importable)."""
    if device_type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("triton is not installed: quantized matmuls fall back to dequantized torch.matmul")
        return False
    return True


def _reference_weight(ctx: Ctx, packed: torch.Tensor, make: Any) -> torch.Tensor:
    """The weight dequantized once per model (the executor's cache holds it with the packed tensor)."""
    key = ("dequantized", id(packed))
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not packed:
        hit = ctx.cache[key] = (packed, make())
    return hit[1]


def _matmul_out(a: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(a.dtype)
    return y + bias.to(a.dtype) if bias is not None else y


@op("MatMulNBits", domain=_CONTRIB)
def _matmul_nbits(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a, packed, scales = x[0], x[1], x[2]
    zero_points = x[3] if len(x) > 3 else None
    if len(x) > 4 and x[4] is not None:
        raise ValueError("MatMulNBits with g_idx (act-order) is not supported by the GPU executor")
    bias = x[5] if len(x) > 5 else None
    k, n, bits, block = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
    if kernels_available(a.device.type):
        from qcompiler.runtime.cuda import kernels

        return _matmul_out(a, kernels.matmul_nbits(a, packed, scales, zero_points, k=k, n=n, bits=bits,
                                                   block_size=block), bias)
    weight = _reference_weight(ctx, packed, lambda: dequantize_nbits(packed, scales, zero_points, k=k, n=n, bits=bits,
                                                                block_size=block))
    return _matmul_out(a, torch.matmul(a, weight.to(a.dtype)), bias)


@op("MatMulBnb4", domain=_CONTRIB)
def _matmul_bnb4(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a, packed, absmax = x[0], x[1], x[2]
    k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
    if int(attrs.get("quant_type", 1)) != 1:
        raise ValueError("MatMulBnb4 with quant_type FP4 is not supported by the GPU executor (NF4 only)")
    if kernels_available(a.device.type):
        from qcompiler.runtime.cuda import kernels

        return _matmul_out(a, kernels.matmul_bnb4(a, packed, absmax, k=k, n=n, block_size=block), None)
    weight = _reference_weight(ctx, packed, lambda: dequantize_bnb4(packed, absmax, k=k, n=n, block_size=block))
    return _matmul_out(a, torch.matmul(a, weight.to(a.dtype)), None)


@op("GatherBlockQuantized", domain=_CONTRIB)
def _gather_block_quantized(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data, indices, scales = x[0], x[1], x[2]
    zero_points = x[3] if len(x) > 3 else None
    bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 128))
    if int(attrs.get("gather_axis", 0)) != 0 or data.dim() != 2 or int(attrs.get("quantize_axis", 1)) not in (1, -1):
        raise ValueError("GatherBlockQuantized: only gather_axis 0 and quantize_axis 1 of a 2-D table are supported")
    rows = torch.where(indices < 0, indices + data.shape[0], indices).reshape(-1).to(torch.int64)
    cols = data.shape[1] * 8 // bits
    picked = dequantize_rows(data.index_select(0, rows), scales.index_select(0, rows),
                             None if zero_points is None else zero_points.index_select(0, rows),
                             cols=cols, bits=bits, block_size=block)
    return picked.reshape(*indices.shape, cols)
