"""Blockwise weight grids for weight-only quantization: scales, zero points and round-to-nearest codes.

A weight ``W[K, N]`` (``Y = A @ W``) is cut into blocks of ``block_size`` consecutive values along K, one grid per
block and output column (the layout is :mod:`qcompiler.runtime.packing`'s). Grids, with ``b`` bits:

- symmetric: codes ``q`` in ``[0, 2^b)`` around the fixed zero point ``z = 2^(b-1)``; ``s = max|w| / (z - 0.5)``,
  so the largest magnitude lands on ``+-(z - 0.5)`` and rounds to the nearest code on either side: every value is
  within ``s / 2`` of its dequantized value (``max|w| / 7`` would waste the code ``-8``; ``max|w| / 8`` clips the
  positive side by up to ``s``);
- asymmetric, uint8 zero point: the range ``[min(w, 0), max(w, 0)]`` on ``2^b - 1`` steps, ``z = round(-min / s)``
  (a code, so the grid must contain 0 and is shifted by at most ``s / 2``);
- asymmetric, float zero point (``float_zero_point``): the block's own range ``[min w, max w]``, ``z = -min / s``:
  the grid is exactly ``min + s * q``, so weights that came from such a grid (a GGUF Q4_1 file) come back exactly;
- ternary (1.58-bit, BitNet b1.58's absmean): 2-bit codes restricted to ``{1, 2, 3}`` around ``z = 2``, i.e. the
  values ``{-s, 0, +s}``, with ``s = mean |w|`` over the block; a value rounds to ``+-s`` once ``|w| > s / 2``.

The grids and the algorithms on them are the same for any width from 1 to 8 bits; 3 bits (and the other widths
that MatMulNBits lacks) are packed for ``ai.qcompiler.MatMulIntN`` by :meth:`BlockwiseWeight.packed_intn`.

Values in the padding of the last block (K not a multiple of the block size) take no part in the ranges. A block
whose values are all equal gets ``s = |w| / (2^b - 1)`` (or 1 for zeros), so it is exact. Algorithms other than round-to-nearest
(GPTQ, AWQ, HQQ) choose codes on the same grids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.runtime import packing

__all__ = ["CHUNK_ELEMENTS", "BlockwiseWeight", "code_limits", "column_chunks", "codes_on_grid", "grid", "quantize_rtn",
           "resolve_block_size"]


def resolve_block_size(block_size: int, k: int) -> int:
    """``block_size``, or for 0 (one block per column) the smallest power of two from 16 that covers ``k``."""
    if block_size:
        return block_size
    size = 16
    while size < k:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class BlockwiseWeight:
    """Codes ``[N, K]``, scales ``[N, n_blocks]`` and zero-point codes ``[N, n_blocks]`` (None: symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B ``[N, n_blocks, blob]``, scales ``[N * n_blocks]``, zero points or None): MatMulNBits' inputs.

        Integer zero points are packed like the codes; float ones are a float32 ``[N * n_blocks]``."""
        if self.zero_points is None:
            zp = None
        elif self.zero_points.dtype == np.uint8:
            zp = packing.pack_zero_points(self.zero_points, self.bits)
        else:
            zp = np.ascontiguousarray(self.zero_points.reshape(-1), dtype=np.float32)
        return (packing.pack_codes(self.codes, self.bits, self.block_size),
                np.ascontiguousarray(self.scales.reshape(-1), dtype=np.float32), zp)

    def packed_intn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B ``[N, n_blocks, blob]``, scales ``[N * n_blocks]``, zero points, empty when symmetric): the inputs of
        ``ai.qcompiler.MatMulIntN`` in its generic packing (any bits from 1 to 8; uint8 zero points only)."""
        if self.zero_points is None:
            zp = np.zeros(0, np.uint8)
        elif self.zero_points.dtype == np.uint8:
            zp = packing.pack_zero_points_intn(self.zero_points, self.bits)
        else:
            raise ValueError("MatMulIntN stores uint8 zero points only, not float ones")
        return (packing.pack_codes_intn(self.codes, self.bits, self.block_size),
                np.ascontiguousarray(self.scales.reshape(-1), dtype=np.float32), zp)

    def dequantize(self, columns: slice = slice(None)) -> np.ndarray:
        """The float32 ``W[K, N]`` the codes stand for (or only its ``columns``)."""
        codes, scales = self.codes[columns], self.scales[columns]
        n, k = codes.shape
        blocks = scales.shape[1]
        pad = blocks * self.block_size - k
        zp = self.zero_points[columns] if self.zero_points is not None else \
            np.full(scales.shape, packing.middle_code(self.bits), np.uint8)
        codes = np.pad(codes, ((0, 0), (0, pad))).reshape(n, blocks, self.block_size).astype(np.float32)
        w = (codes - zp[..., None].astype(np.float32)) * scales[..., None]
        return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)

    def error_energies(self, weight: np.ndarray) -> tuple[float, float]:
        """(``sum w^2``, ``sum (w - w_q)^2``) against the float ``W[K, N]``, a slice of columns at a time."""
        signal = noise = 0.0
        for cols in column_chunks(weight.shape):
            w = weight[:, cols].astype(np.float64)
            signal += float(np.vdot(w, w))
            diff = w - self.dequantize(cols)
            noise += float(np.vdot(diff, diff))
        return signal, noise


