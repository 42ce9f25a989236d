"""Canonicalization: shape inference, constant folding, Identity and dead-code removal.

All four passes keep the model's float function exactly (``preserves_float``) and visit the main graph and every
If/Loop/Scan body.

* :class:`InferShapesPass` runs ONNX shape inference on a copy of the graph *without weights*: initializers larger
  than 1 KB are written as typed graph inputs (:func:`qcompiler._serialize.model_to_bytes`, which also makes the
  bytes chunk by chunk, without a whole-model proto), so a multi-GB model never gets serialized. The inferred types
  are read straight from the returned ``value_info`` (no second deserialization of the model) and written onto
  node outputs of every graph, one frozen ``Shape`` shared by all values of the same type. It runs ONNX inference
  without data propagation first; then, only when some output is still not fully static and ``data_prop`` is on,
  once more with propagation, unless :func:`~qcompiler.passes._data_prop.data_prop_risk` finds that propagation
  could allocate without bound (a 1-D tensor of 2**28 declared elements makes ONNX build 2**28 dims): that is
  recorded as a skip with its reason and counted (``data_prop_skipped``). Limits: function bodies are not inferred;
  initializers of subgraphs are sent as they are; a failure of ONNX shape inference is logged and counted
  (``failed``): the model is left unchanged (a failure of the second run keeps the first run's results).
* :class:`FoldConstantsPass` wraps onnxscript's constant folder: a node whose inputs are all constants is evaluated
  with the ONNX reference implementation and replaced by an initializer (a Constant in a function); Identity-like
  ops are bypassed, If with a constant condition is inlined. It never folds a node fed by a graph input,
  non-deterministic ops (Random*), QuantizeLinear/DequantizeLinear/ConstantOfShape, or control flow with a
  non-constant condition; the graph's inputs and outputs keep their names and order. A node whose evaluation raises
  (an onnxscript or reference-implementation bug) is left as it is and counted as a skip. A node whose result
  would exceed ``output_size_limit`` is skipped *before* it is evaluated when its size can be told from its
  constant inputs (ConstantOfShape, Expand, Tile, Range, OneHot, Pad, Resize/Upsample and the broadcasting
  elementwise ops): onnxscript would otherwise build, say, a 2**28-element Range and only then drop it.
* :class:`RemoveIdentityPass` removes ``y = Identity(x)`` by rewiring the uses of ``y`` to ``x``. When ``y`` is a
  graph output, ``x`` takes its name, which is only done when ``x`` is produced by a node of the same graph and is
  not itself a graph output; a graph output fed by a graph input, an initializer or an outer-scope value keeps its
  Identity (ONNX Runtime rejects a subgraph returning an outer-scope value directly).
* :class:`RemoveDeadCodePass` removes nodes whose outputs nobody reads (and unused trailing optional outputs),
  unused initializers (of every graph), unused opset imports and unused model-local functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass
from onnx_ir.passes.common import unused_removal as _unused_removal
from onnxscript.optimizer import _constant_folding

from qcompiler._serialize import model_to_bytes
from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass, model_graphs
from qcompiler.passes._common import paused_gc
from qcompiler.passes._data_prop import data_prop_risk

__all__ = ["InferShapesPass", "FoldConstantsPass", "RemoveIdentityPass", "RemoveDeadCodePass"]

logger = logging.getLogger(__name__)

_WEIGHT_BYTES = 1000  # larger initializers reach ONNX shape inference as typed inputs, without their data


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
        with paused_gc():  # serialized once, chunk by chunk, weights over 1 KB as typed inputs; inferred 1-2 times
            blob = model_to_bytes(model, weights_as_inputs=_WEIGHT_BYTES)
        first = self._infer(model, blob, data_prop=False)
        if first is None:
            return ir.passes.PassResult(model, False)
        changed, not_static = first
        if self.data_prop and not_static:
            risk = data_prop_risk(model)
            if risk is not None:
                node, reason = risk
                logger.info("shape inference without data propagation: %s", reason)
                self.skip(node, f"data propagation skipped: {reason}")
                self.count("data_prop_skipped")
            else:
                second = self._infer(model, blob, data_prop=True)
                changed |= second[0] if second is not None else set()
        self.count("values_updated", len(changed))
        return ir.passes.PassResult(model, bool(changed))

    def _infer(self, model: ir.Model, blob: bytes, *, data_prop: bool) -> tuple[set[ir.Value], int] | None:
        """Infer from the serialized model and merge onto ``model``: (values updated, outputs not fully static),
        or None when ONNX inference failed (logged and counted)."""
        try:
            with paused_gc():
                inferred = onnx.shape_inference.infer_shapes(blob, check_type=self.strict, strict_mode=self.strict,
                                                             data_prop=data_prop)
        except Exception as exc:  # ONNX raises several types (InferenceError, ValidationError, RuntimeError...)
            logger.warning("shape inference%s failed, %s: %s", " with data propagation" if data_prop else "",
                           "its results not used" if data_prop else "model left unchanged", exc)
            self.count("failed")
            return None
        cache: dict[bytes, tuple[Any, Any, int]] = {}
        not_static = [0]
        changed: set[ir.Value] = set()
        with paused_gc():
            _merge_graph(model.graph, inferred.graph, cache, changed, not_static)
        return changed, not_static[0]


def _update_value(value: ir.Value, type_proto: onnx.TypeProto, cache: dict[bytes, tuple[Any, Any, int]]) -> bool:
    key = type_proto.SerializeToString()
    entry = cache.get(key)
    if entry is None:
        new_shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
        if new_shape is not None:
            new_shape.freeze()  # shared by every value of this type: nobody may change it in place
        entry = cache[key] = (ir.serde.deserialize_type_proto_for_type(type_proto), new_shape,
                              _known_dims(new_shape))
    new_type, new_shape, known = entry
    changed = False
    if new_type is not None and value.type != new_type:
        value.type = new_type
        changed = True
    old_shape = value.shape
    if new_shape is not None and old_shape is not new_shape and (old_shape is None or old_shape.dims !=
                                                                  new_shape.dims) and known >= _known_dims(old_shape):
        value.shape = new_shape  # one frozen Shape per distinct type: a million values do not make a million
        changed = True
    return changed


def _merge_graph(graph: ir.Graph, proto: onnx.GraphProto, cache: dict[bytes, tuple[Any, Any, int]],
                 changed: set[ir.Value], not_static: list[int]) -> None:
    """Copy inferred types from ``proto`` (the same graph, serialized and inferred) onto ``graph``'s node outputs,
    adding the values it changes to ``changed``; count in ``not_static[0]`` the node outputs left without a fully
    static shape."""
    if len(proto.node) != len(graph):
        logger.warning("shape inference returned graph %r with %d nodes instead of %d; not merged",
                       graph.name, len(proto.node), len(graph))
        not_static[0] += 1
        return
    types = {vi.name: vi.type for vi in proto.value_info}
    types.update((vi.name, vi.type) for vi in proto.output)
    open_values = 0
    for node, node_proto in zip(graph, proto.node, strict=True):
        if node.op_type != node_proto.op_type:
            logger.warning("shape inference reordered graph %r; not merged", graph.name)
            not_static[0] += 1
            return
        for value in node.outputs:
            type_proto = types.get(value.name) if value.name else None
            if type_proto is not None and _update_value(value, type_proto, cache):
                changed.add(value)
            shape = value.shape
            if shape is None or not shape.is_static():
                open_values += 1
        if not node_proto.attribute or not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                               for a in node.attributes.values()):
            continue
        sub_protos = {a.name: a for a in node_proto.attribute}
        for attr in node.attributes.values():
            if attr.is_ref() or attr.name not in sub_protos:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                _merge_graph(attr.as_graph(), sub_protos[attr.name].g, cache, changed, not_static)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub, sub_proto in zip(attr.as_graphs(), sub_protos[attr.name].graphs, strict=False):
                    _merge_graph(sub, sub_proto, cache, changed, not_static)
    not_static[0] += open_values


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
    """onnxscript's folder, counting the nodes it replaces, and not visiting the nodes it would leave as they are."""

    def __init__(self, owner: QPass, **options: Any) -> None:
        super().__init__(**options)
        self._owner = owner

    def visit_node(self, node: ir.Node, root: ir.Graph | ir.Function) -> None:
        if not self._inert(node):
            super().visit_node(node, root)

    def _inert(self, node: ir.Node) -> bool:
        """True when onnxscript's ``process_node`` would return None without a side effect: a default-domain op
        (not Constant, no subgraph) reading at least one non-constant value and no value with a symbolic value, and
        with no partial evaluator (or Add, whose evaluator only combines INT64 shape values). Most nodes of a big
        graph are like that; visiting each cost about 5 us (seconds per million nodes)."""
        if self.shape_inference or node.domain != "" or node.op_type == "Constant" or "" not in self._opset_imports:
            return False
        if node.attributes and any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                   for a in node.attributes.values()):
            return False
        constant = True
        for value in node.inputs:
            if value is None:
                continue
            if self._state.get_sym_value(value) is not None:
                return False
            if value.const_value is None or value.is_graph_input():
                constant = False
        if constant:
            return False
        if not _constant_folding.registry.lookup_evaluators("", node.op_type, self._opset_imports[""]):
            return True
        return node.op_type == "Add" and all(v is None or (v.dtype is not None and v.dtype != ir.DataType.INT64)
                                             for v in node.inputs)

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


