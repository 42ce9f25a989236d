"""Annotate the int8-quantizable nodes: write :class:`~qcompiler.qspec.QuantSpec` metadata, change nothing else.

For each Conv, MatMul and Gemm in the main graph (of the configured ``op_types``, not excluded by name) whose
weight is a constant float32 tensor:

- the weight value gets a symmetric ``weight_dtype`` spec (int8, or float8e4m3fn), per channel along the output-channel axis (Conv: axis 0 of
  ``[M, C/g, k...]``; MatMul: axis 1 of ``[K, N]``; Gemm: axis 0 of ``B`` when ``transB=1``, else axis 1) or per
  tensor when ``per_channel`` is off;
- the activation input (input 0) gets a per-tensor spec: static (``activation_dtype``, asymmetric, observed by the
  calibrator; uint8/int8/uint16 asymmetric, int16/float8e4m3fn symmetric) or dynamic (uint8 asymmetric, computed at
  run time, no calibration; int8 weights only);
- with static activations, the output gets the same kind of spec. When a fusion pass marked the node with
  ``node.meta["qcompiler.fused_activation"]`` (a single-consumer Relu/Clip), the spec goes on that activation's
  output instead, so nothing is quantized between the pair;
- the node gets ``node.meta["qcompiler.quant_scheme"]`` = ``"int8-static"`` or ``"int8-dynamic"``.

Activation-only ops (``qcompiler.config.ACTIVATION_OPS`` in ``op_types``; static activations only): an Add, Mul,
Concat, Sigmoid, Softmax, AveragePool, GlobalAveragePool, LayerNormalization, or a MatMul whose two inputs are
both activations, gets the activation spec on each activation input (all inputs; input 0 only for the ops whose
other inputs are parameters: LayerNormalization's scale and bias) and on its output, the ``int8-static`` scheme
and ``node.meta["qcompiler.quant_role"] = "activations"``. They are candidates, not decisions: without an
accuracy budget, ``select-precision`` measures each in context and leaves in float those that cost more than its
tolerance. One with a constant operand (a bias Add, a scaling Mul) is skipped: ONNX Runtime has no integer kernel
that takes a float constant, so quantizing it would add error and no speed. One that reads or makes a tensor
computed from an integer graph input (an attention mask and its additive form, :mod:`._input_derived`) is skipped:
no calibration set gives such a tensor a range that holds once padding appears.

Embedding tables (``embedding = "int8"``, the default; ``"float"`` turns it off): a ``Gather`` over axis 0 of a
constant float32 ``E[rows, cols]`` with int32/int64 indices gets ``NodeQuant(scheme, "embedding")`` and ``E`` an
int8 spec, per row (``embedding_block_size = 0``) or in blocks along its rows (a power of two from 16:
``GatherBlockQuantized``); a tied output projection ``MatMul(x, Transpose(E))`` (int8 per channel, int8 weights,
8-bit activations) gets ``NodeQuant(scheme, "tied-head")`` and ``x`` the activation spec, and ``E`` a per-row spec
that both share. A table that anything else reads stays float, its Gathers skipped with the reason
(:mod:`._int8_embeddings`).

Skipped, with a counted reason: excluded names, nodes in subgraphs, non-constant weights (or weights that are graph
inputs), non-float32 tensors, unsupported ranks (Conv weight rank 3-5; MatMul/Gemm weight rank 2), a weight shared
with a node that wants a different spec. The pass only writes metadata, so it preserves the float function;
``modified`` is True only when a spec or a scheme was added or changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from qcompiler.config import ACTIVATION_DTYPES, ACTIVATION_OPS, LAYER_OPS, QUANTIZABLE_OPS, WEIGHT_DTYPES, Recipe
from qcompiler.errors import ConfigError
from qcompiler.metadata import FUSED_ACTIVATION_KEY, NODE_QUANT_KEY, TRAINED_KEY
from qcompiler.pass_manager import QPass, iter_nodes
from qcompiler.passes._common import peek_meta
from qcompiler.passes._input_derived import integer_derived_values
from qcompiler.passes._int8_embeddings import (
    DEFAULT_EMBEDDING_BLOCK,
    MIN_TABLE_ELEMENTS,
    embedding_candidate,
    embedding_spec,
    new_codes_holder,
    table_readers,
)
from qcompiler.qspec import ObserverSpec, QuantSpec, get_qspec, set_qspec

__all__ = ["AnnotateInt8Pass", "NodeQuant", "activation_inputs", "clear_node_quant", "is_activation_op",
           "is_embedding", "is_tied_head", "is_weight_layer", "node_scheme", "quantized_output", "set_node_quant", "weight_axis"]

logger = logging.getLogger(__name__)

_FUSABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclasses.dataclass(frozen=True)
class NodeQuant:
    """How an int8-annotated node is lowered: the node half of its annotation (the values carry QuantSpecs).

    Attributes:
        scheme: ``"int8-static"`` (QDQ from calibrated ranges) or ``"int8-dynamic"`` (activations quantized at run
            time).
        role: ``"layer"`` (a Conv/MatMul/Gemm with a quantized constant weight), ``"activations"`` (an
            activation-only op: its activation inputs and output quantized), ``"embedding"`` (a Gather of an int8
            table) or ``"tied-head"`` (a MatMul whose weight is ``Transpose`` of such a table).
    """

    scheme: str
    role: str = "layer"


def node_quant(node: ir.Node) -> NodeQuant | None:
    """The node's int8 annotation, or None (read without creating a metadata store)."""
    found = peek_meta(node, NODE_QUANT_KEY)
    return found if isinstance(found, NodeQuant) else None


