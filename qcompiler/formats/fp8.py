"""``fp8``: FP8 E4M3FN weights with one scale per output column (:func:`~.channelwise.quantize_weight_fp8`).

``s[n] = max(max |W[:, n]| / 448, MIN_SCALE)``, codes ``fp8(clip(W / s, -448, 448))`` (round to nearest even,
saturating). Two ONNX forms (``WeightSpec.kernel``):

- ``"dequantize"`` (plain ONNX, needs default opset 19): ``DequantizeLinear(W_fp8[K, N], s[N], axis=1)`` feeding
  the float MatMul/Gemm (ONNX Runtime has no fused CPU kernel: smaller, not faster);
- ``"fused"``: ``ai.qcompiler.MatMulFp8(A, W^T_e4m3 [N, K] as uint8, s[N], bias; K, N)`` (qcompiler's runtime
  Session with onnxruntime-extensions).

Symmetric, per column (``block_size`` does not apply). Not a grid: GPTQ and HQQ do not apply; AWQ's channel
scaling does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats.base import EmitContext, Emitted, WeightFormat, WeightSpec, copy_output_type
from qcompiler.formats.channelwise import QuantizedWeight, quantize_weight_fp8
from qcompiler.runtime import custom_ops

__all__ = ["FP8", "Fp8Format", "Fp8Weight", "MIN_OPSET"]

#: the default-domain opset the "dequantize" form needs (float8 DequantizeLinear)
MIN_OPSET = 19


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """FP8 E4M3FN codes of ``W[K, N]`` with one scale per column."""

    quantized: QuantizedWeight
    bits: int = 8

    def dequantize(self) -> np.ndarray:
        return self.quantized.q.astype(np.float32) * self.quantized.scale[None, :]

    def error_energies(self, weight: np.ndarray) -> tuple[float, float]:
        w = weight.astype(np.float64)
        diff = w - self.dequantize()
        return float(np.vdot(w, w)), float(np.vdot(diff, diff))


class Fp8Format(WeightFormat):
    """``fp8`` (see the module docstring)."""

    name = "fp8"
    bits = 8
    kernel_choices = ("dequantize", "fused")
    blockwise = False

    def quantize(self, weight: np.ndarray, spec: WeightSpec) -> Fp8Weight:
        return Fp8Weight(quantize_weight_fp8(weight, 1))

    def fits(self, quantized: Any, weight: np.ndarray, spec: WeightSpec) -> bool:
        return isinstance(quantized, Fp8Weight) and quantized.quantized.q.shape == weight.shape

    def kernels(self, spec: WeightSpec) -> tuple[str, ...]:
        return ("ai.onnx.DequantizeLinear",) if spec.kernel == "dequantize" else (f"{custom_ops.DOMAIN}.MatMulFp8",)

    def min_opset(self, spec: WeightSpec) -> int:
        """The default-domain opset the ONNX form needs (the lowering converts an older model)."""
        return MIN_OPSET if spec.kernel == "dequantize" else 1

    def constants(self, ctx: EmitContext, base: str, quantized: Fp8Weight, spec: WeightSpec,
                  weight_shape: tuple[int, int]) -> list[ir.Value | None]:
        q = quantized.quantized
        if spec.kernel == "dequantize":
            return ctx.constants(base, [("fp8", q.q), ("scale", q.scale)])
        return ctx.constants(base, [("fp8", np.ascontiguousarray(q.q.view(np.uint8).T)),
                                    ("scale", q.scale.astype(np.float32))])

    def layer(self, ctx: EmitContext, node: ir.Node, base: str, activation: ir.Value,
              constants: list[ir.Value | None],
              quantized: Fp8Weight, spec: WeightSpec, weight_shape: tuple[int, int],
              bias: ir.Value | None) -> Emitted:
        if spec.kernel == "fused":
            k, n = weight_shape
            inputs = [activation, *constants, bias if bias is not None else ctx.empty(np.float32)]
            replacement = ir.node("MatMulFp8", inputs, attributes={"K": k, "N": n}, domain=custom_ops.DOMAIN,
                                  name=node.name)
            copy_output_type(replacement.outputs[0], node.outputs[0])
            return Emitted([replacement], f"{node.op_type}_fp8", {"kernel": "fused"})
        dq = ir.node("DequantizeLinear", constants, attributes={"axis": 1}, name=ctx.fresh(f"{base}_fp8_dq"))
        dq.outputs[0].name = ctx.fresh(f"{base}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(weight_shape)
        inputs = [activation, dq.outputs[0]] + ([bias] if bias is not None else [])
        replacement = ir.node(node.op_type, inputs, name=node.name)
        copy_output_type(replacement.outputs[0], node.outputs[0])
        return Emitted([dq, replacement], f"{node.op_type}_fp8")


FP8 = Fp8Format()
