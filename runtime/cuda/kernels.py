"""Triton kernels for weight-only matmuls ``Y[M, N] = A[M, K] @ W[K, N]`` over qcompiler's packed layouts.

The kernels read the initializers exactly as :mod:`qcompiler.runtime.packing` writes them (no repacking):

- ``com.microsoft.MatMulNBits`` (bits 2, 4, 8; block sizes 16-256, powers of two): ``packed`` uint8
  ``[N, n_blocks, blob_size]`` (codes along K, low bits first), ``scales`` float32 or float16 ``[N * n_blocks]``,
  zero points absent (the middle code ``2^(bits-1)``), packed uint8 ``[N * ceil(n_blocks * bits / 8)]`` or float
  ``[N * n_blocks]``; ``W[k, n] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]``.
- ``com.microsoft.MatMulBnb4`` (NF4): ``packed`` uint8 ``[ceil(N * K / 2)]`` over ``W^T`` flattened, first code of
  a byte in the high nibble, ``absmax`` float ``[ceil(N * K / bs)]``; ``W^T.flat[i] = NF4[code[i]] * absmax[i // bs]``.

Each row ``n`` of ``packed`` is contiguous along K, so a kernel reads it as 32-bit words (``PW = 32 / bits`` codes
a word, little-endian, so code ``j`` of a word sits at bit ``j * bits``) with 16-byte loads.

Two kernels, chosen by M (for one float16 token of a 4- or 8-bit weight, :func:`matmul_nbits` first takes the
CUDA C++ GEMV of :mod:`qcompiler.runtime.cuda.gemv_cuda` where it compiles: 1.3-1.6x faster on an H200):

- ``M == 1`` (:func:`_gemv_kernel`, memory-bound, CUDA cores): each program owns ``BLOCK_N`` rows and a K range
  (split-K); each thread holds one word of each of its rows, so the code ``j`` of every word is one register tile
  and the activations of that column arrive in the same layout (for 4 bits one 16-byte load of the word's 8
  activations, split in registers). Per word it accumulates ``sum_j q_j a_j`` and ``sum_j a_j`` in float32 and adds
  ``scale * (sum q*a - zp * sum a)``, so the zero point costs nothing per code. Codes become floats without
  int-to-float conversions: ``(word & (mask << p)) | 0x4B000000`` (one ``lop3``) is the float32 ``2^23 + q 2^p``
  (exact while ``q 2^p < 2^23``), one subtraction gives ``q 2^p``, and the activation is pre-multiplied by
  ``2^-p`` (exact); the high codes of a word are shifted down once. The next step's words, scales and zero points
  are loaded before this step's arithmetic (software prefetch). NF4 codes index the 16-entry codebook (a gather
  from a 64-byte table).
- ``M > 1`` (:func:`_mm_kernel`, tiles and ``tl.dot``): the transposed product ``Y^T = W^T A^T`` is computed per
  ``[BLOCK_N, BLOCK_M]`` tile (the weight is the dot's left operand, so a 16-token tile still fills the matrix
  unit's 64-row side). The weight tile is dequantized in registers to the activation dtype: ``(q - zp)`` exactly,
  then either scaled per code before the dot (``scale_w``) or, when a K step lies inside one quantization block,
  the dot's float32 result is scaled per row. The int4 path may use inline PTX (``use_asm``; float16 activations,
  integer zero points): two codes a ``lop3`` into the float16 pattern ``0x6400 | q`` (``1024 + q``), then one
  ``f16x2`` subtraction gives ``q - zp`` for two codes at once.

Both kernels can split K across programs (``split_k``): partial sums go to a float32 workspace with atomic adds;
the last program of an output tile (an atomic counter says which) reads the total, writes the output and resets
the workspace and the counter to zero, so a call is one launch and the workspace stays zero between calls. The
workspace is per device: calls that use split-K must not run concurrently on several streams of one device.

Limits: activations float16 or bfloat16 (float32 is cast to float16, except a single token: the GEMV reads
float32 activations as they are and writes float32), ``[..., K]`` with any leading dims; weights
on the same CUDA device; accumulation in float32, output in the activation dtype. NF4 needs ``K % 8 == 0``,
``K % block_size == 0`` and a power-of-two ``block_size >= 8`` for the kernels (every block inside one row);
other NF4 shapes are dequantized with torch ops and multiplied with ``torch.matmul`` (correct, slower).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch
import triton
import triton.language as tl

from qcompiler.runtime import packing
from qcompiler.runtime.cuda import gemv_cuda
from qcompiler.runtime.cuda.dequant import codebook as _codebook
from qcompiler.runtime.cuda.dequant import dequantize_bnb4, dequantize_nbits, to_device

__all__ = [
    "KernelConfig",
    "default_config",
    "dequantize_bnb4",
    "dequantize_nbits",
    "matmul_bnb4",
    "matmul_nbits",
    "to_device",
]

logger = logging.getLogger(__name__)

_F32_MAGIC = 0x4B000000  # the float32 bits of 2^23: OR-ing q < 2^23 into the mantissa gives 2^23 + q
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _direct_codes(bits: int) -> int:
    """How many low codes of a word fit the float32 mantissa trick in place (``(2^bits - 1) * 2^(j*bits) < 2^23``)."""
    j = 0
    while j < 32 // bits and ((1 << bits) - 1) << (j * bits) < 1 << 23:
        j += 1
    return j


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs, mask, tile, SPLIT_K: tl.constexpr):
    """Store ``acc`` (float32) to ``y``, or with split-K add it to the workspace; the tile's last program stores."""
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptr + offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == SPLIT_K - 1:  # the others' sums are in: read them at L2, reset for the next call
            total = tl.atomic_add(ws_ptr + offs, tl.zeros_like(acc), mask=mask)
            tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(ws_ptr + offs, tl.zeros_like(acc), mask=mask)
            tl.store(cnt_ptr + tile, 0)


