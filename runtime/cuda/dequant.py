"""Low-bit weights to float with plain torch ops (no triton): the GPU twins of :mod:`qcompiler.runtime.packing`'s
numpy references, used by the kernels' fallbacks, the tests, and the executor on devices without the kernels.

Layouts as in :mod:`qcompiler.runtime.packing`: MatMulNBits (codes along K, low bits first, scales and zero points
per block), MatMulBnb4 (NF4 over ``W^T`` flattened, high nibble first), and GatherBlockQuantized rows.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompiler.runtime import packing

__all__ = ["codebook", "dequantize_bnb4", "dequantize_nbits", "dequantize_rows", "to_device", "unpack_last_axis"]

_CODEBOOK: dict[tuple[str, int | None], torch.Tensor] = {}


def codebook(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values on ``device`` (cached per device)."""
    key = (device.type, device.index)
    if key not in _CODEBOOK:
        _CODEBOOK[key] = torch.from_numpy(packing.NF4_CODEBOOK.copy()).to(device)
    return _CODEBOOK[key]


def to_device(*arrays: np.ndarray | torch.Tensor | None, device: str | torch.device = "cuda"
              ) -> tuple[torch.Tensor | None, ...]:
    """The packed initializers (numpy arrays, as the ONNX model holds them) as contiguous tensors on ``device``.

    Shapes and dtypes are kept (uint8 stays uint8, float32 scales stay float32); ``None`` stays ``None``.
    """
    out = []
    for array in arrays:
        if array is None:
            out.append(None)
        elif isinstance(array, torch.Tensor):
            out.append(array.to(device).contiguous())
        else:
            out.append(torch.from_numpy(np.ascontiguousarray(array)).to(device))
    return tuple(out)


def unpack_last_axis(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int32) from bytes packed low bits first along the last axis: ``8 / bits`` codes per byte."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    raw = packed.to(torch.int32)
    parts = [(raw >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def dequantize_nbits(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, *, k: int,
                     n: int, bits: int, block_size: int) -> torch.Tensor:
    """The float32 ``W[K, N]`` of a MatMulNBits weight with torch ops (the GPU twin of ``packing.dequantize``)."""
    n_blocks = packing.block_count(k, block_size)
    codes = unpack_last_axis(packed.reshape(n, -1), bits).reshape(n, n_blocks, -1)
    scale = scales.reshape(n, n_blocks, 1).float()
    if zero_points is None:
        zp = torch.full_like(scale, float(packing.default_zero_point(bits)))
    elif zero_points.dtype != torch.uint8:
        zp = zero_points.reshape(n, n_blocks, 1).float()
    else:
        zp = unpack_last_axis(zero_points.reshape(n, -1), bits)[:, :n_blocks].float().reshape(n, n_blocks, 1)
    weight = ((codes.float() - zp) * scale).reshape(n, n_blocks * block_size)[:, :k]
    return weight.t().contiguous()


def dequantize_bnb4(packed: torch.Tensor, absmax: torch.Tensor, *, k: int, n: int, block_size: int) -> torch.Tensor:
    """The float32 ``W[K, N]`` of a MatMulBnb4 NF4 weight with torch ops (the twin of ``packing.dequantize_bnb4``)."""
    raw = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([raw >> 4, raw & 0x0F], dim=1).reshape(-1)[:n * k]
    values = codebook(packed.device)[codes]
    scale = absmax.reshape(-1).float().repeat_interleave(block_size)[:n * k]
    return (values * scale).reshape(n, k).t().contiguous()


def dequantize_rows(data: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, *, cols: int,
                    bits: int, block_size: int) -> torch.Tensor:
    """Float rows ``[m, cols]`` of a GatherBlockQuantized table from its gathered rows: ``data`` uint8
    ``[m, cols * bits / 8]``, ``scales`` ``[m, n_blocks]``, packed zero points ``[m, ceil(n_blocks * bits / 8)]``
    or None (the middle code). The output has the scales' dtype."""
    m = data.shape[0]
    n_blocks = scales.shape[-1]
    codes = unpack_last_axis(data, bits)[:, :cols].float()
    if zero_points is None:
        zp = torch.full((m, n_blocks), float(packing.default_zero_point(bits)), device=data.device)
    else:
        zp = unpack_last_axis(zero_points, bits)[:, :n_blocks].float()
    pad = n_blocks * block_size - cols
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(m, n_blocks, block_size)
    values = (codes - zp.unsqueeze(-1)) * scales.reshape(m, n_blocks, 1).float()
    return values.reshape(m, -1)[:, :cols].to(scales.dtype)
