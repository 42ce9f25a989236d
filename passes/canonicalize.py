"""Canonicalization: shape inference, constant folding, Identity and dead-code removal.

All four passes keep the model's float function exactly (``preserves_float``) and visit the main graph and every
If/Loop/Scan body.

* :class:`InferShapesPass` runs ONNX shape inference on a copy of the graph *without weights*: initializers larger
  than 1 KB are turned into typed graph inputs for the call (onnx-ir's ``_c_api_utils.call_onnx_api``), so a
  multi-GB model never gets serialized. The inferred types are read straight from the returned ``value_info``
  (no second deserialization of the model) and written onto node outputs of every graph. Limits: function
  bodies are not inferred; initializers of subgraphs are sent as they are; a failure of ONNX shape inference is
  logged and counted (``failed``), the model is left unchanged.
* :class:`FoldConstantsPass` wraps onnxscript's constant folder: a node whose inputs are all constants is evaluated
  with the ONNX reference implementation and replaced by an initializer (a Constant in a function); Identity-like
  ops are bypassed, If with a constant condition is inlined. It never folds a node fed by a graph input,
  non-deterministic ops (Random*), QuantizeLinear/DequantizeLinear/ConstantOfShape, or control flow with a
  non-constant condition; the graph's inputs and outputs keep their names and order. A node whose evaluation raises
  (an onnxscript or reference-implementation bug) is left as it is and counted as a skip.
* :class:`RemoveIdentityPass` removes ``y = Identity(x)`` by rewiring the uses of ``y`` to ``x``. When ``y`` is a
  graph output, ``x`` takes its name, which is only done when ``x`` is produced by a node of the same graph and is
  not itself a graph output; a graph output fed by a graph input, an initializer or an outer-scope value keeps its
  Identity (ONNX Runtime rejects a subgraph returning an outer-scope value directly).
* :class:`RemoveDeadCodePass` removes nodes whose outputs nobody reads (and unused trailing optional outputs),
  unused initializers (of every graph), unused opset imports and unused model-local functions.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, _c_api_utils
from onnxscript.optimizer import _constant_folding

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import paused_gc

__all__ = ["InferShapesPass", "FoldConstantsPass", "RemoveIdentityPass", "RemoveDeadCodePass"]

logger = logging.getLogger(__name__)


def _graphs_and_functions(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    yield from model.graphs()
    yield from model.functions.values()


def _known_dims(shape: ir.Shape | None) -> int:
    if shape is None:
        return -1
    return sum(1 for d in shape if isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value is not None))


# ---------------------------------------------------------------------------------------------------------------------
# infer-shapes
# ---------------------------------------------------------------------------------------------------------------------
class InferShapesPass(QPass):
    """Infer the type and shape of every node output with ONNX shape inference (weights stripped).

    Args:
        strict: raise inside ONNX inference on the first inconsistency (then the pass counts ``failed`` and changes
            nothing); when False, ONNX infers what it can and leaves the rest unknown.
        data_prop: propagate constant shape data through Shape/Gather/Concat... (gives static Reshape shapes).
    """

    name = "infer-shapes"
    stage = "canonicalize"
    preserves_float = True

    def __init__(self, *, strict: bool = False, data_prop: bool = True) -> None:
        super().__init__()
        for key, value in (("strict", strict), ("data_prop", data_prop)):
            if not isinstance(value, bool):
                raise ConfigError(f"option '{key}' of pass '{self.name}' must be true or false, got {value!r}")
        self.strict = strict
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer = functools.partial(onnx.shape_inference.infer_shapes, check_type=self.strict,
                                  strict_mode=self.strict, data_prop=self.data_prop)
        order = list(model.graph.initializers.values())
        try:
            with paused_gc():
                inferred = _c_api_utils.call_onnx_api(infer, model)
        except Exception as exc:  # ONNX raises several types (InferenceError, ValidationError, RuntimeError...)
            logger.warning("shape inference failed, model left unchanged: %s", exc)
            self.count("failed")
            return ir.passes.PassResult(model, False)
        finally:
            _restore_order(model.graph, order)
        cache: dict[bytes, tuple[Any, Any]] = {}
        with paused_gc():
            updated = _merge_graph(model.graph, inferred.graph, cache)
        self.count("values_updated", updated)
        return ir.passes.PassResult(model, updated > 0)


def _restore_order(graph: ir.Graph, order: list[ir.Value]) -> None:
    """Put the initializers back in their original order (the weight stripping re-adds large ones at the end)."""
    current = list(graph.initializers.values())
    if len(current) == len(order) and all(a is b for a, b in zip(current, order, strict=True)):
        return
    for value in order:
        graph.initializers.pop(value.name)
    for value in order:
        graph.initializers.add(value)


def _update_value(value: ir.Value, type_proto: onnx.TypeProto, cache: dict[bytes, tuple[Any, Any]]) -> bool:
    key = type_proto.SerializeToString()
    if key not in cache:
        cache[key] = (ir.serde.deserialize_type_proto_for_type(type_proto),
                      ir.serde.deserialize_type_proto_for_shape(type_proto))
    new_type, new_shape = cache[key]
    changed = False
    if new_type is not None and value.type != new_type:
        value.type = new_type
        changed = True
    old_shape = value.shape
    if new_shape is not None and (old_shape is None or old_shape.dims != new_shape.dims) \
            and _known_dims(new_shape) >= _known_dims(old_shape):
        value.shape = new_shape.copy()  # values never share a (mutable) shape
        changed = True
    return changed


def _merge_graph(graph: ir.Graph, proto: onnx.GraphProto, cache: dict[bytes, tuple[Any, Any]]) -> int:
    """Copy inferred types from ``proto`` (the same graph, serialized and inferred) onto ``graph``'s node outputs."""
    if len(proto.node) != len(graph):
        logger.warning("shape inference returned graph %r with %d nodes instead of %d; not merged",
                       graph.name, len(proto.node), len(graph))
        return 0
    types = {vi.name: vi.type for vi in proto.value_info}
    types.update((vi.name, vi.type) for vi in proto.output)
    updated = 0
    for node, node_proto in zip(graph, proto.node, strict=True):
        if node.op_type != node_proto.op_type:
            logger.warning("shape inference reordered graph %r; not merged", graph.name)
            return updated
        for value in node.outputs:
            type_proto = types.get(value.name) if value.name else None
            if type_proto is not None and type_proto.WhichOneof("value") is not None:
                updated += _update_value(value, type_proto, cache)
        if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        sub_protos = {a.name: a for a in node_proto.attribute}
        for attr in node.attributes.values():
            if attr.is_ref() or attr.name not in sub_protos:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                updated += _merge_graph(attr.as_graph(), sub_protos[attr.name].g, cache)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub, sub_proto in zip(attr.as_graphs(), sub_protos[attr.name].graphs, strict=False):
                    updated += _merge_graph(sub, sub_proto, cache)
    return updated