@triton.jit
def _block_params(s_ptr, z_ptr, rows, blk, mask, n_blocks, zp_row_bytes, BITS: tl.constexpr, ZP_MODE: tl.constexpr):
    """Scales and zero points (float32) of blocks ``blk`` of rows ``rows`` (broadcastable index tensors)."""
    s = tl.load(s_ptr + rows * n_blocks + blk, mask=mask, other=0.0).to(tl.float32)
    if ZP_MODE == 0:  # no zero points: the middle code
        zp = tl.zeros_like(s) + (1 << (BITS - 1))
    elif ZP_MODE == 1:  # packed codes, bits wide, low bits first
        bit = blk * BITS
        zb = tl.load(z_ptr + rows * zp_row_bytes + bit // 8, mask=mask, other=0).to(tl.int32)
        zp = ((zb >> (bit % 8)) & ((1 << BITS) - 1)).to(tl.float32)
    else:  # float zero points, one per block
        zp = tl.load(z_ptr + rows * n_blocks + blk, mask=mask, other=0.0).to(tl.float32)
    return s, zp


@triton.jit
def _magic(words, sel: tl.constexpr, USE_ASM: tl.constexpr):
    """``q * 2^p`` (float32, exact) for the code under mask ``sel`` (bits ``p..``) of each word."""
    if USE_ASM:  # one lop3 for (w & sel) | 2^23 (LLVM's and + or become two)
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x4b000000, 0xea;", "=r,r,r",
                                         [words, tl.zeros_like(words) + sel], dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (words & sel) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _pick8(jj: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    if jj == 0:
        return a0
    elif jj == 1:
        return a1
    elif jj == 2:
        return a2
    elif jj == 3:
        return a3
    elif jj == 4:
        return a4
    elif jj == 5:
        return a5
    elif jj == 6:
        return a6
    else:
        return a7


@triton.jit
def _gemv_loads(w_ptr, s_ptr, z_ptr, rows, n_mask, wofs, valid, row_words, n_blocks, zp_row_bytes,
                BITS: tl.constexpr, WPB: tl.constexpr, ZP_MODE: tl.constexpr, EVEN: tl.constexpr):
    """One step's words ``[BLOCK_N, BKW]`` and the scales and zero points of their blocks (``valid``: a step)."""
    if EVEN:  # no tails: only the step past the last is masked
        mask = ((rows * 0 + wofs[None, :] * 0) == 0) & valid
    else:
        mask = (n_mask[:, None] & (wofs < row_words)[None, :]) & valid
    words = tl.load(w_ptr + rows * row_words + wofs[None, :], mask=mask, other=0)
    s, zp = _block_params(s_ptr, z_ptr, rows, (wofs // WPB)[None, :], mask, n_blocks, zp_row_bytes, BITS, ZP_MODE)
    return words, s, zp


@triton.jit(do_not_specialize=["row_words"])
def _gemv_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, ws_ptr, cnt_ptr,
    K, N, n_blocks, row_words, zp_row_bytes, iters_per_split,
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, ZP_MODE: tl.constexpr, NF4: tl.constexpr, J1: tl.constexpr,
    BLOCK_N: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr, A_VEC: tl.constexpr,
):
    """``y[n] = sum_k a[k] W[k, n]`` for one token: ``BLOCK_N`` rows, ``BKW`` words of each per step.

    Every tensor is 2-D ``[BLOCK_N, BKW]`` (or a slice of it), one word a thread per row: the code ``j`` of all
    words is one tensor (``PW`` of them, unrolled), and activation ``a[k]`` of the words' column ``k // PW`` comes
    with a strided load into the same layout, so no data moves between threads until the final reduction.
    (``row_words`` is not specialized, so Triton makes no 16-byte loads, which would put 4 words in a thread.)
    ``EVEN_N``/``EVEN_K``: no row or K tail (no masks).
    """
    PW: tl.constexpr = 32 // BITS  # codes per 32-bit word
    WPB: tl.constexpr = BLOCK_SIZE // PW  # words per quantization block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n[:, None]
    offs_w = tl.arange(0, BKW)
    acc = tl.zeros([BLOCK_N, BKW], tl.float32)
    # software prefetch: the next step's words, scales and zero points are loaded before this step's arithmetic
    wofs = pid_k * iters_per_split * BKW + offs_w
    words, s, zp = _gemv_loads(w_ptr, s_ptr, z_ptr, rows, n_mask, wofs, iters_per_split > 0, row_words, n_blocks,
                               zp_row_bytes, BITS, WPB, ZP_MODE, EVEN_N and EVEN_K)
    for it in range(0, iters_per_split):
        nofs = wofs + BKW
        words_n, s_n, zp_n = _gemv_loads(w_ptr, s_ptr, z_ptr, rows, n_mask, nofs, it + 1 < iters_per_split,
                                         row_words, n_blocks, zp_row_bytes, BITS, WPB, ZP_MODE, EVEN_N and EVEN_K)
        high = words >> (J1 * BITS)  # codes J1.. moved down, so that every code fits the mantissa trick
        part = tl.zeros([BLOCK_N, BKW], tl.float32)
        asum = tl.zeros([BKW], tl.float32)
        if A_VEC:  # 4-bit: the 8 activations of each word in one 16-byte load, split in registers
            kidx = wofs[:, None] * PW + tl.arange(0, PW)[None, :]
            if EVEN_K:
                av = tl.load(a_ptr + kidx)
            else:
                av = tl.load(a_ptr + kidx, mask=kidx < K, other=0.0)
            e, o = tl.split(tl.reshape(av, [BKW, 4, 2]))
            e0, e1 = tl.split(tl.reshape(e, [BKW, 2, 2]))
            o0, o1 = tl.split(tl.reshape(o, [BKW, 2, 2]))
            a0, a4 = tl.split(e0)
            a2, a6 = tl.split(e1)
            a1, a5 = tl.split(o0)
            a3, a7 = tl.split(o1)
        for jj in tl.static_range(PW):
            if A_VEC:
                aj = _pick8(jj, a0, a1, a2, a3, a4, a5, a6, a7).to(tl.float32)
            else:
                kj = wofs * PW + jj
                if EVEN_K:
                    aj = tl.load(a_ptr + kj).to(tl.float32)
                else:
                    aj = tl.load(a_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
            if NF4:  # byte jj // 2, the first code in the high nibble
                v = tl.load(cb_ptr + ((words >> (8 * (jj // 2) + 4 * (1 - jj % 2))) & 15))
                part += v * aj[None, :]
            else:
                if jj < J1:
                    q = _magic(words, ((1 << BITS) - 1) << (jj * BITS), USE_ASM)
                    part += q * (aj * (1.0 / (1 << (jj * BITS))))[None, :]
                else:
                    q = _magic(high, ((1 << BITS) - 1) << ((jj - J1) * BITS), USE_ASM)
                    part += q * (aj * (1.0 / (1 << ((jj - J1) * BITS))))[None, :]
                asum += aj
        if NF4:
            acc += s * part
        else:
            acc += s * (part - zp * asum[None, :])
        words, s, zp, wofs = words_n, s_n, zp_n, nofs
    _finish(tl.sum(acc, axis=1), y_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, SPLIT_K)


@triton.jit
def _codes_asm(words, zi, BITS: tl.constexpr):
    """The codes of each word minus the zero point ``zi`` (int32, broadcast to ``words``), as float16 (exact),
    joined in code order: ``[..., 2, 2, ...]`` with ``32 / BITS`` values per word.

    Two codes a ``lop3`` (or ``prmt`` for 8 bits) become the float16 pair ``0x6400 | q << s`` (``1024 + q 2^s``),
    and one ``f16x2`` subtraction or fused multiply-add by ``2^-s`` gives ``q - zp`` for both.
    """
    if BITS == 8:  # prmt: bytes 0/1 and 2/3 under 0x64
        zb = 0x6400 + zi
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 lo, hi;
            prmt.b32 lo, $4, 0x64646464, 0x4140;
            prmt.b32 hi, $4, 0x64646464, 0x4342;
            sub.f16x2 lo, lo, $5;
            sub.f16x2 hi, hi, $5;
            mov.b32 {$0, $1}, lo;
            mov.b32 {$2, $3}, hi;
            }
            """,
            constraints="=h,=h,=h,=h,r,r",
            args=[words, (zb << 16) | zb],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
        return tl.join(tl.join(c0, c2), tl.join(c1, c3))
    elif BITS == 4:  # codes 0/4 and 1/5 (x16), then 2/6 and 3/7 after a shift by 8
        zb = 0x6400 + zi  # 1024 + zp
        zh = 0xD400 + 16 * zi  # -(64 + zp)
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t, lo, hi, sx;
            mov.b32 sx, 0x2c002c00;
            lop3.b32 lo, $8, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 hi, $8, 0x00f000f0, 0x64006400, 0xea;
            sub.f16x2 lo, lo, $9;
            fma.rn.f16x2 hi, hi, sx, $10;
            mov.b32 {$0, $4}, lo;
            mov.b32 {$1, $5}, hi;
            shr.u32 t, $8, 8;
            lop3.b32 lo, t, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 hi, t, 0x00f000f0, 0x64006400, 0xea;
            sub.f16x2 lo, lo, $9;
            fma.rn.f16x2 hi, hi, sx, $10;
            mov.b32 {$2, $6}, lo;
            mov.b32 {$3, $7}, hi;
            }
            """,
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
            args=[words, (zb << 16) | zb, (zh << 16) | zh],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
        return tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:  # 2 bits: codes i/8+i at bit 2i (x4^i), i < 4; then 4..7/12..15 after a shift by 8
        z0 = 0xE400 + zi  # -(1024 + zp)
        z1 = 0xDC00 + 4 * zi  # -(256 + zp)
        z2 = 0xD400 + 16 * zi  # -(64 + zp)
        z3 = 0xCC00 + 64 * zi  # -(16 + zp)
        (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15) = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t, x, s0, s1, s2, s3;
            mov.b32 s0, 0x3c003c00;
            mov.b32 s1, 0x34003400;
            mov.b32 s2, 0x2c002c00;
            mov.b32 s3, 0x24002400;
            lop3.b32 x, $16, 0x00030003, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s0, $17;
            mov.b32 {$0, $8}, x;
            lop3.b32 x, $16, 0x000c000c, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s1, $18;
            mov.b32 {$1, $9}, x;
            lop3.b32 x, $16, 0x00300030, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s2, $19;
            mov.b32 {$2, $10}, x;
            lop3.b32 x, $16, 0x00c000c0, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s3, $20;
            mov.b32 {$3, $11}, x;
            shr.u32 t, $16, 8;
            lop3.b32 x, t, 0x00030003, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s0, $17;
            mov.b32 {$4, $12}, x;
            lop3.b32 x, t, 0x000c000c, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s1, $18;
            mov.b32 {$5, $13}, x;
            lop3.b32 x, t, 0x00300030, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s2, $19;
            mov.b32 {$6, $14}, x;
            lop3.b32 x, t, 0x00c000c0, 0x64006400, 0xea;
            fma.rn.f16x2 x, x, s3, $20;
            mov.b32 {$7, $15}, x;
            }
            """,
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
            args=[words, (z0 << 16) | z0, (z1 << 16) | z1, (z2 << 16) | z2, (z3 << 16) | z3],
            dtype=(tl.float16,) * 16, is_pure=True, pack=1)
        return tl.join(
            tl.join(tl.join(tl.join(c0, c8), tl.join(c4, c12)), tl.join(tl.join(c2, c10), tl.join(c6, c14))),
            tl.join(tl.join(tl.join(c1, c9), tl.join(c5, c13)), tl.join(tl.join(c3, c11), tl.join(c7, c15))))


@triton.jit
def _tile_params(s_ptr, z_ptr, offs_n, n_mask, k0, valid, n_blocks, zp_row_bytes, BITS: tl.constexpr,
                 ZP_MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BKW: tl.constexpr, PW: tl.constexpr,
                 SCALE_W: tl.constexpr):
    """Scales and zero points of the step at code ``k0``: per word ``[BLOCK_N, BKW]`` (``SCALE_W``) or, the step
    lying in one block, per row ``[BLOCK_N]`` (1-D, so that no 2-D layout is converted)."""
    if SCALE_W:
        blk = ((k0 // PW + tl.arange(0, BKW)) // (BLOCK_SIZE // PW))[None, :]
        s, zp = _block_params(s_ptr, z_ptr, offs_n[:, None], blk, (n_mask[:, None] & (blk < n_blocks)) & valid,
                              n_blocks, zp_row_bytes, BITS, ZP_MODE)
    else:
        blk = k0 // BLOCK_SIZE
        s, zp = _block_params(s_ptr, z_ptr, offs_n, blk, (n_mask & (blk < n_blocks)) & valid, n_blocks,
                              zp_row_bytes, BITS, ZP_MODE)
    return s, zp


@triton.jit
def _mm_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_am, n_blocks, row_words, zp_row_bytes, iters_per_split,
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, ZP_MODE: tl.constexpr, NF4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_W: tl.constexpr,
    USE_ASM: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    SWAP: tl.constexpr,
):
    """One output tile: ``SWAP``: ``Y^T[BLOCK_N, BLOCK_M] = W_deq^T A^T`` (the weight is the dot's left operand,
    which suits few tokens); else ``Y[BLOCK_M, BLOCK_N] = A W_deq``. The weight tile ``[BLOCK_N, BLOCK_K]`` is
    dequantized in registers.

    ``EVEN_M``/``EVEN_N``/``EVEN_K``: no token, row or K tail (those masks are left out).
    """
    PW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PW
    dtype = a_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, BLOCK_K)
    j = tl.arange(0, PW)
    if NF4:
        shift3 = (8 * (j // 2) + 4 * (1 - j % 2))[None, None, :]
    else:
        shift3 = (j * BITS)[None, None, :]
    rows = offs_n[:, None]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * iters_per_split * BLOCK_K
    s, zp = _tile_params(s_ptr, z_ptr, offs_n, n_mask, k_begin, iters_per_split > 0, n_blocks, zp_row_bytes, BITS,
                         ZP_MODE, BLOCK_SIZE, BKW, PW, SCALE_W)
    for it in range(0, iters_per_split):
        k0 = k_begin + it * BLOCK_K
        wofs = k0 // PW + offs_w
        if EVEN_N and EVEN_K:
            words = tl.load(w_ptr + rows * row_words + wofs[None, :])
        else:
            words = tl.load(w_ptr + rows * row_words + wofs[None, :],
                            mask=n_mask[:, None] & (wofs < row_words)[None, :], other=0)
        kk = k0 + offs_k
        if SWAP:
            a_ptrs = a_ptr + offs_m[None, :] * stride_am + kk[:, None]  # A^T: [BLOCK_K, BLOCK_M]
            a_mask = (kk < K)[:, None] & m_mask[None, :]
        else:
            a_ptrs = a_ptr + offs_m[:, None] * stride_am + kk[None, :]  # A: [BLOCK_M, BLOCK_K]
            a_mask = m_mask[:, None] & (kk < K)[None, :]
        if EVEN_M and EVEN_K:
            a_t = tl.load(a_ptrs)
        else:
            a_t = tl.load(a_ptrs, mask=a_mask, other=0.0)
        # the next step's scales and zero points now (their latency would otherwise stall this step)
        s_n, zp_n = _tile_params(s_ptr, z_ptr, offs_n, n_mask, k0 + BLOCK_K, it + 1 < iters_per_split, n_blocks,
                                 zp_row_bytes, BITS, ZP_MODE, BLOCK_SIZE, BKW, PW, SCALE_W)
        if not SCALE_W:
            zp2 = zp[:, None]
        else:
            zp2 = zp
        if NF4:
            v = tl.load(cb_ptr + ((words[:, :, None] >> shift3) & 15))
            if SCALE_W:
                v = v * s[:, :, None]
            wq = tl.reshape(v.to(dtype), [BLOCK_N, BLOCK_K])
        elif USE_ASM:  # float16 activations, integer zero points
            v = tl.reshape(_codes_asm(words, tl.broadcast_to(zp2.to(tl.int32), [BLOCK_N, BKW]), BITS),
                           [BLOCK_N, BKW, PW])
            if SCALE_W:
                v = v * s.to(tl.float16)[:, :, None]
            wq = tl.reshape(v, [BLOCK_N, BLOCK_K])
        else:
            x = (((words[:, :, None] >> shift3) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)
            if ZP_MODE == 2:
                v = (x - 8388608.0) - zp2[:, :, None]
            else:
                v = x - (8388608.0 + zp2[:, :, None])
            if SCALE_W:
                v = v * s[:, :, None]
            wq = tl.reshape(v.to(dtype), [BLOCK_N, BLOCK_K])
        if SWAP:
            if SCALE_W:
                acc = tl.dot(wq, a_t, acc)
            else:
                acc += tl.dot(wq, a_t) * s[:, None]
        else:
            if SCALE_W:
                acc = tl.dot(a_t, tl.trans(wq), acc)
            else:
                acc += tl.dot(a_t, tl.trans(wq)) * s[None, :]
        s, zp = s_n, zp_n
    tile = pid_m * tl.num_programs(0) + pid_n
    if SWAP:
        offs = offs_m[None, :] * N + offs_n[:, None]
        _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs, n_mask[:, None] & m_mask[None, :], tile, SPLIT_K)
    else:
        offs = offs_m[:, None] * N + offs_n[None, :]
        _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs, m_mask[:, None] & n_mask[None, :], tile, SPLIT_K)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one call.

    Attributes:
        block_n: output columns (rows of ``packed``) per program.
        block_k: codes along K per loop step (the M=1 kernel rounds it to whole quantization blocks; the tiled
            kernel uses it as the dot's K, at most one block when ``scale_w`` is False).
        split_k: programs along K per output tile (partial sums reduced through the workspace).
        block_m: tokens per program (tiled kernel only).
        scale_w: tiled kernel: scale each dequantized code before the dot (True) or the dot's result per block.
        use_asm: inline PTX (used where it applies): the M=1 kernel's AND/OR as one ``lop3``; the tiled kernel's
            unpacking of two codes at a time (float16 activations, integer zero points).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the loop.
        gemv: for M == 1, the CUDA-core kernel (True) or the tiled one (False).
        a_vec: M=1 kernel, 4 bits: load the 8 activations of a word as one 16-byte vector and split them in
            registers (False: 8 strided 2-byte loads).
        swap_ab: tiled kernel: compute ``Y^T = W^T A^T`` (True; the weight fills the matrix unit's 64-row side)
            or ``Y = A W`` (False).
    """

    block_n: int
    block_k: int
    split_k: int = 1
    block_m: int = 16
    scale_w: bool = False
    use_asm: bool = False
    num_warps: int = 4
    num_stages: int = 2
    gemv: bool = True
    swap_ab: bool = True
    a_vec: bool = True


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _split_to(tiles: int, steps: int, programs: int) -> int:
    """The smallest power-of-two split-K (at most ``steps``) that gives at least ``programs`` programs."""
    split = 1
    while tiles * split < programs and split * 2 <= steps:
        split *= 2
    return split


def default_config(m: int, k: int, n: int, bits: int, block_size: int, *, nf4: bool = False,
                   sms: int = 132) -> KernelConfig:
    """The launch parameters used when a call names none.

    Read off the sweeps of ``bench/bench_cuda_kernels.py --sweep`` on an H200 (132 SMs) for K x N = 4096 x 14336
    and 14336 x 4096: M=1 the CUDA-core kernel without split-K (K <= 8192: 4 rows (8 for 2 bits) x 4096 codes a
    step; longer rows: 4 rows x 2048 codes for 4 bits, 8 x 1024 for 8 bits, 8 x 2048 for 2 bits; the tiled
    kernel was slower at M=1 in every sweep); M <= 16 tiles of 64 rows x 64 codes
    (one block) with split-K up to about 3.5 programs per SM; M > 16 ``Y = A W`` tiles of 128 tokens x 64 rows
    with per-code scales, or, for blocks of 128+ and wide N, ``Y^T`` tiles of 128 x 128 with per-row scales.
    """
    if m == 1:
        if k <= 8192:
            block_n, codes = (8 if bits == 2 else 4), 4096
        else:
            block_n, codes = (4, 2048) if bits == 4 else (8, 2048 if bits == 2 else 1024)
        return KernelConfig(block_n=block_n, block_k=max(codes, block_size), split_k=1, num_warps=4, num_stages=2)
    if m <= 16:
        block_n, block_k = 64, min(block_size, 64)
        split = _split_to(-(-n // block_n), -(-k // block_k), int(3.5 * sms))
        return KernelConfig(block_n=block_n, block_k=block_k, split_k=split, block_m=16, use_asm=not nf4,
                            num_warps=4, num_stages=3, gemv=False)
    block_m = 128 if m > 64 else 64
    if block_size >= 128 and n >= 64 * sms:
        return KernelConfig(block_n=128, block_k=64, split_k=1, block_m=block_m, use_asm=not nf4, num_warps=8,
                            num_stages=3, gemv=False)
    tiles = -(-n // 64) * -(-m // block_m)
    split = 2 if tiles < sms else 1
    return KernelConfig(block_n=64, block_k=128 if split > 1 else 64, split_k=split, block_m=block_m, scale_w=True,
                        use_asm=not nf4, num_warps=4, num_stages=3, gemv=False, swap_ab=False)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

_WORKSPACE: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, values: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's zeroed split-K workspace (float32 partial sums, int32 arrival counters), grown on demand."""
    key = (device.type, device.index)
    ws = _WORKSPACE.get(key)
    if ws is None or ws[0].numel() < values or ws[1].numel() < tiles:
        size = max(values, ws[0].numel() if ws else 0, 1 << 16)
        count = max(tiles, ws[1].numel() if ws else 0, 1 << 12)
        ws = (torch.zeros(size, dtype=torch.float32, device=device), torch.zeros(count, dtype=torch.int32,
                                                                                 device=device))
        _WORKSPACE[key] = ws
    return ws


def _as_words(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """``packed`` (uint8, contiguous) as int32 words, ``rows`` rows; copied when not 16-byte aligned."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed weights must be uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    if not flat.is_contiguous() or flat.data_ptr() % 16:
        flat = flat.contiguous().clone()
    return flat.view(torch.int32).view(rows, -1)


def _activations(a: torch.Tensor, k: int, device: torch.device) -> tuple[torch.Tensor, tuple[int, ...]]:
    if a.shape[-1] != k:
        raise ValueError(f"activations end in {a.shape[-1]}, expected K = {k}")
    if a.device != device:
        raise ValueError(f"activations on {a.device}, weights on {device}")
    if a.dtype not in (torch.float16, torch.bfloat16) and not (a.dtype == torch.float32 and a.numel() == k):
        a = a.to(torch.float16)  # one float32 token stays float32: the GEMV reads it as it is (no cast kernels)
    lead = tuple(a.shape[:-1])
    a2 = a.reshape(-1, k)
    if a2.stride(1) != 1:
        a2 = a2.contiguous()
    if a2.data_ptr() % 16:
        a2 = a2.clone()
    return a2, lead


def _launch(a2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None,
            zp_mode: int, *, k: int, n: int, bits: int, block_size: int, n_blocks: int, zp_row_bytes: int,
            nf4: bool, config: KernelConfig | None) -> torch.Tensor:
    m = a2.shape[0]
    device = a2.device
    y = torch.empty((m, n), dtype=a2.dtype, device=device)
    if m == 0:
        return y
    cfg = config or default_config(m, k, n, bits, block_size, nf4=nf4, sms=_sm_count(device))
    if a2.dtype == torch.float32 and not (m == 1 and cfg.gemv):  # the tiled kernel takes 16-bit operands
        a2 = a2.to(torch.float16)
    z = zp if zp is not None else scales  # an unused pointer when there are no zero points
    cb = _codebook(device) if nf4 else scales
    row_words = words.shape[1]
    pw = 32 // bits
    if m == 1 and cfg.gemv:
        bkw = max(1, cfg.block_k // pw)
        steps = -(-row_words // bkw)
        split = max(1, min(cfg.split_k, steps))
        iters = -(-steps // split)
        tiles = -(-n // cfg.block_n)
        ws, cnt = _workspace(device, n, tiles) if split > 1 else (y, y)
        _gemv_kernel[(tiles, split)](
            a2, words, scales, z, cb, y, ws, cnt,
            k, n, n_blocks, row_words, zp_row_bytes, iters,
            BITS=bits, BLOCK_SIZE=block_size, ZP_MODE=zp_mode, NF4=nf4, J1=_direct_codes(bits),
            BLOCK_N=cfg.block_n, BKW=bkw, SPLIT_K=split, EVEN_N=n % cfg.block_n == 0,
            EVEN_K=row_words % bkw == 0 and steps % split == 0 and row_words * pw == k, USE_ASM=not _INTERPRET,
            A_VEC=cfg.a_vec and bits == 4,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    block_k = max(cfg.block_k if cfg.scale_w else min(cfg.block_k, block_size), pw, 16)
    scale_w = cfg.scale_w or block_k > block_size  # a step over several blocks scales per code
    use_asm = cfg.use_asm and not nf4 and zp_mode != 2 and a2.dtype == torch.float16 and not _INTERPRET
    swap = cfg.swap_ab or bits == 8  # Triton 3.6 fails to compile Y = A W with 8-bit tiles (OptimizeDotOperands)
    steps = -(-(n_blocks * block_size) // block_k)
    split = max(1, min(cfg.split_k, steps))
    iters = -(-steps // split)
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), split)
    ws, cnt = _workspace(device, m * n, grid[0] * grid[1]) if split > 1 else (y, y)
    _mm_kernel[grid](
        a2, words, scales, z, cb, y, ws, cnt,
        m, n, k, a2.stride(0), n_blocks, row_words, zp_row_bytes, iters,
        BITS=bits, BLOCK_SIZE=block_size, ZP_MODE=zp_mode, NF4=nf4,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SCALE_W=scale_w, USE_ASM=use_asm,
        SPLIT_K=split, EVEN_M=m % cfg.block_m == 0, EVEN_N=n % cfg.block_n == 0,
        EVEN_K=steps % split == 0 and n_blocks * block_size == k and k % block_k == 0, SWAP=swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def matmul_nbits(a: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 *, k: int, n: int, bits: int, block_size: int, config: KernelConfig | None = None) -> torch.Tensor:
    """``a @ W`` for a ``com.microsoft.MatMulNBits`` weight, read in its packed layout.

    Args:
        a: activations ``[..., K]`` (float16 or bfloat16; float32 is cast to float16 but for one token) on a CUDA
            device.
        packed: uint8 ``[N, n_blocks, blob_size]`` (any shape with that many bytes, contiguous).
        scales: float32 or float16 ``[N * n_blocks]``.
        zero_points: ``None`` (the middle code), packed uint8 ``[N * ceil(n_blocks * bits / 8)]`` or float
            ``[N * n_blocks]``.
        k: K (the node's ``K`` attribute; the last block may be padded).
        n: N.
        bits: 2, 4 or 8.
        block_size: a power of two, 16-256.
        config: launch parameters; :func:`default_config` when omitted.

    Returns:
        ``[..., N]`` in the activations' dtype.
    """
    packing.blob_size(block_size, bits)
    _check_block_size(block_size)
    n_blocks = packing.block_count(k, block_size)
    if packed.numel() != n * n_blocks * block_size * bits // 8:
        raise ValueError(f"packed has {packed.numel()} bytes, expected N * n_blocks * blob_size = "
                         f"{n * n_blocks * block_size * bits // 8}")
    if scales.numel() != n * n_blocks:
        raise ValueError(f"scales have {scales.numel()} values, expected N * n_blocks = {n * n_blocks}")
    zp_row_bytes = math.ceil(n_blocks * bits / 8)
    if zero_points is None:
        zp_mode, zp = 0, None
    elif zero_points.dtype == torch.uint8:
        if zero_points.numel() != n * zp_row_bytes:
            raise ValueError(f"packed zero points have {zero_points.numel()} bytes, expected {n * zp_row_bytes}")
        zp_mode, zp = 1, zero_points.reshape(-1).contiguous()
    else:
        if zero_points.numel() != n * n_blocks:
            raise ValueError(f"float zero points have {zero_points.numel()} values, expected {n * n_blocks}")
        zp_mode, zp = 2, zero_points.reshape(-1).contiguous()
    device = packed.device
    # one token: the CUDA C++ GEMV where it applies (faster, see gemv_cuda); float32 activations only for large
    # weights, where its cast to float16 costs less than the Triton GEMV's slower reads (SmolLM2 decode: 3.2 vs 3.1 ms)
    if config is None and a.numel() == k and a.device == device and (a.dtype == torch.float16 or (
            a.dtype == torch.float32 and n * k >= 1 << 24)) and \
            gemv_cuda.supports(k, bits, block_size, scales, zp) and gemv_cuda.available():
        rows, warps_k = gemv_cuda.launch_shape(n, k, bits, _sm_count(device))
        y = gemv_cuda.gemv(a.reshape(1, k), packed, scales.reshape(-1), zp, k=k, n=n, bits=bits,
                           block_size=block_size, rows=rows, warps_k=warps_k)
        return y.view(*a.shape[:-1], n)
    a2, lead = _activations(a, k, device)
    y = _launch(a2, _as_words(packed, n), scales.reshape(-1).contiguous(), zp, zp_mode, k=k, n=n, bits=bits,
                block_size=block_size, n_blocks=n_blocks, zp_row_bytes=zp_row_bytes, nf4=False, config=config)
    return y.view(*lead, n)


def matmul_bnb4(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, *, k: int, n: int, block_size: int,
                config: KernelConfig | None = None) -> torch.Tensor:
    """``a @ W`` for a ``com.microsoft.MatMulBnb4`` NF4 weight (``packed`` uint8 ``[ceil(N*K/2)]``, ``absmax``
    float ``[ceil(N*K/block_size)]``), read in its packed layout; other arguments as :func:`matmul_nbits`.

    The kernels need ``K % 8 == 0``, ``K % block_size == 0`` and a power-of-two ``block_size >= 8``; other
    shapes are dequantized with torch ops (:func:`dequantize_bnb4`) and multiplied with ``torch.matmul``.
    """
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected ceil(N * K / 2) = {(n * k + 1) // 2}")
    if absmax.numel() != -(-(n * k) // block_size):
        raise ValueError(f"absmax has {absmax.numel()} values, expected {-(-(n * k) // block_size)}")
    device = packed.device
    a2, lead = _activations(a, k, device)
    if k % 8 or k % block_size or block_size < 8 or block_size & (block_size - 1):
        w = dequantize_bnb4(packed, absmax, k=k, n=n, block_size=block_size).to(a2.dtype)
        return (a2 @ w).view(*lead, n)
    y = _launch(a2, _as_words(packed, n), absmax.reshape(-1).contiguous(), None, 0, k=k, n=n, bits=4,
                block_size=block_size, n_blocks=k // block_size, zp_row_bytes=0, nf4=True, config=config)
    return y.view(*lead, n)
