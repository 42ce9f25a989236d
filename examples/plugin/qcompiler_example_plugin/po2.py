"""A weight format from a plugin: ``int4-po2``, int4 blocks whose scales are powers of two.

Power-of-two scales turn the dequantization multiply into a shift on integer hardware, at the price of up to 2x
coarser steps than the best scale. Per block of ``block_size`` values along K, symmetric: ``s = 2^ceil(log2(max|w|
/ 7.5))`` and ``q = clip(round(w / s) + 8, 0, 15)``, so every value is within ``s / 2`` of ``s (q - 8)``. The ONNX
form is the built-in ``int4`` format's (``com.microsoft.MatMulNBits``, 4 bits): ONNX Runtime runs it unchanged.

What it declares: ``"grid"`` (GPTQ and AWQ's clipping choose codes on its grid: the scales stay powers of two), not
``"free-grid"`` (HQQ would move the scales off the powers of two, so ``--algorithm hqq`` is refused), no zero points,
no mixed-precision family (``at_bits`` is None).
"""

from __future__ import annotations

import numpy as np

from qcompiler.formats import WeightSpec
from qcompiler.formats.integer import IntFormat

__all__ = ["INT4_PO2", "PowerOfTwoInt4"]


class PowerOfTwoInt4(IntFormat):
    """``int4-po2``: symmetric int4 blocks with power-of-two scales."""

    capabilities = frozenset({"quantize", "grid"})

    def __init__(self) -> None:
        super().__init__(4)
        self.name = "int4-po2"
        self.zero_points = ()  # symmetric only

    def at_bits(self, bits: int) -> str | None:
        return self.name if bits == 4 else None

    def scheme(self, spec: WeightSpec) -> str:
        return "int4-po2-weight-only"

    def grid(self, weight: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
        scale, zero = super().grid(weight, spec)  # max|w| / 7.5 per block, zero point 8
        return np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32), zero

    def quantize(self, weight: np.ndarray, spec: WeightSpec):
        scale, zero = self.grid(weight, spec)
        codes = self.codes_on_grid(weight, scale, zero, spec)
        return self.from_codes(codes, scale, zero, spec, weight.shape[0])


INT4_PO2 = PowerOfTwoInt4()
