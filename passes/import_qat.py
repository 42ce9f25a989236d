"""Import QAT-trained weights: each ``ai.qcompiler.qat.QuantizedWeight`` marker (written by
:func:`qcompiler.torch.export`) becomes its layer's weight spec and codes, exactly as training used them.

A marker holds a weight ``wt[N, K]`` (torch's layout) as its codes (uint8 ``[N, K]``; FP8: E4M3FN bit patterns),
its parameters (grid formats: scales and zero points ``[N, n_blocks]``; NF4: absmax per block of ``wt``
flattened; FP8: one scale per row) and the spec in its attributes. The pass checks all of it (a hostile file is
refused with one line naming the marker), builds the format's quantized weight from the codes (no rounding), and
rewires each reader onto a float constant holding the dequantized weight (so the graph keeps its meaning):

- ``MatMul(x, Transpose(marker))`` (torch's ``nn.Linear`` on 3-D inputs): the layer ``W[K, N] = wt^T``;
- ``Gemm(x, marker, transB = 1)`` (``nn.Linear`` on 2-D inputs): the same layer, stored transposed;
- ``Gather(marker, ids)`` over axis 0 (``nn.Embedding``): the embedding table, blocks along its rows.

The layer node gets the spec (:data:`~qcompiler.metadata.WEIGHT_SPEC_KEY`), the codes
(:data:`~qcompiler.metadata.WEIGHT_CODES_KEY`) and :data:`~qcompiler.metadata.TRAINED_KEY`: annotation keeps them,
algorithms and mixed precision skip the layer, and ``annotate-weight-only`` quantizes no untrained layer of such a
model (the deployed model is what training saw). A marker read any other way (a MatMul or Gemm reading ``wt``
itself as ``[K, N]``, a Conv, an elementwise op) is refused: its blocks would run along the wrong axis.
"""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError, InvalidModelError
from qcompiler.formats import WeightSpec, get_format
from qcompiler.formats.channelwise import QuantizedWeight
from qcompiler.formats.fp8 import Fp8Weight
from qcompiler.formats.nf4 import Nf4Weight
from qcompiler.formats.nf4_dq import Nf4DqWeight, double_quantize_absmax
from qcompiler.metadata import QAT_LAYERS, TRAINED_KEY, WEIGHT_CODES_KEY, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, const_array, drop_unused_initializers
from qcompiler.passes._import_qat_int8 import (
    ACTIVATION_OP,
    INT8_WEIGHT_OP,
    import_activation,
    import_int8_weight,
    pin_layer_outputs,
)
from qcompiler.passes._weight_layers import attribute

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "ImportQATPass", "has_markers"]

MARKER_DOMAIN = "ai.qcompiler.qat"
MARKER_OP = "QuantizedWeight"


def has_markers(model: ir.Model) -> bool:
    """Whether the main graph holds a QAT marker."""
    return any(n.domain == MARKER_DOMAIN for n in model.graph)


def _spec(node: ir.Node) -> WeightSpec:
    try:
        spec = WeightSpec(str(attribute(node, "format", "")), int(attribute(node, "bits", 0)),
                          int(attribute(node, "block_size", 0)), bool(attribute(node, "symmetric", 1)),
                          str(attribute(node, "zero_point", "int")), str(attribute(node, "kernel", "")))
        get_format(spec.format).check(spec)
    except (ConfigError, TypeError, ValueError) as exc:
        raise InvalidModelError(f"QAT marker {node.name!r}: {exc}") from None
    if spec.format not in ("nf4", "nf4-dq", "fp8", "ternary") and not (spec.format.startswith("int") and
                                                             spec.format[3:].isdigit()):
        raise InvalidModelError(f"QAT marker {node.name!r}: format {spec.format!r} has no trained form")
    return spec


