"""A CUDA C++ 1-token GEMV over the MatMulNBits layout (4 and 8 bits), compiled at first use with torch's
``cpp_extension`` (needs nvcc and ninja where it runs).

``y[n] = sum_k a[k] W[k, n]`` with ``W[k, n] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]``, the codes read
straight from the packed rows of ``[N, n_blocks, blob]``. Each thread streams 16 bytes of a row at a time (32 int4 or
16 int8 codes, always inside one quantization block: block sizes 32 to 256) with a non-coherent 128-bit load; a
warp owns ``ROWS`` rows (the activations it loads serve all of them), a block ``WARPS_K`` warps that split K and add
their partial sums through shared memory. Codes become halves without conversions: ``(word & 0x000F000F) |
0x64006400`` is the half2 ``(1024 + q_0, 1024 + q_4)`` (and shifts give the other pairs), one ``hsub2`` with
``1024 + zp`` gives ``q - zp`` exactly, and the activations are paired the same way with byte permutes. Products
are summed in half2 over one 32-bit word, then in float32 with the block's scale.

Activations float16 (float32 ones are cast first: reading them as float32 made the kernel 1.7x slower, L1-bound),
output float32 or float16 (the activations' dtype). Measured on an H200 against the Triton GEMV in
bench/RESULTS.md.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

__all__ = ["available", "gemv", "launch_shape", "supports", "SOURCE"]

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <cuda_fp16.h>
#include <ATen/cuda/CUDAContext.h>

__device__ __forceinline__ uint4 ldg_nc(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ half2 as_h2(uint32_t v) { return *reinterpret_cast<half2*>(&v); }

template <typename T> __device__ __forceinline__ void load_act(const T* a, int k, uint32_t* h, int n);

// 8 activations as 4 half2 words, from float16
template <> __device__ __forceinline__ void load_act<half>(const half* a, int k, uint32_t* h, int n) {
  for (int i = 0; i < n; i += 4) {
    uint4 v = *reinterpret_cast<const uint4*>(a + k + 2 * i);
    h[i] = v.x; h[i + 1] = v.y; h[i + 2] = v.z; h[i + 3] = v.w;
  }
}
template <typename T> __device__ __forceinline__ void store_out(T* y, int i, float v);
template <> __device__ __forceinline__ void store_out<float>(float* y, int i, float v) { y[i] = v; }
template <> __device__ __forceinline__ void store_out<half>(half* y, int i, float v) { y[i] = __float2half(v); }

// The activations of a chunk (half2 words in k order) paired the way the codes come out of a word: for 4 bits
// (h_i, h_{i+4}) of each group of 8, for 8 bits (h_i, h_{i+2}) of each group of 4. Done once per chunk, then
// shared by the warp's ROWS rows.
template <int BITS>
__device__ __forceinline__ void pair_act(const uint32_t* x, uint32_t* p) {
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (BITS == 4) {
      const uint32_t* g = x + 4 * j;  // (h0,h1) (h2,h3) (h4,h5) (h6,h7)
      p[4 * j] = prmt(g[0], g[2], 0x5410);
      p[4 * j + 1] = prmt(g[0], g[2], 0x7632);
      p[4 * j + 2] = prmt(g[1], g[3], 0x5410);
      p[4 * j + 3] = prmt(g[1], g[3], 0x7632);
    } else {
      const uint32_t* g = x + 2 * j;  // (h0,h1) (h2,h3)
      p[2 * j] = prmt(g[0], g[1], 0x5410);
      p[2 * j + 1] = prmt(g[0], g[1], 0x7632);
    }
  }
}

// One 16-byte chunk of a row: BITS = 4 (32 codes) or 8 (16 codes) against paired activations; z = 1024 + zp.
template <int BITS>
__device__ __forceinline__ float chunk_dot(uint4 w, const uint32_t* xp, half2 z) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.f;
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t v = words[j];
    if (BITS == 4) {  // codes c0..c7 at bits 4i: (word >> 4i) & 0x000F000F pairs (c_i, c_{i+4})
      const uint32_t* x = xp + 4 * j;
      half2 q0 = __hsub2(as_h2((v & 0x000F000F) | 0x64006400), z);
      half2 q1 = __hsub2(as_h2(((v >> 4) & 0x000F000F) | 0x64006400), z);
      half2 q2 = __hsub2(as_h2(((v >> 8) & 0x000F000F) | 0x64006400), z);
      half2 q3 = __hsub2(as_h2(((v >> 12) & 0x000F000F) | 0x64006400), z);
      half2 p = __hmul2(q0, as_h2(x[0]));
      p = __hfma2(q1, as_h2(x[1]), p);
      p = __hfma2(q2, as_h2(x[2]), p);
      p = __hfma2(q3, as_h2(x[3]), p);
      float2 f = __half22float2(p);
      acc += f.x + f.y;
    } else {  // bytes b0..b3: pairs (b0, b2) and (b1, b3); products in float32 (|q - zp| up to 255)
      const uint32_t* x = xp + 2 * j;
      float2 q0 = __half22float2(__hsub2(as_h2(prmt(v, 0x64646464, 0x4240)), z));
      float2 q1 = __half22float2(__hsub2(as_h2(prmt(v, 0x64646464, 0x4341)), z));
      float2 x0 = __half22float2(as_h2(x[0]));
      float2 x1 = __half22float2(as_h2(x[1]));
      acc += q0.x * x0.x + q0.y * x0.y + q1.x * x1.x + q1.y * x1.y;
    }
  }
  return acc;
}

// ZP_MODE 0: middle code; 1: packed uint8 codes (BITS wide) per block
template <typename TA, typename TY, int BITS, int ROWS, int WARPS_K, int ZP_MODE>
__global__ void __launch_bounds__(32 * WARPS_K) gemv_kernel(
    const TA* __restrict__ a, const uint4* __restrict__ w, const float* __restrict__ scales,
    const uint8_t* __restrict__ zp, TY* __restrict__ y, int n, int row_chunks, int n_blocks, int zp_row_bytes,
    int chunks_per_block_shift) {
  constexpr int CODES = 128 / BITS;  // codes per 16-byte chunk
  constexpr int XW = CODES / 2;      // half2 words of activations per chunk
  __shared__ float partial[WARPS_K][ROWS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * ROWS;
  float acc[ROWS];
  #pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  for (int c = warp * 32 + lane; c < row_chunks; c += 32 * WARPS_K) {
    uint32_t xr[XW], xh[XW];
    load_act<TA>(a, c * CODES, xr, XW);
    pair_act<BITS>(xr, xh);
    const int blk = c >> chunks_per_block_shift;
    uint4 wv[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, n - 1);
      wv[r] = ldg_nc(w + (size_t)row * row_chunks + c);
    }
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, n - 1);
      const float s = __ldg(scales + (size_t)row * n_blocks + blk);
      uint32_t code = 1u << (BITS - 1);
      if (ZP_MODE == 1) {
        const int bit = blk * BITS;
        code = (__ldg(zp + (size_t)row * zp_row_bytes + (bit >> 3)) >> (bit & 7)) & ((1 << BITS) - 1);
      }
      const half2 z = as_h2((0x6400u | code) * 0x00010001u);  // the half 1024 + zp, twice
      acc[r] += s * chunk_dot<BITS>(wv[r], xh, z);
    }
  }
  #pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    acc[r] = v;
  }
  if (WARPS_K > 1) {
    if (lane == 0) {
      #pragma unroll
      for (int r = 0; r < ROWS; ++r) partial[warp][r] = acc[r];
    }
    __syncthreads();
    if (threadIdx.x < ROWS && row0 + threadIdx.x < n) {
      float v = 0.f;
      #pragma unroll
      for (int i = 0; i < WARPS_K; ++i) v += partial[i][threadIdx.x];
      store_out<TY>(y, row0 + threadIdx.x, v);
    }
  } else if (lane == 0) {
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) if (row0 + r < n) store_out<TY>(y, row0 + r, acc[r]);
  }
}

template <typename TA, int BITS, int ROWS, int WARPS_K, int ZP>
void launch(torch::Tensor a, torch::Tensor w, torch::Tensor s, torch::Tensor z, torch::Tensor y, int n, int k,
            int block_size) {
  const int row_chunks = k * BITS / 128;
  const int n_blocks = k / block_size;
  const int shift = __builtin_ctz(block_size / (128 / BITS));
  const int zrb = (n_blocks * BITS + 7) / 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  dim3 grid((n + ROWS - 1) / ROWS), block(32 * WARPS_K);
  const uint8_t* zp = ZP ? z.data_ptr<uint8_t>() : nullptr;
  const uint4* wp = reinterpret_cast<const uint4*>(w.data_ptr<uint8_t>());
  if (y.scalar_type() == at::kFloat) {
    gemv_kernel<TA, float, BITS, ROWS, WARPS_K, ZP><<<grid, block, 0, stream>>>(
        reinterpret_cast<const TA*>(a.data_ptr()), wp, s.data_ptr<float>(), zp, y.data_ptr<float>(), n, row_chunks,
        n_blocks, zrb, shift);
  } else {
    gemv_kernel<TA, half, BITS, ROWS, WARPS_K, ZP><<<grid, block, 0, stream>>>(
        reinterpret_cast<const TA*>(a.data_ptr()), wp, s.data_ptr<float>(), zp,
        reinterpret_cast<half*>(y.data_ptr()), n, row_chunks, n_blocks, zrb, shift);
  }
}

#define CASE(BITS, ROWS, WK, ZP)                                                                            \
  if (bits == BITS && rows == ROWS && warps_k == WK && zpm == ZP) {                                         \
    launch<half, BITS, ROWS, WK, ZP>(a, w, s, z, y, n, k, block_size);                                     \
    return;                                                                                                 \
  }
#define ROWS_CASES(BITS, WK, ZP) CASE(BITS, 2, WK, ZP) CASE(BITS, 4, WK, ZP) CASE(BITS, 8, WK, ZP)
#define WK_CASES(BITS, ZP) ROWS_CASES(BITS, 1, ZP) ROWS_CASES(BITS, 2, ZP) ROWS_CASES(BITS, 4, ZP) ROWS_CASES(BITS, 8, ZP)

void gemv(torch::Tensor a, torch::Tensor w, torch::Tensor s, torch::Tensor z, torch::Tensor y, int64_t n,
          int64_t k, int64_t bits, int64_t block_size, int64_t zpm, int64_t rows, int64_t warps_k) {
  WK_CASES(4, 0) WK_CASES(4, 1) WK_CASES(8, 0) WK_CASES(8, 1)
  TORCH_CHECK(false, "gemv: unsupported configuration (rows 2/4/8, warps_k 1/2/4/8, bits 4/8)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv); }
"""


