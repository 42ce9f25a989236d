"""Numpy kernels of the ``ai.qcompiler`` ops; the onnxruntime-extensions PyOps run exactly these.

``matmul_intn``: ``Y = A @ W + bias`` with ``W[K, N]`` dequantized from MatMulIntN's blockwise codes (any width
from 1 to 8 bits, :func:`qcompiler.runtime.packing.dequantize_intn`'s formula). ``matmul_fp8``: ``Y = (A @
E4M3FN(W)) * scale + bias`` from the bytes of ``W^T``: the per-column scale is applied after the product, so the
float weight is only a 256-entry table lookup. Both take ``A`` of any rank ``[..., K]`` and return float32
``[..., N]``; an empty ``zero_points`` means the middle code and an empty ``bias`` means none (PyOps cannot have
optional inputs). They are checked against the dequantize-then-matmul references of :mod:`~qcompiler.runtime.packing`.

How, and what it costs: both weights are stored as ``W^T`` rows (one per output column), so the kernels dequantize
a slice of rows at a time (:data:`CHUNK_VALUES` values) into a reused float32 scratch and write that slice's BLAS
product ``W^T[slice] @ A^T`` straight into rows of ``Y^T``. The MatMulIntN codes are unpacked through a table
(:func:`~qcompiler.runtime.packing.intn_table`: 12 bits at a time) and scaled in one pass; the zero points come in
once at the end as ``(zero * scale) @ (block sums of A)^T``. Every temporary lives in a per-thread workspace that
the next call reuses: measured inside ONNX Runtime, allocating them afresh made glibc map new pages on each call,
up to 4x slower at 8 tokens. Nothing else is kept between calls (no float copy of a weight), so every call pays the
unpacking of the whole weight: at a few tokens that dominates, where the native kernels work on the codes directly.
"""

from __future__ import annotations

import threading

import numpy as np

from qcompiler.runtime import packing

__all__ = ["CHUNK_VALUES", "matmul_fp8", "matmul_intn"]

#: weight values dequantized at once (a 1 MiB float32 scratch per thread)
CHUNK_VALUES = 1 << 18


class _Workspace(threading.local):
    """Flat scratch buffers by name, grown when a call needs more, reused by the next call of the same thread."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, size: int, dtype: type) -> np.ndarray:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != np.dtype(dtype):
            buffer = self.buffers[name] = np.empty(size, dtype)
        return buffer[:size]


_WORK = _Workspace()


def _rows(a: np.ndarray, k: int, op: str) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.ndim < 1 or a.shape[-1] != k:
        raise ValueError(f"{op}: input A must end in K={k}, got shape {list(a.shape)}")
    return a.reshape(-1, k)


def _bias(bias: np.ndarray, n: int, op: str) -> np.ndarray | None:
    bias = np.asarray(bias, np.float32).reshape(-1)
    if bias.size not in (0, n):
        raise ValueError(f"{op}: bias must be empty or hold N={n} values, got {bias.size}")
    return bias if bias.size else None


def _unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``uint8`` (flat) of packed bytes, :func:`packing.unpack_intn`'s method with workspace buffers."""
    flat = packed.reshape(-1)
    groups = flat.size // bits
    width = 4 if bits <= 4 else 8
    padded = _WORK.take("bytes", flat.size + width - bits, np.uint8)
    padded[:flat.size] = flat
    padded[flat.size:] = 0
    words = np.ndarray((groups,), dtype=f"<u{width}", buffer=padded, strides=(bits,))
    per_piece, table = packing.intn_table(bits)
    pieces = 8 // per_piece
    shifted = _WORK.take(f"words{width}", groups, words.dtype)
    mask = words.dtype.type((1 << (per_piece * bits)) - 1)
    if per_piece == 1:
        index = _WORK.take("codes", groups * 8, np.uint8).reshape(groups, 8)
    else:
        index = _WORK.take("index", groups * pieces, np.intp).reshape(groups, pieces)
    for j in range(pieces):
        np.right_shift(words, words.dtype.type(j * per_piece * bits), out=shifted)
        np.bitwise_and(shifted, mask, out=index[:, j], casting="unsafe")
    if per_piece == 1:
        return index.reshape(-1)
    codes = _WORK.take("codes", groups * 8, np.uint8)
    np.take(table, index, out=codes.view(table.dtype).reshape(groups, pieces))
    return codes


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], op: str) -> None:
    if array.shape != shape:
        raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(array.shape)}")