def node_scheme(node: ir.Node) -> str | None:
    """The scheme of the node's int8 annotation, or None."""
    found = node_quant(node)
    return found.scheme if found is not None else None


def set_node_quant(node: ir.Node, value: NodeQuant) -> bool:
    """Annotate the node; return True when that changed anything."""
    if node_quant(node) == value:
        return False
    node.meta[NODE_QUANT_KEY] = value
    return True


def clear_node_quant(node: ir.Node) -> bool:
    """Remove the node's int8 annotation (it stays float); return True when there was one."""
    return node_quant(node) is not None and node.meta.pop(NODE_QUANT_KEY, None) is not None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


#: activation-only ops whose inputs after the first are parameters, not activations
_UNARY_ACTIVATION_OPS = frozenset({"Sigmoid", "Softmax", "AveragePool", "GlobalAveragePool", "LayerNormalization"})


def is_weight_layer(node: ir.Node) -> bool:
    """True for a Conv/MatMul/Gemm annotated with a quantized constant weight."""
    found = node_quant(node)
    return node.op_type in LAYER_OPS and found is not None and found.role == "layer"


def is_activation_op(node: ir.Node) -> bool:
    """True for an annotated activation-only op (see the module docstring)."""
    found = node_quant(node)
    return found is not None and found.role == "activations"


def is_embedding(node: ir.Node) -> bool:
    """True for a Gather annotated to read an int8 embedding table."""
    found = node_quant(node)
    return found is not None and found.role == "embedding"


def is_tied_head(node: ir.Node) -> bool:
    """True for a MatMul annotated to read the int8 codes of a table that Gathers also read."""
    found = node_quant(node)
    return found is not None and found.role == "tied-head"


def activation_inputs(node: ir.Node) -> list[int]:
    """The input positions of an activation-only op that carry activations (the ones to quantize)."""
    if node.op_type in _UNARY_ACTIVATION_OPS:
        return [0]
    return list(range(len(node.inputs)))