@functools.cache
def _module():  # noqa: ANN202 -- the compiled extension
    from torch.utils.cpp_extension import load_inline

    return load_inline("qcompiler_gemv", cpp_sources="", cuda_sources=SOURCE, functions=None,
                       extra_cuda_cflags=["-O3", "--use_fast_math", "-gencode=arch=compute_90,code=sm_90"],
                       verbose=False)


@functools.cache
def available() -> bool:
    """Whether the extension compiles and loads here (logged once when it does not). The first call compiles it
    (about a minute; cached by torch in ``~/.cache/torch_extensions``); ``QCOMPILER_CUDA_GEMV=0`` turns it off."""
    if os.environ.get("QCOMPILER_CUDA_GEMV", "1") == "0":
        return False
    try:
        _module()
    except Exception as exc:  # no nvcc/ninja, or a compiler error: the Triton kernels serve instead
        logger.info("CUDA C++ GEMV unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return True


def supports(k: int, bits: int, block_size: int, scales: torch.Tensor, zero_points: torch.Tensor | None) -> bool:
    """Whether :func:`gemv` takes this weight: 4 or 8 bits, every 16-byte chunk inside one block, no K tail,
    float32 scales, no or uint8 zero points."""
    codes = 128 // bits if bits in (4, 8) else 0
    return bool(codes) and block_size >= codes and k % block_size == 0 and scales.dtype == torch.float32 and \
        (zero_points is None or zero_points.dtype == torch.uint8)


def launch_shape(n: int, k: int, bits: int, sms: int) -> tuple[int, int]:
    """(rows a warp, warps a block) for an ``N x K`` weight: 4 rows, and enough warps splitting K for about 32
    warps an SM (measured on an H200: 1 warp at 4096x14336, 4-8 at 14336x4096)."""
    rows = 4
    blocks = -(-n // rows)
    chunks = k * bits // 128
    warps_k = 1
    while warps_k < 8 and blocks * warps_k * 1.5 < 32 * sms and chunks >= 64 * warps_k:
        warps_k *= 2
    return rows, warps_k


def gemv(a: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, *, k: int,
         n: int, bits: int, block_size: int, rows: int = 4, warps_k: int = 1) -> torch.Tensor:
    """``a[1, K] @ W`` (``y`` in the activations' dtype; float32 activations are read as float16). See
    :func:`supports` for the weights it takes."""
    y = torch.empty((1, n), dtype=torch.float32 if a.dtype == torch.float32 else torch.float16, device=a.device)
    z = zero_points if zero_points is not None else scales
    a = a.to(torch.float16).contiguous()
    if a.data_ptr() % 16:  # the kernel reads 16-byte vectors
        a = a.clone()
    _module().gemv(a, packed, scales, z, y, n, k, bits, block_size, 0 if zero_points is None else 1, rows, warps_k)
    return y