def _inputs(node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(node.inputs) != 3 or len(node.outputs) != 1:
        raise InvalidModelError(f"QAT marker {node.name!r} must have 3 inputs and 1 output")
    arrays = [const_array(v) for v in node.inputs]
    if any(a is None for a in arrays):
        raise InvalidModelError(f"QAT marker {node.name!r}: codes, scale and zero must be constants")
    return arrays[0], arrays[1], arrays[2]  # type: ignore[return-value]


def _refuse(node: ir.Node, problem: str) -> InvalidModelError:
    return InvalidModelError(f"QAT marker {node.name!r}: {problem}")


def quantized_from_marker(node: ir.Node) -> tuple[WeightSpec, Any]:
    """(spec, the format's quantized weight of ``W[K, N] = wt^T``) of a marker, every input checked."""
    spec = _spec(node)
    codes, scale, zero = _inputs(node)
    if codes.dtype != np.uint8 or codes.ndim != 2 or 0 in codes.shape:
        raise _refuse(node, f"codes must be a non-empty 2-D uint8 tensor, got {codes.dtype} {list(codes.shape)}")
    if scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise _refuse(node, "scales must be finite positive float32 values")
    n, k = codes.shape
    block = spec.block_for(k)
    fmt = get_format(spec.format)
    if spec.format == "nf4":
        if scale.shape != (-(-n * k // block),) or codes.max() > 15:
            raise _refuse(node, "NF4 codes above 15 or absmax not one per block")
        return spec, Nf4Weight(codes, scale, block)
    if spec.format == "nf4-dq":  # scale: the served absmax; zero: the exact ones, double-quantized again here
        blocks = -(-n * k // block)
        if scale.shape != (blocks,) or zero.dtype != np.float32 or zero.shape != (blocks,) or codes.max() > 15 \
                or not np.all(np.isfinite(zero)) or not np.all(zero > 0):
            raise _refuse(node, "NF4 codes above 15, or served/exact absmax not one finite positive value per block")
        absmax_codes, step, offset, served = double_quantize_absmax(zero)
        if not np.array_equal(served, scale):
            raise _refuse(node, "its served absmax are not the double quantization of its exact absmax")
        return spec, Nf4DqWeight(codes, scale, block, absmax_codes=absmax_codes, step=step, offset=offset)
    if spec.format == "fp8":
        values = codes.view(ml_dtypes.float8_e4m3fn)
        if scale.shape != (n,) or not np.all(np.isfinite(values.astype(np.float32))):
            raise _refuse(node, "FP8 codes hold NaN or the scales are not one per row")
        return spec, Fp8Weight(QuantizedWeight(np.ascontiguousarray(values.T), scale, 1, float("nan")))
    blocks = -(-k // block)
    low, high = fmt.code_limits(spec)
    if scale.shape != (n, blocks) or codes.min() < low or codes.max() > high:
        raise _refuse(node, f"codes outside [{low}, {high}] or scales not [{n}, {blocks}]")
    if spec.symmetric:
        zero = np.zeros((n, blocks), np.uint8)  # not stored: from_codes drops it
    elif spec.float_zero_point:
        if zero.dtype != np.float32 or zero.shape != (n, blocks) or not np.all(np.isfinite(zero)):
            raise _refuse(node, f"float zero points must be finite float32 [{n}, {blocks}]")
    elif zero.dtype != np.uint8 or zero.shape != (n, blocks) or zero.max() > (1 << spec.bits) - 1:
        raise _refuse(node, f"zero points must be uint8 codes [{n}, {blocks}] below {1 << spec.bits}")
    return spec, fmt.from_codes(codes, scale, zero, spec, k)


class _TrainedConstants:
    """The dequantized trained weight as float initializers, made once per orientation: ``W[K, N]``
    (``transposed``, what a MatMul reads) or ``wt[N, K]`` (a Gemm with ``transB``, an embedding table)."""

    def __init__(self, graph: ir.Graph, names: NameScope, weight: np.ndarray, stem: str) -> None:
        self.graph, self.names, self.weight, self.stem = graph, names, weight, stem
        self.made: dict[bool, ir.Value] = {}

    def get(self, *, transposed: bool) -> ir.Value:
        if transposed not in self.made:
            array = np.ascontiguousarray(self.weight if transposed else self.weight.T)
            name = self.names.fresh(f"{self.stem}_trained")
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                             type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape))
            self.graph.register_initializer(value)
            self.made[transposed] = value
        return self.made[transposed]


class ImportQATPass(QPass):
    """Turn every QAT marker into its layer's spec and trained codes (see the module docstring)."""

    name = "import-qat"
    stage = "annotate"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        markers = [n for n in graph if n.domain == MARKER_DOMAIN]
        if not markers:
            return ir.passes.PassResult(model, False)
        names = NameScope(model)
        old: list[ir.Value] = []
        self.readers: dict[str, list[str]] = {}
        int8_layers: list[ir.Node] = []
        for marker in markers:
            if marker.op_type in (INT8_WEIGHT_OP, ACTIVATION_OP):
                layer = str(attribute(marker, "layer", "")) or marker.name or f"marker_{len(self.readers)}"
                if marker.op_type == ACTIVATION_OP:
                    import_activation(marker)
                    self.count("imported_int8_activation")
                    continue
                old.extend(v for v in marker.inputs if v is not None)
                found = import_int8_weight(marker, graph, names)
                for node in found:
                    if not node.name:
                        node.name = names.fresh("qat_layer")
                    self.readers.setdefault(layer, []).append(node.name)
                int8_layers.extend(found)
                graph.remove(marker, safe=True)
                self.count("imported_int8_weight")
                continue
            if marker.op_type != MARKER_OP:
                raise InvalidModelError(f"unknown QAT op {MARKER_DOMAIN}.{marker.op_type} ({marker.name!r})")
            spec, quantized = quantized_from_marker(marker)
            constants = _TrainedConstants(graph, names, quantized.dequantize(), marker.outputs[0].name or "qat")
            layer = str(attribute(marker, "layer", "")) or marker.name or f"marker_{len(self.readers)}"
            self.readers.setdefault(layer, [])
            for user, index in list(marker.outputs[0].uses()):
                self._rewire(marker, user, index, spec, quantized, constants, names, layer)
            if marker.outputs[0].is_graph_output():
                raise _refuse(marker, "its weight is a graph output")
            old.extend(v for v in marker.inputs if v is not None)
            graph.remove(marker, safe=True)
            self.count(f"imported_{spec.format}")
        pin_layer_outputs(int8_layers)
        self.count("float_inputs_removed", drop_unused_initializers(old))
        model.metadata_props[QAT_LAYERS] = json.dumps(self.readers, sort_keys=True)
        return ir.passes.PassResult(model, True)

    def _rewire(self, marker: ir.Node, user: ir.Node, index: int, spec: WeightSpec, quantized: Any,
                constants: _TrainedConstants, names: NameScope, layer: str) -> None:
        default = user.domain in ("", "ai.onnx")
        if default and user.op_type == "Transpose" and index == 0 and \
                tuple(attribute(user, "perm", [1, 0])) == (1, 0):
            for reader, slot in list(user.outputs[0].uses()):
                if not (reader.domain in ("", "ai.onnx") and slot == 1 and (
                        reader.op_type == "MatMul" or (reader.op_type == "Gemm" and not attribute(reader, "transB", 0)))):
                    raise _refuse(marker, f"its transposed weight feeds {reader.op_type} {reader.name!r} input {slot}"
                                          ", not a MatMul/Gemm weight")
                reader.replace_input_with(slot, constants.get(transposed=True))
                self._mark(reader, spec, quantized, names, layer)
            if user.outputs[0].is_graph_output():
                raise _refuse(marker, "its transposed weight is a graph output")
            user.graph.remove(user, safe=True)
            return
        if default and user.op_type == "Gemm" and index == 1 and attribute(user, "transB", 0):
            user.replace_input_with(1, constants.get(transposed=False))
            self._mark(user, spec, quantized, names, layer)
            return
        if default and user.op_type == "Gather" and index == 0 and int(attribute(user, "axis", 0)) == 0 and \
                spec.format.startswith("int"):
            user.replace_input_with(0, constants.get(transposed=False))
            self._mark(user, spec, quantized, names, layer)
            return
        raise _refuse(marker, f"its weight feeds {user.op_type} {user.name!r} input {index}: only a MatMul/Gemm "
                              "weight (through Transpose or Gemm transB) or an embedding Gather can be trained")

    def _mark(self, node: ir.Node, spec: WeightSpec, quantized: Any, names: NameScope, layer: str) -> None:
        if not node.name:
            node.name = names.fresh("qat_layer")
        self.readers[layer].append(node.name)
        node.meta[WEIGHT_SPEC_KEY] = spec
        node.meta[WEIGHT_CODES_KEY] = quantized
        node.meta[TRAINED_KEY] = True
        self.count(f"trained_{node.op_type}")
