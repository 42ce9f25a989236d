"""Fuse the exact (erf) GELU that exporters write as five elementwise ops into one ``Gelu`` node.

PyTorch and TensorFlow export ``gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))`` as ``Div``/``Erf``/``Add``/``Mul``/
``Mul``. For quantization the five ops are one activation: nothing should be quantized inside it, and the
activation-only ops that ``annotate-int8`` offers (the inner ``Mul`` of two activations) are not ops of the model's
meaning but of the exporter's spelling. One ``Gelu`` node also lets ONNX Runtime run ``BiasGelu`` after a MatMul.

Recognised spellings, with ``e = 1 + erf(x / sqrt(2))`` (``x * (1/sqrt(2))`` too, each Add/Mul in either
operand order): ``(x * e) * 0.5``, ``(x * 0.5) * e`` and ``x * (e * 0.5)``. Every intermediate value must have one
reader and not be a graph output; constants must be scalars (or one-element tensors) within 1e-5 relative of
``sqrt(2)``, ``1/sqrt(2)``, ``1`` and ``0.5``.

The fused node is ONNX ``Gelu`` (``approximate="none"``) when the model's default opset is 20 or newer, else ONNX
Runtime's ``com.microsoft.Gelu`` (the same function; the domain is added to the model's opsets). The float result
differs from the five-op spelling only by float32 rounding (the kernel multiplies by ``1/sqrt(2)``). The tanh
approximation (``Tanh``/``Pow``) is not recognised: it stays as exported.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import copy_type, default_opset, drop_unused_initializers, other_operand, scalar_constant

__all__ = ["FuseGeluPass"]

logger = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)
_CONTRIB = "com.microsoft"


def _scalar(value: ir.Value | None, expected: float) -> bool:
    found = scalar_constant(value)
    return found is not None and bool(np.isclose(found, expected, rtol=1e-5, atol=0.0))


def _only_reader(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value`` (not a graph output), or None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") and len(node.inputs) == 2


class _Match:
    """One recognised GELU: the input, the output value, and the nodes that compute it."""

    def __init__(self, x: ir.Value, y: ir.Value, nodes: list[ir.Node]) -> None:
        self.x, self.y, self.nodes = x, y, nodes


def _match(erf: ir.Node) -> _Match | None:
    scaled = erf.inputs[0]
    div = scaled.producer() if scaled is not None else None
    if _is(div, "Div") and _scalar(div.inputs[1], _SQRT2):
        x = div.inputs[0]
    elif _is(div, "Mul") and _scalar(div.inputs[1], 1 / _SQRT2):
        x = div.inputs[0]
    elif _is(div, "Mul") and _scalar(div.inputs[0], 1 / _SQRT2):
        x = div.inputs[1]
    else:
        return None
    if x is None or _only_reader(scaled) is not erf:
        return None
    add = _only_reader(erf.outputs[0])
    if not _is(add, "Add") or not _scalar(other_operand(add, erf.outputs[0]), 1.0):
        return None
    e = add.outputs[0]
    first = _only_reader(e)
    if not _is(first, "Mul"):
        return None
    partner = other_operand(first, e)
    head = [div, erf, add]
    if partner is x:  # (x * e) * 0.5
        last = _only_reader(first.outputs[0])
        if _is(last, "Mul") and _scalar(other_operand(last, first.outputs[0]), 0.5):
            return _Match(x, last.outputs[0], [*head, first, last])
        return None
    if _scalar(partner, 0.5):  # x * (e * 0.5)
        last = _only_reader(first.outputs[0])
        if _is(last, "Mul") and other_operand(last, first.outputs[0]) is x:
            return _Match(x, last.outputs[0], [*head, first, last])
        return None
    half = partner.producer() if partner is not None else None  # (x * 0.5) * e
    if _is(half, "Mul") and _only_reader(partner) is first and x in half.inputs and \
            _scalar(other_operand(half, x), 0.5):
        return _Match(x, first.outputs[0], [*head, half, first])
    return None


class FuseGeluPass(QPass):
    """Replace the five-op erf GELU with one ``Gelu`` (ONNX from opset 20, else ``com.microsoft``)."""

    name = "fuse-gelu"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        standard = default_opset(model) >= 20
        fused = 0
        constants: list[ir.Value] = []
        for erf in [n for n in graph if n.op_type == "Erf" and n.domain in ("", "ai.onnx")]:
            if erf.graph is not graph:
                continue  # already removed by an earlier match
            match = _match(erf)
            if match is None:
                self.skip(erf, "Erf is not part of a recognised GELU")
                continue
            if standard:
                gelu = ir.node("Gelu", [match.x], attributes={"approximate": "none"}, name=match.nodes[-1].name)
            else:
                gelu = ir.node("Gelu", [match.x], domain=_CONTRIB, name=match.nodes[-1].name)
            copy_type(gelu.outputs[0], match.y)
            constants.extend(v for n in match.nodes for v in n.inputs if v is not None and v.is_initializer())
            ir.convenience.replace_nodes_and_values(graph, match.nodes[-1], match.nodes, [gelu], [match.y],
                                                   gelu.outputs)
            fused += 1
        drop_unused_initializers(constants)
        if fused and not standard:
            model.opset_imports.setdefault(_CONTRIB, 1)
        self.count("fused", fused)
        return ir.passes.PassResult(model, fused > 0)
