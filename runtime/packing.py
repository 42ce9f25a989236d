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

``ai.qcompiler.MatMulIntN`` (our custom op, :mod:`qcompiler.runtime.custom_ops`, for the bit widths MatMulNBits
lacks on CPU, 3 above all) keeps MatMulNBits' arrangement ``[N, n_blocks, blob_size]`` with a generic packing for
any ``bits`` from 1 to 8: each run of 8 consecutive codes is one ``8 * bits``-bit little-endian integer (code ``i``
at bit ``i * bits``) stored as ``bits`` bytes, so ``block_size`` is a multiple of 8 and ``blob_size = block_size *
bits / 8``. For 2, 4 and 8 bits this is byte for byte MatMulNBits' packing. Zero-point codes ``[N, n_blocks]`` are
packed the same way per column after padding ``n_blocks`` up to a multiple of 8 with the middle code ``2^(bits-1)``:
``uint8 [N * ceil(n_blocks / 8) * bits]``; an empty tensor (or None) means the middle code. Dequantization is
MatMulNBits' formula.

``ai.qcompiler.MatMulFp8`` stores FP8 E4M3FN weights (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
infinities, ``S.1111.111`` is NaN) as the raw bytes of ``W^T``, ``uint8 [N, K]`` (rows per output column, like
MatMulNBits' ``B``), with one float32 scale per output column: ``W[k, n] = E4M3FN_VALUES[code[n, k]] * scale[n]``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "SUPPORTED_BITS",
    "blob_size",
    "block_count",
    "default_zero_point",
    "dequantize",
    "dequantize_fp8",
    "dequantize_intn",
    "E4M3FN_VALUES",
    "INTN_BITS",
    "intn_blob_size",
    "intn_table",
    "middle_code",
    "NF4_CODEBOOK",
    "dequantize_bnb4",
    "pack_bnb4",
    "pack_codes",
    "unpack_rows",
    "pack_codes_intn",
    "pack_intn",
    "pack_rows",
    "pack_zero_points_intn",
    "unpack_codes_intn",
    "unpack_intn",
    "unpack_zero_points_intn",
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


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[rows, cols]`` from :func:`pack_rows`' bytes."""
    return _unpack_last_axis(np.asarray(packed).view(np.uint8), bits)


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
    if zero_points is None:
        zp = np.full((n, blocks), default_zero_point(bits), np.float32)
    elif np.asarray(zero_points).dtype != np.uint8:  # float zero points, one per block
        zp = np.asarray(zero_points, np.float32).reshape(n, blocks)
    else:
        zp = unpack_zero_points(zero_points, bits, n, blocks)
    return _scaled_weight(_unpack_last_axis(packed, bits), scales, zp, k=k, block_size=block_size)


def _scaled_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, k: int,
                   block_size: int) -> np.ndarray:
    """``W[K, N] = (codes - zp) * scale`` from codes ``[N, n_blocks * block_size]`` (padded) and per-block scales
    and zero points ``[N, n_blocks]`` (any real dtype): the tail shared by the MatMulNBits and MatMulIntN
    references."""
    n = codes.shape[0]
    blocks = block_count(k, block_size)
    values = codes.reshape(n, blocks, block_size).astype(np.float32)
    zp = np.asarray(zero_points, np.float32).reshape(n, blocks, 1)
    scale = np.asarray(scales, np.float32).reshape(n, blocks, 1)
    weight = ((values - zp) * scale).reshape(n, blocks * block_size)[:, :k]
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


# -- the generic 1..8-bit packing of ai.qcompiler.MatMulIntN ---------------------------------------------------------

#: the bit widths of MatMulIntN's generic packing
INTN_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_intn_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in INTN_BITS:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def middle_code(bits: int) -> int:
    """The zero point of symmetric codes of any width from 1 to 8 bits: ``2^(bits-1)``."""
    _check_intn_bits(bits)
    return 1 << (bits - 1)


def intn_blob_size(block_size: int, bits: int) -> int:
    """Bytes per packed block of MatMulIntN (``block_size`` a positive multiple of 8)."""
    _check_intn_bits(bits)
    if block_size <= 0 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
    return block_size * bits // 8


