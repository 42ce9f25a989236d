"""The packed layouts of low-bit weights: one source of truth for the compiler's lowering and the runtime's kernels.

Only numpy (the runtime stays import-light). The layout is ONNX Runtime's ``com.microsoft.MatMulNBits``, for a
float weight ``W[K, N]`` used as ``Y = A @ W`` and quantized in blocks of ``block_size`` consecutive values along
``K`` (the reduction axis), separately for each output column ``n``:

- ``n_blocks = ceil(K / block_size)``; the last block is padded (with the zero point's code, so it dequantizes to 0).
- codes ``q[n, k]`` in ``[0, 2^bits)``, stored row-major in the *transposed* order ``[N, n_blocks, blob_size]`` with
  ``blob_size = block_size * bits / 8`` bytes, low bits first: byte ``j`` of a block holds codes
  ``j*per_byte .. j*per_byte + per_byte - 1`` (``per_byte = 8 / bits``), code ``i`` of the byte at bit ``i * bits``.
- scales: float32 ``[N, n_blocks]`` (flattened ``[N * n_blocks]`` for ONNX Runtime).
- zero points (asymmetric only): codes packed the same way along the blocks of a column, ``ceil(n_blocks *
  bits / 8)`` bytes per column, i.e. ``uint8 [N * ceil(n_blocks * bits / 8)]``, or float32 ``[N * n_blocks]``
  (a real-valued zero point per block); without them the zero point is ``2^(bits-1)`` (8 for int4), which is how
  symmetric weights are stored.
- dequantization: ``W[k, n] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]``.

``com.microsoft.GatherBlockQuantized`` (a quantized embedding table ``E[rows, cols]``, blocks along ``cols``) uses
the same codes, scales ``[rows, n_blocks]`` and packed zero points ``[rows, ceil(n_blocks * bits / 8)]``, with the
codes packed per row without padding (:func:`pack_rows`). Its codes equal those of ``E^T`` as a MatMulNBits weight,
so a tied embedding and lm_head share one quantization.

``com.microsoft.MatMulBnb4`` (NF4, bitsandbytes' layout) is different: the 4-bit indices into
:data:`NF4_CODEBOOK` cover ``W^T[N, K]`` flattened row-major, in blocks of ``block_size`` consecutive elements of
that flat array (a block may span two columns of W when K is no multiple), two per byte with the *first* in the
high nibble, and one float32 ``absmax`` per block: ``W^T.flat[i] = NF4_CODEBOOK[code[i]] * absmax[i // block]``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SUPPORTED_BITS",
    "blob_size",
    "block_count",
    "default_zero_point",
    "dequantize",
    "NF4_CODEBOOK",
    "dequantize_bnb4",
    "pack_bnb4",
    "pack_codes",
    "pack_rows",
    "unpack_bnb4",
    "pack_zero_points",
    "unpack_codes",
    "unpack_zero_points",
]

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 8 // bits


def block_count(k: int, block_size: int) -> int:
    """How many blocks of ``block_size`` cover ``k`` values (the last one padded)."""
    return -(-k // block_size)


def blob_size(block_size: int, bits: int) -> int:
    """Bytes per packed block."""
    _check_bits(bits)
    if block_size * bits % 8:
        raise ValueError(f"block_size {block_size} with {bits} bits does not fill whole bytes")
    return block_size * bits // 8


def default_zero_point(bits: int) -> int:
    """The zero point MatMulNBits assumes without a zero_points input: the middle code."""
    _check_bits(bits)
    return 1 << (bits - 1)


def _pack_last_axis(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis (its length a multiple of ``8 / bits``), low bits first."""
    per_byte = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last axis {codes.shape[-1]} is not a multiple of {per_byte}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits})")
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] << np.uint8(i * bits)).astype(np.uint8)
    return packed


