"""The export form of the int8 QAT layers: two marker ops carrying the trained int8 quantization.

::

    W = ai.qcompiler.qat.Int8Weight(codes int8, scale float32 [C] or []; axis (-1: one scale), qmax, layer)
    Y = ai.qcompiler.qat.QuantizeActivation(X, scale float32 [], zero_point uint8/int8 []; layer)

``W = codes * scale`` (along ``axis``); ``Y`` is ``X`` quantized and dequantized with ``QuantizeLinear``'s
arithmetic. ``import-qat`` turns them into the int8 lowering's pinned weight scales and activation parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnxscript
import torch
from onnx.defs import OpSchema

from qcompiler.torch import numerics

__all__ = ["ACTIVATION_OP", "INT8_WEIGHT_OP", "Int8Frozen", "freeze_int8_layer", "translations"]

DOMAIN = "ai.qcompiler.qat"
INT8_WEIGHT_OP = "Int8Weight"
ACTIVATION_OP = "QuantizeActivation"


@torch.library.custom_op("qcompiler_qat::int8_weight", mutates_args=())
def _int8_weight(codes: torch.Tensor, scale: torch.Tensor, axis: int, qmax: int, layer: str) -> torch.Tensor:
    if axis < 0:
        return codes.to(torch.float32) * scale
    shape = [1] * codes.dim()
    shape[axis] = -1
    return codes.to(torch.float32) * scale.reshape(shape)


@_int8_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, axis: int, qmax: int, layer: str) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _limits(zero: torch.Tensor) -> tuple[int, int]:
    return (0, 255) if zero.dtype == torch.uint8 else (-128, 127)


@torch.library.custom_op("qcompiler_qat::quantize_activation", mutates_args=())
def _quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layer: str) -> torch.Tensor:
    z = zero.to(torch.float32)
    return (numerics.quantize_activation(x, scale, z, *_limits(zero)) - z) * scale


@_quantize_activation.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layer: str) -> torch.Tensor:
    return torch.empty_like(x)


def _schemas() -> tuple[OpSchema, OpSchema]:
    parameter, attribute, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    weight = OpSchema(
        INT8_WEIGHT_OP, DOMAIN, 1, doc="A QAT-trained int8 weight: codes and scales.",
        inputs=[parameter("codes", "T1"), parameter("scale", "T2")], outputs=[parameter("weight", "T2")],
        type_constraints=[("T1", ["tensor(int8)"], ""), ("T2", ["tensor(float)"], "")],
        attributes=[attribute("axis", kind.INT, ""), attribute("qmax", kind.INT, ""),
                    attribute("layer", kind.STRING, "")])
    activation = OpSchema(
        ACTIVATION_OP, DOMAIN, 1, doc="A QAT-trained activation quantization (QuantizeLinear then DequantizeLinear).",
        inputs=[parameter("x", "T2"), parameter("scale", "T2"), parameter("zero_point", "T1")],
        outputs=[parameter("y", "T2")],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int8)"], ""), ("T2", ["tensor(float)"], "")],
        attributes=[attribute("layer", kind.STRING, "")])
    return weight, activation


_OPSET = onnxscript.values.Opset(DOMAIN, 1)
_WEIGHT_SCHEMA, _ACTIVATION_SCHEMA = _schemas()
_WEIGHT = onnxscript.values.Op(_OPSET, INT8_WEIGHT_OP, _WEIGHT_SCHEMA)
_ACTIVATION = onnxscript.values.Op(_OPSET, ACTIVATION_OP, _ACTIVATION_SCHEMA)


def _weight_onnx(codes: Any, scale: Any, axis: int, qmax: int, layer: str) -> Any:
    return _WEIGHT(codes, scale, axis=axis, qmax=qmax, layer=layer)


def _activation_onnx(x: Any, scale: Any, zero: Any, layer: str) -> Any:
    return _ACTIVATION(x, scale, zero, layer=layer)


def translations() -> dict[Any, Any]:
    """The exporter's custom translations of the two ops."""
    return {torch.ops.qcompiler_qat.int8_weight.default: _weight_onnx,
            torch.ops.qcompiler_qat.quantize_activation.default: _activation_onnx}


@dataclasses.dataclass
class Int8Frozen:
    """An int8 layer's exact trained quantization: weight codes/scales and the input's scale/zero point."""

    codes: torch.Tensor
    scale: torch.Tensor
    axis: int | None
    qmax: int
    input_scale: torch.Tensor
    input_zero: torch.Tensor


def freeze_int8_layer(layer: torch.nn.Module, name: str, buffer_name: Any) -> tuple[Int8Frozen, list[str]]:
    """Register the layer's frozen quantization as buffers and install its export-time forward; return the
    frozen record and the buffer names (the caller removes them)."""
    wq, aq = layer.weight_fake_quant, layer.input_fake_quant
    codes, scale = wq.quantize(layer.weight)
    input_scale, zero = aq.qparams()
    zero_code = zero.detach().to(torch.uint8 if aq.dtype == "uint8" else torch.int8).reshape(())
    frozen = Int8Frozen(codes, scale.to(torch.float32), wq.axis, wq.qmax,
                        input_scale.detach().to(torch.float32).reshape(()), zero_code)
    names = [buffer_name(layer, stem) for stem in ("codes", "scale", "input_scale", "input_zero")]
    for buffer, tensor in zip(names, (frozen.codes, frozen.scale, frozen.input_scale, frozen.input_zero),
                              strict=True):
        layer.register_buffer(buffer, tensor, persistent=False)
    axis = -1 if wq.axis is None else wq.axis

    def forward_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s, a_s, a_z = (getattr(layer, n) for n in names)
        return (torch.ops.qcompiler_qat.quantize_activation(x, a_s, a_z, name),
                torch.ops.qcompiler_qat.int8_weight(c, s, axis, wq.qmax, name))

    layer._qat_export = forward_inputs
    return frozen, names
