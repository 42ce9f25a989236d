"""Finalize: put the model in a canonical, deterministic form before it is saved.

In order: a stable topological sort of every graph and function (onnx-ir's ``TopologicalSortPass``; stable, so an
already sorted graph keeps its order), removal of unused opset imports, the default ONNX opset declared if it is
missing, a name for the main graph if it has none, and unique names for every value and node (onnx-ir's
``NameFixPass``). Missing names are derived from what is there, never from time, ids or randomness: a node gets its
op type (``Conv``, ``Conv_1``...), a value its producer's name and output index (``Conv_1_out0``); clashing names
get ``_1``, ``_2``... in graph order. Compiling the same model twice therefore gives byte-identical output.

The pass changes no computation (``preserves_float``). It does not touch metadata, doc strings or producer fields,
and it raises (a real failure) if a graph has a cycle.

Its postcondition (``ensures``) is the last guard before the model is written: no constant scale, zero point,
absmax or float8 code read by a quantized op holds NaN or Inf
(:func:`~qcompiler.passes._finite.check_quantization_parameters`, one tensor at a time); otherwise it raises
:class:`~qcompiler.errors.InvalidModelError` (exit code 2) naming the tensor and its node.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedOpsetsPass

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass, model_graphs
from qcompiler.passes._common import paused_gc
from qcompiler.passes._finite import check_quantization_parameters

__all__ = ["FinalizePass"]

logger = logging.getLogger(__name__)


class _DeterministicNames:
    """Names for unnamed nodes and values, derived from the graph only (op types, producer names)."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type or "node"

    def generate_value_name(self, value: ir.Value) -> str:
        if value.name:
            return value.name
        producer = value.producer()
        if producer is not None and producer.name:
            return f"{producer.name}_out{value.index()}"
        return "value"


def _node_orders(model: ir.Model) -> list[list[ir.Node]]:
    graphs: list[ir.Graph | ir.Function] = [*model_graphs(model), *model.functions.values()]
    return [list(g) for g in graphs]


def _sorted_flat(model: ir.Model) -> bool:
    """True for a model without subgraphs or functions whose nodes already come after their inputs' producers (a
    linear check; the stable sort would leave such a graph as it is, at ten times the cost)."""
    if model.functions:
        return False
    seen: set[ir.Node] = set()
    for node in model.graph:
        if node.attributes and any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                   for a in node.attributes.values()):
            return False
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer not in seen:
                return False
        seen.add(node)
    return True


class FinalizePass(QPass):
    """Sort, prune opsets and name everything deterministically.

    Args:
        default_opset: version of the default ONNX domain to declare when the model declares none.
        graph_name: name given to the main graph when it has none.
    """

    name = "finalize"
    stage = "finalize"
    preserves_float = True

    def __init__(self, *, default_opset: int = 21, graph_name: str = "main_graph") -> None:
        super().__init__()
        if not isinstance(default_opset, int) or isinstance(default_opset, bool) or default_opset < 1:
            raise ConfigError(f"option 'default_opset' of pass '{self.name}' must be a positive integer, "
                              f"got {default_opset!r}")
        if not isinstance(graph_name, str) or not graph_name:
            raise ConfigError(f"option 'graph_name' of pass '{self.name}' must be a non-empty string")
        self.default_opset = default_opset
        self.graph_name = graph_name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with paused_gc():
            return ir.passes.PassResult(model, self._finalize(model))

    def ensures(self, model: ir.Model) -> None:
        """No NaN/Inf quantization parameter reaches the output (raises InvalidModelError naming it)."""
        checked = check_quantization_parameters(model)
        if checked:
            self.count("quantization_parameters_checked", checked)

    def _finalize(self, model: ir.Model) -> bool:
        sorted_ = False
        if not _sorted_flat(model):
            before = _node_orders(model)
            model.graph.sort()
            for function in model.functions.values():
                function.sort()
            after = _node_orders(model)
            sorted_ = any(len(a) != len(b) or any(x is not y for x, y in zip(a, b, strict=True))
                          for a, b in zip(before, after, strict=True))
            if sorted_:
                self.count("graphs_reordered", sum(1 for a, b in zip(before, after, strict=True) if a != b))
        modified = sorted_
        if (set(model.opset_imports) - {""} or model.functions) and RemoveUnusedOpsetsPass()(model).modified:
            self.count("opsets_removed")
            modified = True
        if "" not in model.opset_imports:
            model.opset_imports[""] = self.default_opset
            self.count("default_opset_added")
            modified = True
        if not model.graph.name:
            model.graph.name = self.graph_name
            modified = True
        if NameFixPass(_DeterministicNames())(model).modified:
            self.count("names_fixed")
            modified = True
        return modified
