"""Integer weight-only formats ``int2`` ... ``int8``: codes on a per-block grid along K (:mod:`.blockwise`).

ONNX form, for ``Y = A @ W (+ bias)``:

- 2, 4 and 8 bits (the widths ONNX Runtime 1.32's CPU ``MatMulNBits`` runs): ::

      Y = com.microsoft.MatMulNBits(A, B_packed, scales, [zero_points], , [bias]; K, N, bits, block_size,
                                    accuracy_level)

  zero points packed like the codes (uint8) or float32 (``zero_point = "float"``, 2 and 4 bits);
- 3, 5, 6 and 7 bits: qcompiler's own op (:mod:`qcompiler.runtime.custom_ops`), every input present (an absent
  zero point or bias is an empty tensor), uint8 zero points only: ::

      Y = ai.qcompiler.MatMulIntN(A, B_packed, scales, zero_points, bias; K, N, bits, block_size)

A token embedding (``Gather`` over axis 0 of a constant ``E[rows, cols]``) becomes
``com.microsoft.GatherBlockQuantized`` with blocks along ``cols`` (:meth:`IntFormat.gather`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.formats.base import EmitContext, Emitted, GridFormat, WeightSpec, copy_output_type
from qcompiler.formats.blockwise import BlockwiseWeight, code_limits, codes_on_grid, grid, quantize_rtn
from qcompiler.formats.weighted_grid import weighted_grid
from qcompiler.runtime import custom_ops, packing

__all__ = ["NBITS", "IntFormat", "int_format"]

CONTRIB = "com.microsoft"
#: the widths MatMulNBits runs on CPU; the others go to MatMulIntN
NBITS = (2, 4, 8)


class IntFormat(GridFormat):
    """``int<bits>``: asymmetric grids with uint8 zero points everywhere, float ones at 2 and 4 bits."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"quantize", "grid", "free-grid", "gather"})

    def __init__(self, bits: int) -> None:
        if bits not in range(2, 9):
            raise ValueError(f"integer formats have 2 to 8 bits, not {bits}")
        self.bits = bits  # type: ignore[misc]  # a per-instance width: one class, int2 ... int8
        self.name = f"int{bits}"  # type: ignore[misc]
        self.zero_points = ("int", "float") if bits in (2, 4) else ("int",)  # type: ignore[misc]

    def check(self, spec: WeightSpec) -> None:
        if spec.float_zero_point and self.bits == 8:
            raise ConfigError("format 'int8' with float zero points: ONNX Runtime's CPU MatMulNBits has no 8-bit "
                              "kernel with float zero points (--zero-point int)")
        if spec.float_zero_point and self.bits not in NBITS:
            raise ConfigError(f"format {self.name!r} with float zero points: MatMulIntN stores uint8 zero points "
                              "only (--zero-point int)")
        super().check(spec)

    def at_bits(self, bits: int) -> str | None:
        return f"int{bits}" if 2 <= bits <= 8 else None

    def scheme(self, spec: WeightSpec) -> str:
        return f"int{spec.bits}-weight-only"

    # -- numerics -----------------------------------------------------------------------------------------------
    def _ternary(self) -> bool:
        return False

    def grid(self, weight: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
        return grid(weight, spec.bits, spec.block_for(weight.shape[0]), spec.symmetric, spec.float_zero_point,
                    ternary=self._ternary())

    def weighted_grid(self, weight: np.ndarray, spec: WeightSpec,
                      importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return weighted_grid(weight, importance, spec.bits, spec.block_for(weight.shape[0]), spec.symmetric,
                             spec.float_zero_point, ternary=self._ternary())

    def code_limits(self, spec: WeightSpec) -> tuple[int, int]:
        return code_limits(spec.bits, self._ternary())

    def codes_on_grid(self, weight: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                      spec: WeightSpec) -> np.ndarray:
        return codes_on_grid(weight, scale, zero, spec.bits, spec.block_for(weight.shape[0]), self._ternary())

    def from_codes(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: WeightSpec,
                   k: int) -> BlockwiseWeight:
        return BlockwiseWeight(codes, scale, None if spec.symmetric else zero, spec.bits, spec.block_for(k))

    def quantize(self, weight: np.ndarray, spec: WeightSpec) -> BlockwiseWeight:
        return quantize_rtn(weight, spec.bits, spec.block_for(weight.shape[0]), spec.symmetric,
                            spec.float_zero_point, ternary=self._ternary())

    def fits(self, quantized: Any, weight: np.ndarray, spec: WeightSpec) -> bool:
        return isinstance(quantized, BlockwiseWeight) and quantized.bits == spec.bits and \
            quantized.block_size == spec.block_for(weight.shape[0]) and \
            (quantized.zero_points is None) == spec.symmetric and quantized.codes.shape == weight.shape[::-1] and \
            (quantized.zero_points is None or (quantized.zero_points.dtype != np.uint8) == spec.float_zero_point)

    # -- ONNX ---------------------------------------------------------------------------------------------------
    def kernels(self, spec: WeightSpec) -> tuple[str, ...]:
        return (f"{CONTRIB}.MatMulNBits",) if spec.bits in NBITS else (f"{custom_ops.DOMAIN}.MatMulIntN",)

    def constants(self, ctx: EmitContext, base: str, quantized: BlockwiseWeight, spec: WeightSpec,
                  weight_shape: tuple[int, int]) -> list[ir.Value | None]:
        if spec.bits in NBITS:
            packed, scales, zero_points = quantized.packed()
            return ctx.constants(base, [("packed", packed), ("scales", scales), ("zero_points", zero_points)])
        packed, scales, zero_points = quantized.packed_intn()  # every input present; symmetric: an empty tensor
        values = ctx.constants(base, [("packed", packed), ("scales", scales)])
        values.append(ctx.constants(base, [("zero_points", zero_points)])[0] if zero_points.size
                      else ctx.empty(np.uint8))
        return values

    def layer(self, ctx: EmitContext, node: ir.Node, base: str, activation: ir.Value,
              constants: list[ir.Value | None],
              quantized: BlockwiseWeight, spec: WeightSpec, weight_shape: tuple[int, int],
              bias: ir.Value | None) -> Emitted:
        k, n = weight_shape
        block = quantized.block_size
        if spec.bits not in NBITS:
            inputs = [activation, *constants, bias if bias is not None else ctx.empty(np.float32)]
            replacement = ir.node("MatMulIntN", inputs, domain=custom_ops.DOMAIN, name=node.name,
                                  attributes={"K": k, "N": n, "bits": spec.bits, "block_size": block})
            copy_output_type(replacement.outputs[0], node.outputs[0])
            return Emitted([replacement], f"{node.op_type}_intn")
        inputs: list[ir.Value | None] = [activation, *constants]
        if bias is not None:
            inputs += [None] * (5 - len(inputs)) + [bias]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {"K": k, "N": n, "bits": spec.bits, "block_size": block, "accuracy_level": ctx.accuracy_level}
        replacement = ir.node("MatMulNBits", inputs, attributes=attributes, domain=CONTRIB, name=node.name)
        copy_output_type(replacement.outputs[0], node.outputs[0])
        return Emitted([replacement], node.op_type)

    def gather(self, ctx: EmitContext, node: ir.Node, table: np.ndarray, ids: ir.Value, base: str,
               spec: WeightSpec, quantized: BlockwiseWeight | None = None) -> tuple[ir.Node, BlockwiseWeight]:
        """``GatherBlockQuantized`` for ``Gather(E, ids)`` (axis 0): codes of ``E`` blockwise along its rows (round
        to nearest, or ``quantized``: codes ``[rows, cols]`` chosen before, trained ones)."""
        block = spec.block_for(table.shape[1])
        q = quantized if quantized is not None else \
            quantize_rtn(np.ascontiguousarray(table.T), spec.bits, block, spec.symmetric)  # codes [rows, cols]
        if q.codes.shape != table.shape or q.block_size != block or q.bits != spec.bits:
            raise ValueError(f"codes {list(q.codes.shape)} of block {q.block_size} do not fit the table "
                             f"{list(table.shape)}")
        zero_points = None if q.zero_points is None else \
            packing.pack_zero_points(q.zero_points, spec.bits).reshape(table.shape[0], -1)
        values = ctx.constants(base, [("quantized", packing.pack_rows(q.codes, spec.bits)),
                                      ("scales", q.scales.astype(np.float32)), ("zero_points", zero_points)])
        inputs = [values[0], ids, *(v for v in values[1:] if v is not None)]
        replacement = ir.node("GatherBlockQuantized", inputs, domain=CONTRIB, name=node.name,
                              attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block,
                                          "bits": spec.bits})
        copy_output_type(replacement.outputs[0], node.outputs[0])
        return replacement, q


_INSTANCES: dict[int, IntFormat] = {}


def int_format(bits: int) -> IntFormat:
    """The ``int<bits>`` format (one instance per width)."""
    if bits not in _INSTANCES:
        _INSTANCES[bits] = IntFormat(bits)
    return _INSTANCES[bits]


INT2, INT3, INT4, INT8 = (int_format(b) for b in (2, 3, 4, 8))
