"""``fold-scalar-mul-div``: fold a multiplication or division by a constant scalar into the preceding weights.

Models exported from training code often scale the output of a linear layer by a constant: attention's
``(Q @ K^T) / sqrt(d)``, a ``* 0.5`` residual scale, a ``/ temperature`` before a softmax, a folded normalization.
Left alone, the scale is an extra elementwise op over the whole activation, and for quantization it is worse: it
sits between the layer and whatever consumes it, hiding a MatMul + Add from the Gemm fusion and a Conv + Relu from
the activation fusion. Because those layers are linear in their weights, the scale folds into them exactly::

    MatMul:         (A @ W) * s                     = A @ (W * s)            (or (W * s) @ B when A is the constant)
    Gemm:           (alpha A'B' + beta C) * s       = alpha A'(B' * s) + beta (C * s)
    Conv[Transpose] (conv(X, W) + b) * s            = conv(X, W * s) + b * s
    and the same with ``/ s``, computed as ``W / s`` (not ``W * (1/s)``) to keep the rounding of the original.

The results agree with the original model up to float rounding (one rounding of ``W * s`` instead of one of ``y * s``;
exact when ``s`` is a power of two and nothing over- or underflows).

What it will not touch (each counted in the report with its reason, never raised):

- the scale is not a constant, is a graph input (it can be overridden at run time), has more than one element, is
  not a float of the weights' type, is zero (division) or not finite;
- the scale could broadcast the output to a higher rank (its rank exceeds the layer output's known rank);
- ``s / y`` (the layer output is the divisor): not linear in the weights;
- the layer's output is used elsewhere or is a graph output (the unscaled value must stay);
- the weights or the bias are not initializers, or are graph inputs.

A weight shared with another node is copied into a new initializer rather than changed in place. Only the main graph
is rewritten (not If/Loop/Scan bodies).

Options (keyword-only, e.g. in a recipe's ``[pass-options.fold-scalar-mul-div]``):

- ``op_types``: the layer types to fold into (default: MatMul, Gemm, Conv, ConvTranspose);
- ``fold_div``: also fold divisions (default true).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass

__all__ = ["FoldScalarMulDivPass", "SUPPORTED_OPS"]

logger = logging.getLogger(__name__)

#: Layer types whose output is linear in (weights, bias), with the input indices that are scaled.
SUPPORTED_OPS: dict[str, tuple[int, ...]] = {
    "MatMul": (),  # one of the two operands, whichever is the constant (see _matmul_weight)
    "Gemm": (1, 2),  # B and C (C optional)
    "Conv": (1, 2),  # W and bias (bias optional)
    "ConvTranspose": (1, 2),
}


class FoldScalarMulDivPass(QPass):
    """Fold ``Mul``/``Div`` by a constant scalar after MatMul/Gemm/Conv into the layer's weights (and bias).

    Args:
        op_types: the layer types to fold into.
        fold_div: also fold ``y / s``.
    """

    name: ClassVar[str] = "fold-scalar-mul-div"
    stage: ClassVar[str] = "fuse"
    preserves_float: ClassVar[bool] = True
    # Run before fuse-matmul-add / fuse-conv-activation, so that MatMul*s+b becomes a Gemm and Conv*s->Relu fuses.
    after: ClassVar[str | None] = "fuse-conv-bn"

    def __init__(self, *, op_types: Sequence[str] = tuple(SUPPORTED_OPS), fold_div: bool = True) -> None:
        super().__init__()
        if isinstance(op_types, str) or not all(isinstance(t, str) for t in op_types):
            raise ConfigError(f"{self.name}: op_types must be a list of operator names, got {op_types!r}")
        unknown = sorted(set(op_types) - set(SUPPORTED_OPS))
        if unknown:
            raise ConfigError(f"{self.name}: cannot fold into {', '.join(unknown)} "
                              f"(supported: {', '.join(SUPPORTED_OPS)})")
        if not isinstance(fold_div, bool):
            raise ConfigError(f"{self.name}: fold_div must be true or false, got {fold_div!r}")
        self.op_types = tuple(op_types)
        self.fold_div = fold_div

    # -- the pass ---------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            if node.graph is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div"):
                continue
            if self._try_fold(graph, node):
                folded += 1
        if folded:
            logger.debug("folded %d scalar Mul/Div into weights", folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    def _try_fold(self, graph: ir.Graph, scale_node: ir.Node) -> bool:
        """Fold one Mul/Div if it qualifies; record a skip with the reason when it does not."""
        is_div = scale_node.op_type == "Div"
        if len(scale_node.inputs) != 2 or any(v is None for v in scale_node.inputs):
            return False
        left, right = scale_node.inputs
        assert left is not None and right is not None
        # Which operand is the layer output? Only candidates (an operand made by a supported layer) are reported.
        if _producer_op(left) in self.op_types:
            layer_out, scalar = left, right
        elif not is_div and _producer_op(right) in self.op_types:
            layer_out, scalar = right, left
        elif is_div and _producer_op(right) in self.op_types:
            self.skip(scale_node, "layer output is the divisor (s / y)")
            return False
        else:
            return False
        if is_div and not self.fold_div:
            self.skip(scale_node, "fold_div is off")
            return False
        layer = layer_out.producer()
        assert layer is not None

        reason = _check_layer_output(layer_out, scale_node)
        if reason is None:
            s, reason = _scalar_value(scalar, layer_out)
        if reason is None and is_div:
            reason = "division by zero" if s == 0 else None
        targets: list[ir.Value] = []
        if reason is None:
            targets, reason = self._targets(layer)
        if reason is None:
            dtypes = {t.const_value.dtype for t in targets if t.const_value is not None}
            if dtypes != {ir.DataType.from_numpy(s.dtype)}:
                reason = "scale and weights have different element types"
        if reason is not None:
            self.skip(scale_node, reason)
            return False

        for target in targets:
            self._scale_input(graph, layer, target, s, divide=is_div)
        self._bypass(graph, scale_node, layer_out)
        _drop_if_unused(graph, scalar)
        self.count("folded_div" if is_div else "folded_mul")
        self.count(f"into_{layer.op_type.lower()}")
        return True

    def _targets(self, layer: ir.Node) -> tuple[list[ir.Value], str | None]:
        """The constant inputs of ``layer`` to scale, or a reason why it cannot be done."""
        if layer.op_type == "MatMul":
            a, b = (layer.inputs + (None, None))[:2]
            for operand in (b, a):
                if operand is not None and _is_plain_initializer(operand):
                    return [operand], None
            return [], "neither MatMul operand is an initializer"
        targets = []
        for index in SUPPORTED_OPS[layer.op_type]:
            if index >= len(layer.inputs) or layer.inputs[index] is None:
                continue  # optional bias absent
            value = layer.inputs[index]
            assert value is not None
            if not _is_plain_initializer(value):
                what = "weight" if index == 1 else "bias"
                return [], f"{layer.op_type} {what} is not an initializer"
            targets.append(value)
        return targets, None

    def _scale_input(self, graph: ir.Graph, layer: ir.Node, value: ir.Value, s: np.ndarray, *, divide: bool) -> None:
        """Replace ``value`` (an input of ``layer``) by ``value * s`` (or ``/ s``): in place unless it is shared."""
        assert value.const_value is not None and value.name is not None
        array = value.const_value.numpy()
        scaled = (np.divide(array, s) if divide else np.multiply(array, s)).astype(array.dtype, copy=False)
        if len(value.uses()) == 1:
            value.const_value = ir.tensor(scaled, name=value.name)
            return
        name = _fresh_name(graph, f"{value.name}_scaled")
        new_value = ir.Value(name=name, shape=ir.Shape(scaled.shape), type=value.type,
                             const_value=ir.tensor(scaled, name=name))
        graph.register_initializer(new_value)
        for index, operand in enumerate(layer.inputs):
            if operand is value:
                layer.replace_input_with(index, new_value)
        self.count("weights_copied")

    @staticmethod
    def _bypass(graph: ir.Graph, scale_node: ir.Node, layer_out: ir.Value) -> None:
        """Make ``layer_out`` take the place of the Mul/Div's output and remove the Mul/Div."""
        scaled_out = scale_node.outputs[0]
        was_output = scaled_out.is_graph_output()
        out_name = scaled_out.name
        if layer_out.shape is None and scaled_out.shape is not None:
            layer_out.shape = scaled_out.shape
        scaled_out.replace_all_uses_with(layer_out, replace_graph_outputs=True)
        graph.remove(scale_node, safe=True)
        if was_output:  # keep the model's output name
            layer_out.name = out_name