# ---------------------------------------------------------------------------------------------------------------------
# fold-constants
# ---------------------------------------------------------------------------------------------------------------------
def _unfit_replacement(node: ir.Node, new_nodes: Sequence[ir.Node], opset: int) -> str | None:
    """Why onnxscript's rewrite of ``node`` cannot be used in this model, or None.

    Its partial evaluators emit opset-13 forms (Split/Squeeze/Unsqueeze with the axes or split as an input) and
    opset-12 Constants (``value_ints``...) whatever the model's opset, and turn ``CastLike(saturate=0)`` into a
    saturating Cast.
    """
    if node.op_type == "CastLike" and "saturate" in node.attributes:
        return "CastLike with saturate is kept"
    for new in new_nodes:
        if new.domain not in ("", "ai.onnx"):
            continue
        if opset < 13 and new.op_type in ("Split", "Squeeze", "Unsqueeze") and len(new.inputs) > 1:
            return f"folded form needs opset 13 (model has {opset})"
        if opset < 12 and new.op_type == "Constant" and "value" not in new.attributes:
            return f"folded form needs opset 12 (model has {opset})"
    return None


class _CountingFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder, counting the nodes it replaces."""

    def __init__(self, owner: QPass, **options: Any) -> None:
        super().__init__(**options)
        self._owner = owner

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        try:
            replacement = super().process_node(node, is_function)
        except Exception as exc:  # an evaluator's bug on one node must not lose the whole pass
            cause = exc.__cause__ or exc
            logger.info("not folding %s %r: %s: %s", node.op_type, node.name, type(cause).__name__, cause)
            self._owner.skip(node, f"evaluation failed ({type(cause).__name__})")
            return None
        if replacement is not None:
            reason = _unfit_replacement(node, replacement.new_nodes, self._opset_imports.get("", 0))
            if reason is not None:
                self._owner.skip(node, reason)
                return None
        return replacement

    def replace_node(self, node: ir.Node, replacement: Any, root: ir.Graph | ir.Function) -> None:
        self._owner.count("folded_nodes")
        super().replace_node(node, replacement, root)


class FoldConstantsPass(QPass):
    """Evaluate constant subexpressions once, at compile time (onnxscript's constant folder).

    Args:
        output_size_limit: largest constant (in elements) the pass may create; a bigger result is kept as the
            expression unless folding frees at least as many elements of inputs used only there.
        input_size_limit: a node with a constant input of more elements than this is not evaluated (except a
            Transpose that is the only user of its input), so weights are not copied around.
        shape_inference: run ONNX inference on each visited node as well (slower; ``infer-shapes`` usually did it).
    """

    name = "fold-constants"
    stage = "canonicalize"
    preserves_float = True

    def __init__(self, *, output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                 input_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                 shape_inference: bool = False) -> None:
        super().__init__()
        for key, value in (("output_size_limit", output_size_limit), ("input_size_limit", input_size_limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"option '{key}' of pass '{self.name}' must be a non-negative integer "
                                  f"(elements), got {value!r}")
        if not isinstance(shape_inference, bool):
            raise ConfigError(f"option 'shape_inference' of pass '{self.name}' must be true or false, "
                              f"got {shape_inference!r}")
        self.output_size_limit = output_size_limit
        self.input_size_limit = input_size_limit
        self.shape_inference = shape_inference

    def _should_fold(self, node: ir.Node) -> bool | None:
        """Fold a ConstantOfShape whose result is small (onnxscript never folds it, to keep big fills out of the
        file); e.g. the computed pads of exported 'same' padding. Everything else: onnxscript's rules."""
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            return None
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        if shape is None:
            return None
        dims = shape.numpy().reshape(-1)
        return bool(dims.size and (dims >= 0).all() and int(np.prod(dims, dtype=np.int64)) <= 1024) or None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _CountingFolder(self, shape_inference=self.shape_inference, input_size_limit=self.input_size_limit,
                                 output_size_limit=self.output_size_limit, should_fold=self._should_fold)
        with paused_gc():
            result = folder(model)
        return ir.passes.PassResult(model, result.modified)


# ---------------------------------------------------------------------------------------------------------------------
# remove-identity
# ---------------------------------------------------------------------------------------------------------------------
class RemoveIdentityPass(QPass):
    """Remove Identity nodes, keeping every graph's outputs (names and order) and ONNX scoping rules."""

    name = "remove-identity"
    stage = "canonicalize"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = 0
        with paused_gc():
            for graph in list(_graphs_and_functions(model)):
                for node in list(graph):
                    if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and self._remove(graph, node):
                        removed += 1
        self.count("removed", removed)
        return ir.passes.PassResult(model, removed > 0)

    def _remove(self, graph: ir.Graph | ir.Function, node: ir.Node) -> bool:
        if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
            self.skip(node, "malformed Identity")
            return False
        x, y = node.inputs[0], node.outputs[0]
        if not y.is_graph_output():
            y.replace_all_uses_with(x)
            graph.remove(node, safe=True)
            return True
        if y not in graph.outputs:
            self.skip(node, "output is returned by another graph")
            return False
        if x.graph is not node.graph:
            self.skip(node, "graph output fed by an outer-scope value")
            return False
        if x.is_graph_input() or x.is_initializer() or x.producer() is None:
            self.skip(node, "graph output fed by a graph input or initializer")
            return False
        if x.is_graph_output():
            self.skip(node, "both values are graph outputs")
            return False
        if x.type is None:
            x.type = y.type
        if y.shape is not None and _known_dims(y.shape) > _known_dims(x.shape):
            x.shape = y.shape
        name = y.name
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        x.name = name
        return True


# ---------------------------------------------------------------------------------------------------------------------
# remove-dead-code
# ---------------------------------------------------------------------------------------------------------------------
def _fingerprint(graphs: list[ir.Graph | ir.Function], model: ir.Model) -> tuple[Any, ...]:
    """Cheap structural summary: anything dead-code removal changes changes this."""
    nodes = inputs = outputs = attrs = inits = 0
    for graph in graphs:
        if isinstance(graph, ir.Graph):
            inits += len(graph.initializers)
        for node in graph:
            nodes += 1
            inputs += len(node.inputs)
            outputs += len(node.outputs)
            attrs += len(node.attributes)
    opsets = tuple(sorted(model.opset_imports.items()))
    function_opsets = tuple(tuple(sorted(f.opset_imports)) for f in model.functions.values())
    return nodes, inputs, outputs, attrs, inits, opsets, tuple(model.functions), function_opsets


class RemoveDeadCodePass(QPass):
    """Remove unused nodes, initializers, opset imports and functions (onnx-ir's unused-removal passes)."""

    name = "remove-dead-code"
    stage = "canonicalize"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with paused_gc():
            graphs = list(_graphs_and_functions(model))
            before = _fingerprint(graphs, model)
            opsets_before = len(model.opset_imports)
            functions_before = len(model.functions)
            RemoveUnusedNodesPass()(model)
            for graph in graphs[1:]:  # subgraph initializers (the main graph's were handled above)
                if isinstance(graph, ir.Graph):
                    for value in list(graph.initializers.values()):
                        if not value.uses() and not value.is_graph_output() and value.name is not None:
                            graph.initializers.pop(value.name)
            if model.functions:
                RemoveUnusedFunctionsPass()(model)
            if set(model.opset_imports) - {""} or model.functions:  # the default domain is always kept
                RemoveUnusedOpsetsPass()(model)
            graphs = list(_graphs_and_functions(model))
            after = _fingerprint(graphs, model)
        self.count("nodes_removed", before[0] - after[0])
        self.count("initializers_removed", before[4] - after[4])
        self.count("opsets_removed", opsets_before - len(model.opset_imports))
        self.count("functions_removed", functions_before - len(model.functions))
        return ir.passes.PassResult(model, after != before)
