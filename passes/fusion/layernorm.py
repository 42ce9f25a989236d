"""Fuse a layer normalization spelled out in elementwise ops into one ``LayerNormalization`` (opset 17+).

Older exporters (and TensorFlow converters) write ``(x - mean(x)) / sqrt(var(x) + eps) * gamma + beta`` as::

    m = ReduceMean(x, axes); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d), axes)
    y = Div(d, Sqrt(Add(v, eps)))  [-> Mul(., gamma)]  [-> Add(., beta)]

For quantization those nine ops are one normalization: the activation-only candidates that ``annotate-int8``
would otherwise offer inside it (``Sub``, ``Div``...) are not the model's, and ONNX Runtime fuses
``Add + LayerNormalization`` into ``SkipLayerNormalization`` only for the single op.

Conditions: both ReduceMeans over the same trailing axes ``[r-k, ..., r-1]`` of ``x`` (rank known) with
``keepdims=1``, axes as attribute (opset < 18) or constant input; ``eps`` a positive scalar constant; ``gamma`` and
``beta`` (optional) constants whose shape broadcasts to the normalized dims without growing ``x`` (they are
expanded to exactly those dims); every intermediate value read only inside the pattern and not a graph output
(``d`` is read twice). The fused node is ``LayerNormalization(axis=r-k, epsilon=eps)`` with ``stash_type=1``
(float32 statistics); it keeps the last node's output value. Its float result differs from the nine-op spelling only
by float32 rounding. The default opset must be 17 or newer; older models are skipped with that reason.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import (
    NameScope,
    const_array,
    copy_type,
    default_opset,
    drop_unused_initializers,
    other_operand,
    scalar_constant,
)

__all__ = ["FuseLayerNormPass"]

logger = logging.getLogger(__name__)


def _readers(value: ir.Value) -> list[ir.Node]:
    """The distinct nodes reading ``value`` (none when it is a graph output: it must then stay)."""
    return [] if value.is_graph_output() else list(dict.fromkeys(user for user, _ in value.uses()))


def _single(value: ir.Value, op_type: str) -> ir.Node | None:
    readers = _readers(value)
    if len(readers) == 1 and readers[0].op_type == op_type and readers[0].domain in ("", "ai.onnx"):
        return readers[0]
    return None


def _reduce_axes(node: ir.Node) -> tuple[int, ...] | None:
    """The axes of a ReduceMean with keepdims=1 (attribute or constant input), or None."""
    keep = node.attributes.get("keepdims")
    if keep is not None and keep.as_int() != 1:
        return None
    attr = node.attributes.get("axes")
    if attr is not None:
        return tuple(int(a) for a in attr.as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else tuple(int(a) for a in axes.reshape(-1))
    return None


def _trailing(axes: tuple[int, ...], rank: int) -> int | None:
    """The first axis when ``axes`` are exactly the last ``len(axes)`` axes of a rank-``rank`` tensor."""
    normalized = sorted(a % rank for a in axes) if axes else []
    if not normalized or normalized != list(range(rank - len(normalized), rank)):
        return None
    return normalized[0]


class FuseLayerNormPass(QPass):
    """Replace the decomposed mean/variance normalization with ``LayerNormalization``."""

    name = "fuse-layernorm"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        roots = [n for n in graph if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")]
        if not roots:
            return ir.passes.PassResult(model, False)
        if default_opset(model) < 17:
            for node in roots:
                self.skip(node, "default opset below 17 (no LayerNormalization)")
            return ir.passes.PassResult(model, False)
        names = NameScope(model)
        fused = 0
        for mean in roots:
            if mean.graph is not graph:
                continue
            reason = self._fuse(graph, mean, names)
            if reason is None:
                fused += 1
            elif reason:
                self.skip(mean, reason)
        self.count("fused", fused)
        return ir.passes.PassResult(model, fused > 0)

    def _fuse(self, graph: ir.Graph, mean: ir.Node, names: NameScope) -> str | None:
        """Fuse the pattern rooted at the first ReduceMean; the reason it does not fit, or "" for no pattern."""
        x = mean.inputs[0]
        sub = _single(mean.outputs[0], "Sub")
        if x is None or sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
            return ""  # not the mean of a normalization (e.g. the second ReduceMean, or a plain mean)
        d = sub.outputs[0]
        readers = _readers(d)
        square = next((n for n in readers if n.op_type == "Pow" or (n.op_type == "Mul" and n.inputs[0] is d
                                                                     and n.inputs[1] is d)), None)
        div = next((n for n in readers if n.op_type == "Div" and n.inputs[0] is d), None)
        if square is None or div is None or len(readers) != 2:
            return "centred value is not read by exactly a square and a division"
        if square.op_type == "Pow" and scalar_constant(square.inputs[1]) != 2.0:
            return "Pow exponent is not 2"
        var = _single(square.outputs[0], "ReduceMean")
        add_eps = _single(var.outputs[0], "Add") if var is not None else None
        sqrt = _single(add_eps.outputs[0], "Sqrt") if add_eps is not None else None
        if sqrt is None or div.inputs[1] is not sqrt.outputs[0] or _readers(sqrt.outputs[0]) != [div]:
            return "variance path is not ReduceMean -> Add(eps) -> Sqrt -> Div"
        eps = scalar_constant(add_eps.inputs[1] if add_eps.inputs[0] is var.outputs[0] else add_eps.inputs[0])
        if eps is None or not eps > 0:
            return "epsilon is not a positive scalar constant"
        if x.shape is None or x.dtype != ir.DataType.FLOAT:
            return "input rank or type unknown (float32 only)"
        rank = x.shape.rank()
        axes_mean, axes_var = _reduce_axes(mean), _reduce_axes(var)
        first = _trailing(axes_mean, rank) if axes_mean is not None else None
        if first is None or axes_var is None or _trailing(axes_var, rank) != first:
            return "reductions are not over the same trailing axes with keepdims=1"
        dims = list(x.shape)[first:]
        if not all(isinstance(d, int) for d in dims):
            return "normalized dims are not static"
        nodes = [mean, sub, square, var, add_eps, sqrt, div]
        out, gamma, beta = div.outputs[0], np.ones(dims, np.float32), np.zeros(dims, np.float32)
        scale = _single(out, "Mul")
        if scale is not None:
            g = const_array(other_operand(scale, out))
            if g is not None:
                fit = self._fit(g, dims)
                if fit is None:
                    return "scale does not broadcast to the normalized dims"
                gamma, out = fit, scale.outputs[0]
                nodes.append(scale)
        shift = _single(out, "Add")
        if shift is not None:
            b = const_array(other_operand(shift, out))
            if b is not None and self._fit(b, dims) is not None:
                beta, out = self._fit(b, dims), shift.outputs[0]
                nodes.append(shift)
        gamma_v = self._constant(graph, names.fresh("layernorm_scale"), gamma)
        beta_v = self._constant(graph, names.fresh("layernorm_bias"), beta)
        node = ir.node("LayerNormalization", [x, gamma_v, beta_v], name=nodes[-1].name,
                       attributes={"axis": first, "epsilon": float(eps), "stash_type": 1})
        copy_type(node.outputs[0], out)
        constants = [v for n in nodes for v in n.inputs if v is not None and v.is_initializer()]
        ir.convenience.replace_nodes_and_values(graph, nodes[-1], nodes, [node], [out], node.outputs)
        drop_unused_initializers(constants)
        return None

    @staticmethod
    def _fit(array: np.ndarray, dims: list[int]) -> np.ndarray | None:
        """``array`` broadcast to exactly ``dims``, if it broadcasts there without adding leading dims of x."""
        if array.ndim > len(dims) and any(s != 1 for s in array.shape[:array.ndim - len(dims)]):
            return None
        squeezed = array.reshape(array.shape[array.ndim - len(dims):]) if array.ndim > len(dims) else array
        try:
            return np.ascontiguousarray(np.broadcast_to(squeezed, dims)).astype(np.float32)
        except ValueError:
            return None

    @staticmethod
    def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value
