"""Read the codes back out of a compiled weight-only layer: the inverse of the formats' ONNX forms.

:func:`layer_codes` takes a node of a compiled model (``onnx.ModelProto``) and its initializers and returns the
layer's :class:`DecodedLayer`: codes ``[N, K]`` (uint8; FP8: the E4M3FN bit patterns), scales (``[N, n_blocks]``,
NF4 absmax per block, FP8 one per column) and zero points (``[N, n_blocks]`` or None). It reads
``com.microsoft.MatMulNBits``, ``MatMulBnb4``, ``GatherBlockQuantized``, ``ai.qcompiler.MatMulIntN`` and
``MatMulFp8``, and the ``DequantizeLinear`` of an FP8 weight. QAT's parity report compares these with the codes
training used; tests use it to check what a lowering wrote.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler.runtime import packing

__all__ = ["DecodedLayer", "initializer_arrays", "layer_codes"]


@dataclasses.dataclass
class DecodedLayer:
    """The codes ``[N, K]`` of one compiled layer, its scales and zero points (None: symmetric/none stored)."""

    op: str
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, index: int, tensors: dict[str, np.ndarray]) -> np.ndarray | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    return tensors.get(node.input[index])


def layer_codes(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> DecodedLayer | None:
    """The decoded layer of ``node`` (``tensors``: initializer name -> array), or None for another kind of node."""
    attrs = _attrs(node)
    op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
    if op == "com.microsoft.MatMulNBits" or op == "ai.qcompiler.MatMulIntN":
        k, n, bits, block = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))  # type: ignore[call-overload]
        packed, scales = _input(node, 1, tensors), _input(node, 2, tensors)
        zp = _input(node, 3, tensors)
        blocks = packing.block_count(k, block)
        intn = op.endswith("MatMulIntN")
        codes = packing.unpack_codes_intn(packed, bits, k) if intn else packing.unpack_codes(packed, bits, k)
        if zp is None or zp.size == 0:
            zero = None
        elif zp.dtype == np.uint8:
            zero = packing.unpack_zero_points_intn(zp, bits, n, blocks) if intn else \
                packing.unpack_zero_points(zp, bits, n, blocks)
        else:
            zero = zp.reshape(n, blocks)
        return DecodedLayer(op, codes, scales.reshape(n, blocks), zero)
    if op == "com.microsoft.MatMulBnb4":
        k, n = int(attrs["K"]), int(attrs["N"])  # type: ignore[call-overload]
        return DecodedLayer(op, packing.unpack_bnb4(_input(node, 1, tensors), n, k), _input(node, 2, tensors), None)
    if op == "com.microsoft.GatherBlockQuantized":
        bits = int(attrs.get("bits", 4))  # type: ignore[call-overload]
        data, scales = _input(node, 0, tensors), _input(node, 2, tensors)
        zp = _input(node, 3, tensors)
        codes = packing.unpack_rows(data, bits)
        zero = None if zp is None else packing.unpack_zero_points(zp, bits, *scales.shape)
        return DecodedLayer(op, np.ascontiguousarray(codes), scales, zero)
    if op == "ai.qcompiler.MatMulFp8":
        return DecodedLayer(op, _input(node, 1, tensors), _input(node, 2, tensors), None)
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
        weight = _input(node, 0, tensors)
        if weight is None or weight.ndim != 2:
            return None
        return DecodedLayer("DequantizeLinear", np.ascontiguousarray(weight.T).view(np.uint8),
                            _input(node, 1, tensors), None)
    return None


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray | None:
    """numpy's value of a constant node of the few kinds a lowering computes a weight parameter with (nf4-dq's
    absmax: Cast, Mul, Add, Reshape, Slice), float32 arithmetic as ONNX Runtime's; None for another node."""
    if node.op_type == "Cast":
        to = int(_attrs(node)["to"])  # type: ignore[call-overload]
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    if node.op_type in ("Mul", "Add") and inputs[0].dtype == inputs[1].dtype:
        return (inputs[0] * inputs[1]) if node.op_type == "Mul" else (inputs[0] + inputs[1])
    if node.op_type == "Reshape":
        return inputs[0].reshape([int(d) for d in inputs[1]])
    if node.op_type == "Slice" and len(inputs) == 3 and inputs[1].size == 1:
        return inputs[0][int(inputs[1][0]):int(inputs[2][0])]
    return None


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer of the main graph as a numpy array (external data must be loaded), and the outputs of the
    constant Cast/Mul/Add/Reshape/Slice nodes computed from them (a weight parameter built at load time)."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.input or \
                any(name not in tensors for name in node.input):
            continue
        try:
            value = _fold(node, [tensors[name] for name in node.input])
        except (ValueError, TypeError, IndexError, KeyError):  # not one of the forms a lowering writes
            continue
        if value is not None:
            tensors[node.output[0]] = value
    return tensors