#: elements of a weight processed at once (float64 temporaries of 32 MB): large weights go a slice of columns at a
#: time, so quantizing a 256 MB weight costs tens of MB of working memory, not several copies of it
CHUNK_ELEMENTS = 1 << 22


def column_chunks(shape: tuple[int, int]) -> list[slice]:
    """Slices of the columns of a ``[K, N]`` weight with at most about :data:`CHUNK_ELEMENTS` values each."""
    k, n = shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _blocks(weight: np.ndarray, block_size: int, fill: float = 0.0) -> np.ndarray:
    """``W[K, N]`` as ``[N, n_blocks, block_size]`` float64, the padding ``fill``."""
    k, n = weight.shape
    blocks = packing.block_count(k, block_size)
    padded = np.full((n, blocks * block_size), fill, np.float64)
    padded[:, :k] = weight.T
    return padded.reshape(n, blocks, block_size)


def code_limits(bits: int, ternary: bool = False) -> tuple[int, int]:
    """The smallest and largest code: ``[0, 2^b - 1]``, or ``[1, 3]`` for ternary (2-bit storage)."""
    return (1, 3) if ternary else (0, (1 << bits) - 1)


def _check_ternary(bits: int, symmetric: bool, float_zero_point: bool) -> None:
    if bits != 2 or not symmetric or float_zero_point:
        raise ValueError("ternary blocks are 2-bit and symmetric (one absmean scale per block, no zero point)")


def grid(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
         float_zero_point: bool = False, ternary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scales ``[N, n_blocks]`` (float32) and zero points ``[N, n_blocks]`` (uint8 codes, or float32)."""
    blocks = _blocks(weight, block_size, np.nan)
    top = (1 << bits) - 1
    if ternary:
        _check_ternary(bits, symmetric, float_zero_point)
        scale = np.nanmean(np.abs(blocks), axis=2)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.full(scale.shape, 2, np.uint8)
    if symmetric:
        middle = 1 << (bits - 1)
        scale = np.nanmax(np.abs(blocks), axis=2) / (middle - 0.5)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.full(scale.shape, middle, np.uint8)
    low, high = np.nanmin(blocks, axis=2), np.nanmax(blocks, axis=2)
    if not float_zero_point:  # a uint8 zero point lies in [0, 2^b - 1]: the grid must then contain 0
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    flat = high - low <= 0
    scale = np.where(flat, np.abs(low) / top, (high - low) / top)
    scale = np.where(scale > 0, scale, 1.0)
    exact = -low / scale
    if float_zero_point:
        return scale.astype(np.float32), exact.astype(np.float32)
    return scale.astype(np.float32), np.clip(np.rint(exact), 0, top).astype(np.uint8)


def codes_on_grid(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, block_size: int,
                  ternary: bool = False) -> np.ndarray:
    """Round-to-nearest codes ``[N, K]`` of ``W[K, N]`` on the given grids (clipped to :func:`code_limits`)."""
    k = weight.shape[0]
    blocks = _blocks(weight, block_size)
    q = np.rint(blocks / scale[..., None].astype(np.float64) + zero[..., None].astype(np.float64))
    q = np.clip(q, *code_limits(bits, ternary)).astype(np.uint8)
    return q.reshape(q.shape[0], -1)[:, :k]


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 float_zero_point: bool = False, ternary: bool = False) -> BlockwiseWeight:
    """Round every value of ``W[K, N]`` to the nearest code of its block's grid (columns in bounded slices)."""
    codes, scales, zeros = [], [], []
    for cols in column_chunks(weight.shape):
        part = weight[:, cols]
        scale, zero = grid(part, bits, block_size, symmetric, float_zero_point, ternary)
        codes.append(codes_on_grid(part, scale, zero, bits, block_size, ternary))
        scales.append(scale)
        zeros.append(zero)
    joined = (np.concatenate(x, axis=0) if len(x) > 1 else x[0] for x in (codes, scales, zeros))
    codes_all, scale_all, zero_all = joined
    return BlockwiseWeight(codes_all, scale_all, None if symmetric else zero_all, bits, block_size)
