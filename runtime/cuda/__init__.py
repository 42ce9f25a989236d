"""qcompiler's GPU kernels: Triton weight-only matmuls over the packed MatMulNBits and MatMulBnb4 layouts.

Importing this package imports torch and triton (nothing else in ``qcompiler.runtime`` does); it is imported only
when the GPU path is asked for. See :mod:`qcompiler.runtime.cuda.kernels` for the math and the limits.
"""

from __future__ import annotations

from qcompiler.runtime.cuda.kernels import (
    KernelConfig,
    default_config,
    dequantize_bnb4,
    dequantize_nbits,
    matmul_bnb4,
    matmul_nbits,
    to_device,
)

__all__ = [
    "KernelConfig",
    "default_config",
    "dequantize_bnb4",
    "dequantize_nbits",
    "matmul_bnb4",
    "matmul_nbits",
    "to_device",
]