def weight_axis(node: ir.Node) -> int | None:
    """The output-channel axis of the node's weight (input 1), or None for an unsupported op."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr_int(node, "transB", 0) else 1
    return None


def quantized_output(node: ir.Node) -> ir.Value:
    """The value whose quantization ends the node: its fused Relu/Clip output when valid, else its output."""
    out = node.outputs[0]
    fused = node.meta.get(FUSED_ACTIVATION_KEY)  # set by fuse-conv-activation
    if (isinstance(fused, ir.Node) and fused.op_type in _FUSABLE_ACTIVATIONS and fused.graph is node.graph
            and fused.inputs and fused.inputs[0] is out and len(out.uses()) == 1 and not out.is_graph_output()):
        return fused.outputs[0]
    return out


class AnnotateInt8Pass(QPass):
    """Mark Conv/MatMul/Gemm nodes for int8 quantization (metadata only).

    Args:
        op_types: operator types to annotate.
        exclude_nodes: node names to leave in float.
        per_channel: per-output-channel weight scales (else per tensor).
        activation_dtype: static activation type ("uint8", "int8", "uint16", "int16", "float8e4m3fn").
        static_activations: calibrated activation ranges (QDQ) when True, run-time quantization when False.
        observer: the calibration observer of static activations.
        weight_dtype: "int8" or "float8e4m3fn" (static activations only).
        embedding: "int8" (quantize Gather embedding tables, see the module docstring) or "float".
        embedding_block_size: 0 for one scale per table row (standard ONNX ops), or a power of two from 16: blocks
            along each row (``com.microsoft.GatherBlockQuantized``); a table shared with a tied projection is per
            row whatever this says.
        embedding_min_elements: tables with fewer elements stay float (see :mod:`._int8_embeddings`).
    """

    name = "annotate-int8"
    stage = "annotate"
    preserves_float = True

    def __init__(self, *, op_types: Sequence[str] = LAYER_OPS, exclude_nodes: Sequence[str] = (),
                 per_channel: bool = True, activation_dtype: str = "uint8", static_activations: bool = True,
                 observer: str | ObserverSpec = "minmax", weight_dtype: str = "int8",
                 percentile: float | None = None, embedding: str = "int8",
                 embedding_block_size: int = DEFAULT_EMBEDDING_BLOCK,
                 embedding_min_elements: int = MIN_TABLE_ELEMENTS) -> None:
        super().__init__()
        if embedding not in ("int8", "float"):
            raise ConfigError(f"annotate-int8: embedding must be 'int8' or 'float', got {embedding!r}")
        size = embedding_block_size
        if isinstance(size, bool) or not isinstance(size, int) or \
                not (size == 0 or (16 <= size <= 256 and not size & (size - 1))):
            raise ConfigError(f"annotate-int8: embedding_block_size must be 0 (per row) or a power of two from 16 to "
                              f"256, got {size!r}")
        if isinstance(embedding_min_elements, bool) or not isinstance(embedding_min_elements, int) or \
                embedding_min_elements < 0:
            raise ConfigError(f"annotate-int8: embedding_min_elements must be a non-negative integer, "
                              f"got {embedding_min_elements!r}")
        self.embedding, self.embedding_block_size = embedding, size
        self.embedding_min_elements = embedding_min_elements
        unknown = sorted(set(op_types) - set(QUANTIZABLE_OPS))
        if unknown:
            raise ConfigError(f"annotate-int8: cannot quantize {', '.join(unknown)}")
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"annotate-int8: activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"annotate-int8: weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}")
        if weight_dtype != "int8" and not static_activations:
            raise ConfigError(f"annotate-int8: weight_dtype {weight_dtype!r} needs static activations "
                              "(dynamic quantization lowers int8 weights only)")
        self.weight_dtype = weight_dtype
        self.op_types = tuple(op_types)
        self.exclude_nodes = frozenset(exclude_nodes)
        self._integer_derived: dict[ir.Value, str] = {}  # set per call: values computed from integer inputs
        self.per_channel = bool(per_channel)
        self.activation_dtype = activation_dtype
        self.static_activations = bool(static_activations)
        try:  # the observer is a constructor call, written into every static activation's spec
            spec = observer if isinstance(observer, ObserverSpec) else ObserverSpec(observer)
            if percentile is not None:
                spec = dataclasses.replace(spec, percentile=percentile)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"annotate-int8: {exc}") from None
        self.observer = spec

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> AnnotateInt8Pass:
        """Read ``[quantization]``; activations are dynamic when the recipe lowers with ``lower-int8-dynamic``.

        The activation dtype and the calibrator are read only for static activations: what a ``from_recipe`` reads
        is what the pipeline uses (:func:`qcompiler.pipelines.options_read`), so ``--activation-dtype`` or
        ``--calibrator`` with dynamic activations is reported instead of silently ignored.
        """
        q = recipe.quantization
        dynamic = "lower-int8-dynamic" in recipe.passes and "lower-int8-dynamic" not in recipe.disable
        kwargs: dict[str, Any] = {
            "op_types": q.op_types, "exclude_nodes": q.exclude_nodes, "per_channel": q.per_channel,
            "static_activations": not dynamic, "weight_dtype": q.weight_dtype, "embedding": q.embedding,
        }
        if not dynamic:
            calibrator = recipe.calibration.calibrator
            kwargs.update(activation_dtype=q.activation_dtype, observer=calibrator)
            if calibrator == "percentile":
                kwargs.update(percentile=recipe.calibration.percentile)
        kwargs.update(options)
        return cls(**kwargs)

    # -- activation-only ops ------------------------------------------------------------------------------------
    def _check_activation_op(self, model: ir.Model, node: ir.Node) -> str | None:
        """Why the activation-only op cannot be annotated, or None."""
        if not self.static_activations:
            return "activation-only op needs static activations"
        if node.graph is not model.graph:
            return "inside a subgraph"
        if node.name in self.exclude_nodes:
            return "excluded by name"
        if self.activation_dtype not in ("uint8", "int8"):
            return f"activation-only op with {self.activation_dtype} activations (8-bit only)"
        positions = activation_inputs(node)
        if not positions or len(node.outputs) != 1:
            return "no input or several outputs"
        for i in positions:
            x = node.inputs[i] if i < len(node.inputs) else None
            if x is None:
                return "missing input"
            if x.const_value is not None:
                return "constant operand (no integer kernel takes a float constant)"
            if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
                return "unsupported dtype (float32 only)"
        if node.op_type == "Softmax" and self._softmax_axis_not_last(node):
            return "Softmax over an axis other than the last"
        for value in [node.inputs[i] for i in positions] + [node.outputs[0]]:
            if value in self._integer_derived:
                return (f"reads or makes a tensor computed from the integer input "
                        f"'{self._integer_derived[value]}' (a mask: its range depends on padding)")
        return None

    @staticmethod
    def _softmax_axis_not_last(node: ir.Node) -> bool:
        attr = node.attributes.get("axis")
        axis = -1 if attr is None else int(attr.as_int())
        shape = node.inputs[0].shape
        return axis != -1 and not (shape is not None and shape.rank() and axis == shape.rank() - 1)

    def _annotate_activation_op(self, node: ir.Node, act: QuantSpec) -> bool:
        changed = False
        for i in activation_inputs(node):
            changed |= set_qspec(node.inputs[i], act)
        changed |= set_qspec(node.outputs[0], act)
        changed |= set_node_quant(node, NodeQuant("int8-static", "activations"))
        return changed

    # -- specs ------------------------------------------------------------------------------------------------
    def _activation_spec(self) -> QuantSpec:
        if self.static_activations:
            symmetric = self.activation_dtype in ("int16", "float8e4m3fn")  # int8 stays asymmetric, as before
            return QuantSpec(dtype=self.activation_dtype, granularity="per_tensor", symmetric=symmetric,
                             observer=self.observer)
        return QuantSpec(dtype="uint8", granularity="per_tensor", symmetric=False, dynamic=True)

    def _weight_spec(self, axis: int) -> QuantSpec:
        if self.per_channel:
            return QuantSpec(dtype=self.weight_dtype, granularity="per_channel", axis=axis, symmetric=True)
        return QuantSpec(dtype=self.weight_dtype, granularity="per_tensor", symmetric=True)

    def _check(self, model: ir.Model, node: ir.Node) -> str | None:
        """Why the node cannot be annotated, or None."""
        if node.graph is not model.graph:
            return "inside a subgraph"
        if node.name in self.exclude_nodes:
            return "excluded by name"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "missing input"
        x, w = node.inputs[0], node.inputs[1]
        if w.const_value is None:
            return "non-constant weight"
        if w.is_graph_input():
            return "weight is a graph input (overridable initializer)"
        if w.const_value.dtype != ir.DataType.FLOAT or (x.dtype is not None and x.dtype != ir.DataType.FLOAT):
            return "unsupported dtype (float32 only)"
        rank = len(w.const_value.shape)
        if w.const_value.size == 0:
            return "empty weight (0 elements)"
        if node.op_type == "Conv" and not 3 <= rank <= 5:
            return f"Conv weight of rank {rank}"
        if node.op_type in ("MatMul", "Gemm") and rank != 2:
            return f"{node.op_type} weight of rank {rank} (2-D only)"
        if node.op_type == "MatMul" and x.shape is not None and len(x.shape) < 2:
            return "1-D MatMul activation"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
            return "non-constant bias"
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = tuple(node.inputs[2].const_value.shape.numpy())
            trans_b = node.attributes.get("transB")
            n = w.const_value.shape[0 if trans_b is not None and trans_b.as_int() else 1]
            if len(bias) > 2 or (bias and bias[-1] not in (1, n)):
                return f"Gemm bias of shape {list(bias)} does not broadcast to the output's {n} columns"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        act = self._activation_spec()
        scheme = "int8-static" if self.static_activations else "int8-dynamic"
        trained = any(node.meta.get(TRAINED_KEY) for node in model.graph)  # a QAT model: only its trained layers
        self._integer_derived = integer_derived_values(model) if self.static_activations else {}
        tables = self._embedding_tables(model, trained)
        tied = {head for readers, reason in tables.values() if reason is None for head in readers.heads}
        for node in iter_nodes(model):
            if node.op_type not in self.op_types or node.domain not in ("", "ai.onnx") or node in tied:
                continue
            if trained and not node.meta.get(TRAINED_KEY):
                self.skip(node, "not trained (a QAT model): left float")
                continue
            if self._is_activation_op_candidate(node):
                reason = self._check_activation_op(model, node)
                if reason is not None:
                    self.skip(node, reason)
                    continue
                modified |= self._annotate_activation_op(node, act)
                self.count(f"annotated_activation_{node.op_type}")
                continue
            if node.op_type not in LAYER_OPS:
                continue
            reason = self._check(model, node)
            weight = node.inputs[1] if reason is None else None
            wspec = None
            if weight is not None:
                wspec = self._weight_spec(weight_axis(node))
                existing = get_qspec(weight)
                if existing is not None and existing != wspec and self._claimed(weight, node):
                    reason = "weight shared with a node that quantizes it differently"
            if reason is not None:
                self.skip(node, reason)
                continue
            changed = set_qspec(weight, wspec)
            changed |= set_qspec(node.inputs[0], act)
            if self.static_activations:
                changed |= set_qspec(quantized_output(node), act)
            changed |= set_node_quant(node, NodeQuant(scheme))
            modified |= changed
            self.count(f"annotated_{node.op_type}")
        modified |= self._annotate_embeddings(tables, act, scheme)
        logger.debug("annotate-int8: %s", dict(self.stats.counters))
        return ir.passes.PassResult(model, modified)

    # -- embedding tables -------------------------------------------------------------------------------------
    def _head_problem(self, model: ir.Model, head: ir.Node) -> str | None:
        """Why a tied projection cannot share its table's int8 codes, or None."""
        x = head.inputs[0]
        if head.graph is not model.graph or "MatMul" not in self.op_types or head.name in self.exclude_nodes:
            return f"its tied projection {head.name!r} stays float (excluded, in a subgraph or MatMul not quantized)"
        if not self.per_channel or self.weight_dtype != "int8":
            return "its tied projection needs int8 weights per channel (one scale per table row)"
        if self.static_activations and self.activation_dtype not in ("uint8", "int8"):
            return f"its tied projection would need {self.activation_dtype} activations (8-bit only)"
        if x is None or x.const_value is not None or (x.dtype is not None and x.dtype != ir.DataType.FLOAT) or \
                (x.shape is not None and x.shape.rank() < 2):
            return f"the input of its tied projection {head.name!r} is not a float activation of rank 2 or more"
        return None

    def _embedding_tables(self, model: ir.Model, trained: bool) -> dict[ir.Value, tuple[Any, str | None]]:
        """Each candidate table with its readers and why it stays float (None: it is quantized)."""
        tables: dict[ir.Value, tuple[Any, str | None]] = {}
        if self.embedding == "float":
            return tables
        for node in model.graph:
            table = embedding_candidate(node)
            if table is None or table in tables:
                continue
            readers = table_readers(table)
            reason = None
            if trained:
                reason = "not trained (a QAT model): left float"
            elif readers.other is not None:
                reason = (f"the table is also read by {readers.other}: an int8 copy would sit next to the float one "
                          "(left float)")
            elif any(g.name in self.exclude_nodes for g in readers.gathers):
                reason = "excluded by name (a Gather of this table)"
            elif table.const_value.size < max(self.embedding_min_elements, 1):
                reason = (f"small embedding table ({table.const_value.size} elements, fewer than "
                          f"{self.embedding_min_elements}): left float")
            else:
                reason = next(filter(None, (self._head_problem(model, h) for h in readers.heads)), None)
                if reason is not None:
                    reason = f"the table stays float: {reason}"
            tables[table] = (readers, reason)
        return tables

    def _annotate_embeddings(self, tables: dict[ir.Value, tuple[Any, str | None]], act: QuantSpec,
                             scheme: str) -> bool:
        modified = False
        for table, (readers, reason) in tables.items():
            if reason is not None:
                for node in dict.fromkeys(u for u, _ in table.uses() if embedding_candidate(u) is table):
                    self.skip(node, reason)
                continue
            modified |= set_qspec(table, embedding_spec(0 if readers.heads else self.embedding_block_size))
            new_codes_holder(table)
            for node in readers.gathers:
                modified |= set_node_quant(node, NodeQuant(scheme, "embedding"))
                self.count("annotated_embedding")
            for head in readers.heads:
                modified |= set_qspec(head.inputs[0], act)
                modified |= set_node_quant(head, NodeQuant(scheme, "tied-head"))
                self.count("annotated_tied_head")
        return modified

    def _is_activation_op_candidate(self, node: ir.Node) -> bool:
        """An activation-only op: one of ACTIVATION_OPS, and for MatMul one whose second input is no constant."""
        if node.op_type not in ACTIVATION_OPS:
            return False
        if node.op_type != "MatMul":
            return True
        b = node.inputs[1] if len(node.inputs) > 1 else None
        return b is not None and b.const_value is None

    @staticmethod
    def _claimed(weight: ir.Value, node: ir.Node) -> bool:
        """True if another annotated consumer of ``weight`` already relies on its current spec."""
        return any(user is not node and node_scheme(user) and user.inputs[1] is weight
                   for user, _ in weight.uses())