def _producer_op(value: ir.Value) -> str | None:
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    return producer.op_type


def _is_plain_initializer(value: ir.Value) -> bool:
    """An initializer with data that cannot be overridden at run time."""
    return value.is_initializer() and value.const_value is not None and not value.is_graph_input()


def _check_layer_output(layer_out: ir.Value, scale_node: ir.Node) -> str | None:
    if layer_out.is_graph_output():
        return "layer output is also a graph output"
    if any(user is not scale_node for user, _ in layer_out.uses()) or len(layer_out.uses()) != 1:
        return "layer output has other uses"
    return None


def _scalar_value(value: ir.Value, layer_out: ir.Value) -> tuple[np.ndarray, str | None]:
    """The scale as a 0-d array, or a reason why ``value`` is not a foldable scalar constant."""
    empty = np.zeros((), np.float32)
    if value.is_graph_input():
        return empty, "scale is a graph input"
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        tensor = None
    if tensor is None:
        return empty, "scale is not a constant"
    array = tensor.numpy()
    if array.size != 1:
        return empty, "scale is not a scalar"
    if not np.issubdtype(array.dtype, np.floating):
        return empty, "scale is not a float"
    out_rank = len(layer_out.shape) if layer_out.shape is not None else None
    if array.ndim > 0 and (out_rank is None or array.ndim > out_rank):
        return empty, "scale could broadcast the output to a higher rank"
    scalar = array.reshape(())
    if not np.isfinite(scalar):
        return empty, "scale is not finite"
    return scalar, None


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the folded scale's initializer or Constant node once nothing uses it."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if producer is not None:
        if producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
    elif value.is_initializer() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _fresh_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers)
    taken.update(v.name for node in graph for v in node.outputs if v.name)
    taken.update(v.name for v in graph.inputs if v.name)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