def matmul_intn(a: np.ndarray, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bias: np.ndarray, *,
                K: int, N: int, bits: int, block_size: int) -> np.ndarray:
    """``A[..., K] @ W[K, N] (+ bias)`` over MatMulIntN's packed ``b [N, n_blocks, blob]`` (see packing)."""
    op = "MatMulIntN"
    rows = _rows(a, K, op)
    blocks = packing.block_count(K, block_size)
    blob = packing.intn_blob_size(block_size, bits)
    b = np.ascontiguousarray(b, np.uint8)
    _check("packed weight [N, n_blocks, blob]", b, (N, blocks, blob), op)
    scales = np.asarray(scales, np.float32).reshape(-1)
    if scales.size != N * blocks:
        raise ValueError(f"{op}: scales must hold N * n_blocks = {N * blocks} values, got {scales.size}")
    scales = scales.reshape(N, blocks)
    zero_points = np.asarray(zero_points, np.uint8)
    if zero_points.size:
        zero = packing.unpack_zero_points_intn(zero_points, bits, N, blocks).astype(np.float32)
    else:
        zero = np.full((N, blocks), packing.middle_code(bits), np.float32)
    extra = _bias(bias, N, op)
    width = blocks * block_size
    step = max(1, CHUNK_VALUES // width)  # rows of W^T at once
    y_t = np.empty((N, rows.shape[0]), np.float32)
    scratch = _WORK.take("weight", min(step, N) * width, np.float32)
    for start in range(0, N, step):
        stop = min(start + step, N)
        codes = _unpack_codes(b[start:stop], bits).reshape(stop - start, blocks, block_size)
        part = scratch[:(stop - start) * width].reshape(stop - start, blocks, block_size)
        np.multiply(codes, scales[start:stop, :, None], out=part)  # q * s; the zero points come in below
        np.matmul(part.reshape(stop - start, width)[:, :K], rows.T, out=y_t[start:stop])
    sums = np.zeros((rows.shape[0], width), np.float32)
    sums[:, :K] = rows
    y_t -= (zero * scales) @ sums.reshape(-1, blocks, block_size).sum(axis=2).T
    if extra is not None:
        y_t += extra[:, None]
    return np.ascontiguousarray(y_t.T).reshape(*np.shape(a)[:-1], N)


def matmul_fp8(a: np.ndarray, b: np.ndarray, scale: np.ndarray, bias: np.ndarray, *, K: int,
               N: int) -> np.ndarray:
    """``(A[..., K] @ W[K, N]) * scale[N] (+ bias)`` over the FP8 E4M3FN bytes of ``W^T``: ``b uint8 [N, K]``."""
    op = "MatMulFp8"
    rows = _rows(a, K, op)
    b = np.ascontiguousarray(b, np.uint8)
    _check("weight codes W^T [N, K]", b, (N, K), op)
    scale = np.asarray(scale, np.float32).reshape(-1)
    if scale.size != N:
        raise ValueError(f"{op}: scale must hold N={N} values, got {scale.size}")
    extra = _bias(bias, N, op)
    step = max(1, CHUNK_VALUES // max(K, 1))
    y_t = np.empty((N, rows.shape[0]), np.float32)
    scratch = _WORK.take("weight", min(step, N) * K, np.float32)
    for start in range(0, N, step):
        stop = min(start + step, N)
        part = scratch[:(stop - start) * K].reshape(stop - start, K)
        index = _WORK.take("fp8_index", (stop - start) * K, np.intp).reshape(stop - start, K)
        index[...] = b[start:stop]
        np.take(packing.E4M3FN_VALUES, index, out=part)
        np.matmul(part, rows.T, out=y_t[start:stop])
    y_t *= scale[:, None]
    if extra is not None:
        y_t += extra[:, None]
    return np.ascontiguousarray(y_t.T).reshape(*np.shape(a)[:-1], N)
