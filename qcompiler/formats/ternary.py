"""``ternary``: 1.58-bit weights, BitNet b1.58's absmean grid, stored as 2-bit ``MatMulNBits`` codes.

Each block of 32 (the recipe's block size) along K gets one scale ``s = mean |w|`` and the values ``{-s, 0, +s}``:
2-bit codes restricted to ``{1, 2, 3}`` around the fixed zero point 2 (:func:`~.blockwise.grid` with
``ternary``); a value rounds to ``+-s`` once ``|w| > s / 2``. Symmetric only. The ONNX form is the ``int2``
format's (:mod:`.integer`): ONNX Runtime's 2-bit CPU kernel runs it unchanged.
"""

from __future__ import annotations

from qcompiler.errors import ConfigError
from qcompiler.formats.base import WeightSpec
from qcompiler.formats.integer import IntFormat

__all__ = ["TernaryFormat"]


class TernaryFormat(IntFormat):
    """``ternary``: 2-bit storage, codes 1..3 (``{-s, 0, +s}``), one absmean scale per block."""

    def __init__(self) -> None:
        super().__init__(2)
        self.name = "ternary"  # type: ignore[misc]
        self.zero_points = ()  # type: ignore[misc]

    def _ternary(self) -> bool:
        return True

    def check(self, spec: WeightSpec) -> None:
        if not spec.symmetric:
            raise ConfigError("format 'ternary' is symmetric ({-1, 0, +1} times a scale): no --asymmetric")
        super().check(spec)

    def at_bits(self, bits: int) -> str | None:
        return "ternary" if bits == 2 else super().at_bits(bits)

    def scheme(self, spec: WeightSpec) -> str:
        return "ternary-weight-only"


TERNARY = TernaryFormat()