_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum", "Where", "And",
                           "Or", "Xor", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "BitShift",
                           "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu"})


def _const(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    tensor = value.const_value if value is not None else None
    return None if tensor is None else tensor.numpy()


def _const_shape(node: ir.Node, index: int) -> tuple[int, ...] | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    tensor = value.const_value if value is not None else None
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


def _range_length(start: float, limit: float, delta: float) -> int:
    if delta == 0 or not all(map(np.isfinite, (start, limit, delta))):
        return 0  # the evaluation raises (counted as a skip) or is empty
    return max(int(np.ceil((limit - start) / delta)), 0)


def _folded_elements(node: ir.Node) -> int | None:
    """Elements that evaluating ``node`` (its inputs all constant) would create, for the ops whose result can be far
    larger than their inputs: told from the constant inputs themselves (never from a declared output shape, which
    a model may get wrong), in exact integers. None for the other ops (onnxscript's input limit bounds them)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    try:
        if op == "ConstantOfShape":
            shape = _const(node, 0)
            return None if shape is None else math.prod(max(int(d), 0) for d in shape.reshape(-1))
        if op in ("Expand", "Tile"):
            data, arg = _const_shape(node, 0), _const(node, 1)
            if data is None or arg is None:
                return None
            arg = [max(int(d), 0) for d in arg.reshape(-1)]
            if op == "Tile":
                return math.prod(data) * math.prod(arg)
            rank = max(len(data), len(arg))
            padded = [1] * (rank - len(data)) + list(data), [1] * (rank - len(arg)) + arg
            return math.prod(max(a, b) for a, b in zip(*padded, strict=True))
        if op == "Range":
            values = [_const(node, i) for i in range(3)]
            if any(v is None or v.size != 1 for v in values):
                return None
            return _range_length(*(float(v.reshape(-1)[0]) for v in values))
        if op == "OneHot":
            indices, depth = _const_shape(node, 0), _const(node, 1)
            return None if indices is None or depth is None else math.prod(indices) * max(int(depth.reshape(-1)[0]),
                                                                                            0)
        if op == "Pad":
            data, pads = _const_shape(node, 0), _const(node, 1)
            if data is None or pads is None:
                return None
            extra = sum(max(int(p), 0) for p in pads.reshape(-1))
            return math.prod(d + extra for d in data)  # an upper bound
        if op in ("Resize", "Upsample"):
            data = _const_shape(node, 0)
            sizes = _const(node, 3) if op == "Resize" else None
            scales = _const(node, 2 if op == "Resize" else 1)
            if data is None:
                return None
            if sizes is not None and sizes.size:
                return math.prod(max(int(d), 0) for d in sizes.reshape(-1))
            if scales is not None and scales.size == len(data) and np.isfinite(scales).all():
                return math.prod(int(d * max(float(s), 0.0)) + 1 for d, s in zip(data, scales.reshape(-1),
                                                                                  strict=True))
            return None
        if op in _BROADCASTING:
            shapes = [_const_shape(node, i) for i in range(len(node.inputs)) if node.inputs[i] is not None]
            if any(s is None for s in shapes) or not shapes:
                return None
            rank = max(len(s) for s in shapes)
            dims = [max((s[i - rank + len(s)] for s in shapes if i >= rank - len(s)), default=1) for i in range(rank)]
            return math.prod(dims)
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def _freed_elements(node: ir.Node) -> int:
    """Elements of the constant inputs that only ``node`` reads (folding it frees them; onnxscript's rule)."""
    return sum(v.const_value.size for v in node.inputs
               if v is not None and v.const_value is not None and len(v.uses()) == 1)


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
        file); e.g. the computed pads of exported 'same' padding. Never fold string tensors. Everything else:
        onnxscript's rules."""
        if any(v is not None and v.dtype == ir.DataType.STRING for v in (*node.inputs, *node.outputs)):
            return False  # a folded string tensor comes back as a numpy bytes array that onnx-ir cannot save
        elements = _folded_elements(node)
        if elements is not None and elements > self.output_size_limit and elements > _freed_elements(node):
            self.skip(node, f"result too large to fold ({elements} elements, output_size_limit "
                            f"{self.output_size_limit})")
            return False  # decided before evaluating: onnxscript would allocate the result, then drop it
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            return None
        return bool(elements is not None and elements <= 1024) or None

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
def _all_graphs(model: ir.Model) -> list[ir.Graph | ir.Function]:
    """The main graph, every subgraph under it (recursively) and every function (with their subgraphs)."""
    return model_graphs(model, functions=True)


def _fingerprint(graphs: list[ir.Graph | ir.Function], model: ir.Model) -> tuple[Any, ...]:
    """Cheap structural summary: anything dead-code removal changes changes this. Node removal shows in the node
    counts; trimming (trailing empty inputs, unused optional outputs, BatchNormalization's ``training_mode``) can only
    touch the nodes listed with their port counts."""
    trimmable = tuple((node, len(node.inputs), len(node.outputs), len(node.attributes))
                      for graph in graphs for node in graph
                      if len(node.outputs) > 1 or (node.inputs and node.inputs[-1] is None)
                      or node.op_type == "BatchNormalization")
    nodes = sum(len(graph) for graph in graphs)
    inits = sum(len(graph.initializers) for graph in graphs if isinstance(graph, ir.Graph))
    opsets = tuple(sorted(model.opset_imports.items()))
    function_opsets = tuple(tuple(sorted(f.opset_imports)) for f in model.functions.values())
    return nodes, inits, opsets, tuple(model.functions), function_opsets, trimmable


def _remove_unused_nodes(graph: ir.Graph | ir.Function, opset: int | None) -> None:
    """onnx-ir's ``RemoveUnusedNodesPass`` on one graph (and its subgraphs), with its per-node trimming done only
    where it can change something: trailing empty inputs, unused optional outputs (a schema lookup per node: seconds
    per million nodes when done for every node) and BatchNormalization's ``training_mode``."""
    outputs = frozenset(graph.outputs)
    for node in reversed(graph):
        if not any(out in outputs or out.uses() for out in node.outputs):
            graph.remove(node, safe=True)
            continue
        if node.inputs and node.inputs[-1] is None:
            _unused_removal._remove_trailing_empty_inputs(node)
        if opset is not None and (len(node.outputs) > 1 or node.op_type == "BatchNormalization"):
            _unused_removal._remove_unused_optional_outputs(node, outputs, opset)
        if not node.attributes:
            continue
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                _remove_unused_nodes(attr.as_graph(), opset)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    _remove_unused_nodes(sub, opset)


def _remove_unused(model: ir.Model) -> None:
    """``RemoveUnusedNodesPass()(model)``, faster (see :func:`_remove_unused_nodes`)."""
    _remove_unused_nodes(model.graph, model.graph.opset_imports.get(""))
    kept = frozenset(model.graph.outputs) | frozenset(model.graph.inputs)
    initializers = model.graph.initializers
    for value in list(initializers.values()):
        if not value.uses() and value not in kept and value.name is not None:
            del initializers[value.name]
    for function in model.functions.values():
        _remove_unused_nodes(function, function.opset_imports.get(""))


class RemoveDeadCodePass(QPass):
    """Remove unused nodes, initializers, opset imports and functions (onnx-ir's unused-removal passes)."""

    name = "remove-dead-code"
    stage = "canonicalize"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with paused_gc():
            graphs = _all_graphs(model)
            before = _fingerprint(graphs, model)
            opsets_before = len(model.opset_imports)
            functions_before = len(model.functions)
            _remove_unused(model)
            for graph in graphs[1:]:  # subgraph initializers (the main graph's were handled above)
                if isinstance(graph, ir.Graph):
                    for value in list(graph.initializers.values()):
                        if not value.uses() and not value.is_graph_output() and value.name is not None:
                            graph.initializers.pop(value.name)
            if model.functions:
                RemoveUnusedFunctionsPass()(model)
            if set(model.opset_imports) - {""} or model.functions:  # the default domain is always kept
                RemoveUnusedOpsetsPass()(model)
            after = _fingerprint(_all_graphs(model) if len(graphs) > 1 else [model.graph], model)
        self.count("nodes_removed", before[0] - after[0])
        self.count("initializers_removed", before[1] - after[1])
        self.count("opsets_removed", opsets_before - len(model.opset_imports))
        self.count("functions_removed", functions_before - len(model.functions))
        return ir.passes.PassResult(model, after != before)