def _unpack_last_axis(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = _check_bits(bits)
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``uint8 [N, n_blocks, blob_size]`` from codes ``[N, K]`` (K padded here with the default zero point)."""
    n, k = codes.shape
    blocks = block_count(k, block_size)
    blob_size(block_size, bits)
    padded = np.full((n, blocks * block_size), default_zero_point(bits), np.uint8)
    padded[:, :k] = codes
    return _pack_last_axis(padded.reshape(n, blocks, block_size), bits)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [rows, cols * bits / 8]`` from codes ``[rows, cols]``, unpadded: ``GatherBlockQuantized``'s data
    (its blocks run along the row; a partial last block needs no padding there)."""
    return _pack_last_axis(codes, bits)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes ``uint8 [N, K]`` from ``[N, n_blocks, blob_size]`` (the padding dropped)."""
    n = packed.shape[0]
    return _unpack_last_axis(packed, bits).reshape(n, -1)[:, :k]


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [N * ceil(n_blocks * bits / 8)]`` from zero-point codes ``[N, n_blocks]`` (padded per column)."""
    per_byte = _check_bits(bits)
    n, blocks = zero_points.shape
    width = math.ceil(blocks / per_byte) * per_byte
    padded = np.full((n, width), default_zero_point(bits), np.uint8)
    padded[:, :blocks] = zero_points
    return _pack_last_axis(padded, bits).reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, blocks: int) -> np.ndarray:
    """Zero-point codes ``uint8 [N, n_blocks]`` from the packed vector."""
    return _unpack_last_axis(np.asarray(packed, np.uint8).reshape(n, -1), bits)[:, :blocks]


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, bits: int,
               block_size: int) -> np.ndarray:
    """The float32 weight ``W[K, N]`` that a MatMulNBits node computes with (the numpy reference)."""
    n = packed.shape[0]
    blocks = block_count(k, block_size)
    codes = _unpack_last_axis(packed, bits).reshape(n, blocks, block_size).astype(np.float32)
    scale = np.asarray(scales, np.float32).reshape(n, blocks, 1)
    if zero_points is None:
        zp = np.full((n, blocks, 1), default_zero_point(bits), np.float32)
    elif np.asarray(zero_points).dtype != np.uint8:  # float zero points, one per block
        zp = np.asarray(zero_points, np.float32).reshape(n, blocks, 1)
    else:
        zp = unpack_zero_points(zero_points, bits, n, blocks).astype(np.float32).reshape(n, blocks, 1)
    weight = ((codes - zp) * scale).reshape(n, blocks * block_size)[:, :k]
    return np.ascontiguousarray(weight.T)


#: the 16 NF4 values (QLoRA, Dettmers et al. 2023: quantiles of a standard normal, rescaled to [-1, 1], with 0)
NF4_CODEBOOK = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def pack_bnb4(codes: np.ndarray) -> np.ndarray:
    """``uint8 [ceil(N * K / 2)]`` from 4-bit codes ``[N, K]`` (flattened, first of each pair in the high nibble)."""
    flat = np.asarray(codes, np.uint8).reshape(-1)
    if flat.size and flat.max() > 15:
        raise ValueError("NF4 codes must lie in [0, 16)")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)


def unpack_bnb4(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Codes ``[N, K]`` from :func:`pack_bnb4`'s bytes."""
    packed = np.asarray(packed, np.uint8)
    flat = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n * k]
    return flat.reshape(n, k)


def dequantize_bnb4(packed: np.ndarray, absmax: np.ndarray, *, k: int, n: int, block_size: int) -> np.ndarray:
    """The float32 ``W[K, N]`` a MatMulBnb4 (NF4) node computes with (the numpy reference)."""
    flat = NF4_CODEBOOK[unpack_bnb4(packed, n, k).reshape(-1)]
    scale = np.repeat(np.asarray(absmax, np.float32), block_size)[:n * k]
    return np.ascontiguousarray((flat * scale).reshape(n, k).T)