def pack_intn(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis (a multiple of 8 long): 8 codes per ``bits`` bytes, little-endian."""
    _check_intn_bits(bits)
    codes = np.asarray(codes)
    if codes.shape[-1] % 8:
        raise ValueError(f"last axis {codes.shape[-1]} is not a multiple of 8")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits})")
    groups = codes.reshape(-1, 8).astype(np.uint64)
    words = np.zeros(groups.shape[0], np.uint64)
    for i in range(8):
        words |= groups[:, i] << np.uint64(i * bits)
    packed = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(packed).reshape(*codes.shape[:-1], codes.shape[-1] // 8 * bits)


@functools.cache
def intn_table(bits: int) -> tuple[int, np.ndarray]:
    """(codes per piece ``c``, table): the ``c`` codes of every ``c * bits``-bit piece as ``c`` bytes of one word
    (``c`` divides 8, ``c * bits`` at most 12, so the table has at most 4096 entries)."""
    per_piece = next(c for c in (8, 4, 2, 1) if c * bits <= 12)
    values = np.arange(1 << (per_piece * bits), dtype=np.uint64)
    table = np.zeros(values.size, np.uint64)
    for i in range(per_piece):
        table |= ((values >> np.uint64(i * bits)) & np.uint64((1 << bits) - 1)) << np.uint64(8 * i)
    return per_piece, table.astype(f"<u{per_piece}")


def unpack_intn(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``uint8 [..., L]`` from :func:`pack_intn`'s bytes ``[..., L * bits / 8]``.

    Each group of ``bits`` bytes is read as one little-endian word (an unaligned strided view, no copy but one
    padded buffer), cut into pieces of up to 12 bits, and each piece's codes come from a table as whole bytes."""
    _check_intn_bits(bits)
    packed = np.asarray(packed, np.uint8)
    if packed.shape[-1] % bits:
        raise ValueError(f"last axis {packed.shape[-1]} is not a multiple of {bits} bytes")
    groups = packed.size // bits
    width = 4 if bits <= 4 else 8  # the word read at each group: its first `bits` bytes are the group
    buffer = np.zeros(packed.size + width - bits, np.uint8)
    buffer[:packed.size] = packed.reshape(-1)
    words = np.ndarray((groups,), dtype=f"<u{width}", buffer=buffer, strides=(bits,))
    per_piece, table = intn_table(bits)
    pieces = 8 // per_piece
    mask = words.dtype.type((1 << (per_piece * bits)) - 1)
    out = np.empty((groups, pieces), np.uint8 if per_piece == 1 else np.intp)  # codes, or pieces to look up
    for j in range(pieces):
        np.bitwise_and(words >> words.dtype.type(j * per_piece * bits), mask, out=out[:, j], casting="unsafe")
    codes = out if per_piece == 1 else np.take(table, out).view(np.uint8)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] // bits * 8)


def pack_codes_intn(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``uint8 [N, n_blocks, blob_size]`` from codes ``[N, K]`` (K padded here with the middle code)."""
    intn_blob_size(block_size, bits)
    n, k = codes.shape
    blocks = block_count(k, block_size)
    padded = np.full((n, blocks * block_size), middle_code(bits), np.uint8)
    padded[:, :k] = codes
    return pack_intn(padded.reshape(n, blocks, block_size), bits)


def unpack_codes_intn(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes ``uint8 [N, K]`` from ``[N, n_blocks, blob_size]`` (the padding dropped)."""
    n = packed.shape[0]
    return unpack_intn(packed, bits).reshape(n, -1)[:, :k]


def pack_zero_points_intn(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [N * ceil(n_blocks / 8) * bits]`` from zero-point codes ``[N, n_blocks]`` (padded per column)."""
    n, blocks = zero_points.shape
    padded = np.full((n, -(-blocks // 8) * 8), middle_code(bits), np.uint8)
    padded[:, :blocks] = zero_points
    return pack_intn(padded, bits).reshape(-1)


def unpack_zero_points_intn(packed: np.ndarray, bits: int, n: int, blocks: int) -> np.ndarray:
    """Zero-point codes ``uint8 [N, n_blocks]`` from :func:`pack_zero_points_intn`'s vector."""
    expected = n * -(-blocks // 8) * bits
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size != expected:
        raise ValueError(f"zero points: expected {expected} bytes for N={n}, {blocks} blocks, {bits} bits, "
                         f"got {packed.size}")
    return unpack_intn(packed.reshape(n, -1), bits)[:, :blocks]


def dequantize_intn(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, bits: int,
                    block_size: int) -> np.ndarray:
    """The float32 ``W[K, N]`` a MatMulIntN node computes with (the numpy reference)."""
    n = packed.shape[0]
    blocks = block_count(k, block_size)
    if zero_points is None or np.asarray(zero_points).size == 0:
        zp = np.full((n, blocks), middle_code(bits), np.float32)
    else:
        zp = unpack_zero_points_intn(zero_points, bits, n, blocks)
    return _scaled_weight(unpack_intn(packed, bits).reshape(n, -1), scales, zp, k=k, block_size=block_size)


# -- FP8 E4M3FN weights of ai.qcompiler.MatMulFp8 --------------------------------------------------------------------


def _e4m3fn_values() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0x0F, codes & 0x07
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8.0 * 2.0 ** -6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


#: the float32 value of each of the 256 FP8 E4M3FN bytes (two NaNs, no infinities, largest finite 448)
E4M3FN_VALUES = _e4m3fn_values()


def dequantize_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 ``W[K, N]`` a MatMulFp8 node computes with, from the bytes of ``W^T`` ``[N, K]`` and
    ``scale[N]``."""
    weight_t = E4M3FN_VALUES[np.asarray(codes, np.uint8)] * np.asarray(scale, np.float32)[:, None]
    return np.ascontiguousarray(weight_t.T)
