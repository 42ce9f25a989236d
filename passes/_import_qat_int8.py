"""``import-qat`` for the static int8 markers (:mod:`qcompiler.torch._int8_markers`): pinned weight scales and
activation parameters that ``annotate-int8`` and ``lower-int8-qdq`` then use as trained.

- ``Int8Weight(codes, scale; axis, qmax)``: checked (int8 codes within ``[-qmax, qmax]``, finite positive scales
  along ``axis`` or one), replaced by the float constant ``codes * scale`` in the orientation its reader needs (a
  Conv or a Gemm with ``transB`` reads it as stored; a MatMul reads the Transpose of it, axis 0 becoming 1) with the
  scales pinned (:data:`~qcompiler.metadata.PINNED_SCALE_KEY`: the lowering's ``rint(w / s)`` gives back the
  trained codes exactly) and the layer marked trained, with its ``qmax``.
- ``QuantizeActivation(x, scale, zero_point)``: becomes an ``Identity`` whose output carries the trained scale and
  zero point (:data:`~qcompiler.metadata.PINNED_QPARAMS_KEY`); one tensor per trained input, so two layers reading
  the same tensor keep their own parameters.
- a trained layer's output (after its fused Relu/Clip) gets the parameters of the trained input it reaches through
  data-movement ops (Relu, MaxPool, Reshape, Flatten, Transpose, Identity, Squeeze, Unsqueeze: they commute with
  the quantization), so the lowering can quantize it where ONNX Runtime needs it (QLinearConv) without changing a
  value; an output that reaches no trained input stays float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.errors import InvalidModelError
from qcompiler.metadata import PINNED_QPARAMS_KEY, PINNED_SCALE_KEY, TRAINED_KEY, TRAINED_QMAX_KEY
from qcompiler.passes._common import NameScope, const_array
from qcompiler.passes._weight_layers import attribute

__all__ = ["ACTIVATION_OP", "INT8_WEIGHT_OP", "import_activation", "import_int8_weight", "pin_layer_outputs"]

INT8_WEIGHT_OP = "Int8Weight"
ACTIVATION_OP = "QuantizeActivation"
#: ops the quantization commutes with (same values on the grid before and after)
_PASS_THROUGH = frozenset({"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze"})


def _refuse(node: ir.Node, problem: str) -> InvalidModelError:
    return InvalidModelError(f"QAT marker {node.name!r}: {problem}")


def _constant(graph: ir.Graph, names: NameScope, array: np.ndarray, stem: str) -> ir.Value:
    name = names.fresh(f"{stem}_trained")
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
    graph.register_initializer(value)
    return value


def import_int8_weight(marker: ir.Node, graph: ir.Graph, names: NameScope) -> list[ir.Node]:
    """Replace an ``Int8Weight`` marker (see the module docstring); return the layer nodes it feeds."""
    if len(marker.inputs) != 2 or len(marker.outputs) != 1:
        raise _refuse(marker, "Int8Weight takes codes and scale")
    codes, scale = (const_array(v) for v in marker.inputs)
    axis, qmax = int(attribute(marker, "axis", -1)), int(attribute(marker, "qmax", 127))
    if codes is None or scale is None or codes.dtype != np.int8 or codes.ndim < 2 or 0 in codes.shape:
        raise _refuse(marker, "codes must be a constant int8 tensor of rank 2 or more")
    if qmax not in (1, 3, 7, 15, 31, 63, 127) or int(np.abs(codes.astype(np.int16)).max()) > qmax:
        raise _refuse(marker, f"codes outside [-{qmax}, {qmax}] (qmax 2^(b-1) - 1 for 2 to 8 bits)")
    expected = () if axis < 0 else (codes.shape[axis],) if axis < codes.ndim else None
    if expected is None or scale.shape != expected or scale.dtype != np.float32 or \
            not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise _refuse(marker, "scales must be finite positive float32 values, one per channel of the axis")
    shape = [1] * codes.ndim
    if axis >= 0:
        shape[axis] = -1
    weight = (codes.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    stem = marker.outputs[0].name or "qat_int8_weight"
    layers: list[ir.Node] = []
    for user, index in list(marker.outputs[0].uses()):
        default = user.domain in ("", "ai.onnx")
        if default and index == 1 and (user.op_type == "Conv" or (user.op_type == "Gemm" and
                                                                   attribute(user, "transB", 0))):
            value = _constant(graph, names, weight, stem)
            value.meta[PINNED_SCALE_KEY] = scale.astype(np.float32)
            user.replace_input_with(1, value)
            layers.append(user)
        elif default and user.op_type == "Transpose" and codes.ndim == 2 and axis in (0, -1) and \
                tuple(attribute(user, "perm", [1, 0])) == (1, 0):
            value = _constant(graph, names, weight.T, stem)
            value.meta[PINNED_SCALE_KEY] = scale.astype(np.float32)
            for reader, slot in list(user.outputs[0].uses()):
                if not (reader.domain in ("", "ai.onnx") and slot == 1 and reader.op_type in ("MatMul", "Gemm")
                        and not attribute(reader, "transB", 0)):
                    raise _refuse(marker, f"its transposed weight feeds {reader.op_type} input {slot}")
                reader.replace_input_with(1, value)
                layers.append(reader)
            graph.remove(user, safe=True)
        else:
            raise _refuse(marker, f"its weight feeds {user.op_type} {user.name!r} input {index}: only a Conv, a "
                                  "Gemm with transB or a MatMul through Transpose can take a trained int8 weight")
    for layer in layers:
        layer.meta[TRAINED_KEY] = True
        layer.meta[TRAINED_QMAX_KEY] = qmax
    return layers


def import_activation(marker: ir.Node) -> None:
    """Turn a ``QuantizeActivation`` marker into an Identity whose output carries its pinned parameters."""
    if len(marker.inputs) != 3 or len(marker.outputs) != 1:
        raise _refuse(marker, "QuantizeActivation takes x, scale and zero_point")
    scale, zero = const_array(marker.inputs[1]), const_array(marker.inputs[2])
    if scale is None or zero is None or scale.shape != () or zero.shape != () or scale.dtype != np.float32 or \
            zero.dtype not in (np.uint8, np.int8) or not np.isfinite(scale) or not scale > 0:
        raise _refuse(marker, "scale must be a finite positive float32 scalar and zero_point a uint8/int8 scalar")
    identity = ir.node("Identity", [marker.inputs[0]], name=marker.name)
    ir.convenience.replace_nodes_and_values(marker.graph, marker, [marker], [identity], [marker.outputs[0]],
                                           [identity.outputs[0]])
    identity.outputs[0].meta[PINNED_QPARAMS_KEY] = (scale.astype(np.float32), zero)


def _reached_qparams(value: ir.Value, depth: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The pinned parameters of the trained input ``value`` reaches through pass-through ops (one path only)."""
    if depth > 16 or value.is_graph_output():
        return None
    found = None
    for user, _ in value.uses():
        if user.domain not in ("", "ai.onnx"):
            return None
        pinned = user.outputs[0].meta.get(PINNED_QPARAMS_KEY) if user.op_type == "Identity" else None
        here = pinned if pinned is not None else (
            _reached_qparams(user.outputs[0], depth + 1) if user.op_type in _PASS_THROUGH else None)
        if here is None or (found is not None and not (np.array_equal(here[0], found[0]) and
                                                       np.array_equal(here[1], found[1]))):
            return None
        found = here
    return found


def pin_layer_outputs(layers: list[ir.Node]) -> None:
    """Give each trained layer's output (through one Relu/Clip behind it) the parameters of the trained input it
    reaches, where there is one."""
    for layer in layers:
        output = layer.outputs[0]
        users = list(output.uses())
        after, pinned = output, [output]
        if len(users) == 1 and users[0][0].op_type in ("Relu", "Clip") and not output.is_graph_output():
            after = users[0][0].outputs[0]
            # Q of the pre-Relu value on a grid from 0 equals Q after the Relu; a Clip's upper bound need not lie
            # on the grid, so only its output takes the parameters
            pinned = [output, after] if users[0][0].op_type == "Relu" else [after]
        reached = _reached_qparams(after)
        if reached is not None:
            for value in pinned:
                value.meta[PINNED_QPARAMS_KEY] = reached
