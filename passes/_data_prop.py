"""When ONNX shape inference may propagate data: a bound on what its data propagation can allocate.

ONNX's data propagation (``infer_shapes(data_prop=True)``) tracks the values of small integer tensors (shapes) as
``TensorShapeProto`` dims, so that ``Reshape(x, Concat(Shape(x)[0], [-1]))`` gets a static shape. Its cost is not
bounded by the model's size: every op with a data propagator (Add, Sub, Mul, Cast, Size, Concat, Slice, Gather,
Squeeze, Unsqueeze) asks for the data of its inputs, and for an input of rank 1 with a known length ``N`` that is not
a constant, ONNX makes ``N`` empty dims (about 70 bytes each), whatever the element type. A 16 KB model declaring a
float input of 2**28 elements (or reshaping a declared ``[2**14, 2**14]`` to 1-D) makes ONNX allocate tens of GB.

:func:`data_prop_risk` looks at the model *after* inference without propagation (which allocates nothing of the
kind) and says why propagation must be skipped, or None:

- ``budget``: the 1-D values (rank 1, known length) that propagating ops read or write, each counted once, may
  add up to at most :data:`MAX_PROPAGATED_DIMS` dims (``2**21``: ~150 MB at worst); a 1-D bias of 4,096 floats read
  by an Add counts 4,096.
- ``open``: a value read by a propagating op whose rank is unknown, or of rank 1 with an unknown length, must not
  take its shape from an op that sizes its output from data (ConstantOfShape, Expand, Reshape, Resize, AffineGrid:
  what only propagation would size, e.g. ``ConstantOfShape(Size(x))``) fed with values that are unbounded or larger
  than :data:`MAX_DATA_DIM`, directly or through values whose shape is not fully static. The largest value
  propagation can know is bounded on the way: a small integer constant's largest magnitude, ``Shape`` of a static
  shape its largest dim, ``Size`` of a static shape its element count, then sums, products and subsets; a dynamic
  ``Shape`` is unbounded. Below the limit (ranks, small dims: ONNX's own expanded LayerNormalization) the value may
  still flow through elementwise and slicing ops, each counted as :data:`MAX_DATA_DIM` dims in the budget.
- model-local functions: their bodies carry no shapes before inference, so propagation is skipped when a called
  function contains a propagating op.

Limits: the op lists follow onnx 1.23 (``onnx/defs``, ``PartialDataPropagationFunction`` and ``getShapeInput``);
an op that gains a data propagator in a later onnx is not bounded here. A value's data is counted for any element
type (ONNX materializes float vectors too). If/Loop/Scan bodies are analysed with the shapes inference gave them;
a subgraph input whose shape is not fully static counts as depending on data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx_ir as ir

from qcompiler.pass_manager import model_graphs

__all__ = ["MAX_DATA_DIM", "MAX_PROPAGATED_DIMS", "data_prop_risk"]

#: Most dims the 1-D values seen by propagating ops may add up to before data propagation is skipped.
MAX_PROPAGATED_DIMS = 1 << 21
#: Largest value a shape computation may produce for a shape-from-data op without counting as unbounded.
MAX_DATA_DIM = 1 << 16
_WEIGHT_BYTES = 1000  # initializers larger than this reach ONNX inference without their data (infer-shapes)

# Ops of the default domain whose data propagator reads its inputs' data (onnx 1.23; Shape reads only the type).
_PROPAGATING = frozenset({"Add", "Sub", "Mul", "Cast", "Size", "Concat", "Slice", "Gather", "Squeeze", "Unsqueeze"})
# Ops whose shape inference takes an output shape from an input's propagated data (``getShapeInput``): which input.
_SHAPE_FROM_DATA = {"ConstantOfShape": 0, "Expand": 1, "Reshape": 1, "Resize": 3, "AffineGrid": 1}
# Ops whose output is no longer than their longest input (a 1-D result of bounded inputs stays bounded).
_LENGTH_KEEPING = frozenset({
    "Abs", "Acos", "Add", "And", "Asin", "Atan", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast",
    "CastLike", "Ceil", "Clip", "Cos", "Div", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mod", "Mul", "Neg",
    "Not", "Or", "Pow", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin", "Slice", "Softplus", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Unsqueeze", "Where", "Xor"})
_DEFAULT = ("", "ai.onnx")


def _static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _length(value: ir.Value) -> int | None:
    """The known length of a rank-1 value; -1 when its rank is unknown or its length is not known; None otherwise
    (rank 0, or rank 2 and more: no data of that kind is made)."""
    shape = value.shape
    if shape is None:
        return -1
    if len(shape) != 1:
        return None
    dim = shape[0]
    return dim if isinstance(dim, int) else -1


def _nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in model_graphs(model):
        yield from graph


def _constant_bound(value: ir.Value) -> int:
    """Largest absolute value ONNX can read as data from a constant: an integer tensor of rank 0 or 1 (a Constant's,
    or an initializer small enough to reach inference with its data); 0 for anything else."""
    tensor = value.const_value
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or len(tensor.shape) > 1:
        return 0
    producer = value.producer()
    if producer is None and tensor.nbytes > _WEIGHT_BYTES:
        return 0
    array = tensor.numpy()
    return int(abs(array).max()) if array.size else 0


def _output_bound(op: str, node: ir.Node, bounds: dict[ir.Value, int | None]) -> int | None:
    """Largest value data propagation can know in ``node``'s output (None: no bound), from its inputs' bounds."""

    def bound(index: int) -> int | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        return 0 if value is None else bounds.get(value, 0)

    if op == "Shape":
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        return max((int(d) for d in shape), default=0) if _static(shape) else None
    if op == "Size":
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        return math.prod(int(d) for d in shape) if _static(shape) else None
    inputs = [bound(i) for i in range(len(node.inputs))] or [0]
    if None in inputs:
        return None
    if op in ("Add", "Sub"):
        return sum(inputs[:2])
    if op == "Mul":
        return math.prod(inputs[:2])
    if op == "Concat":
        return max(inputs)
    return inputs[0]  # Cast, Slice, Gather, Squeeze, Unsqueeze: a subset of input 0's values


def data_prop_risk(model: ir.Model, budget: int = MAX_PROPAGATED_DIMS) -> tuple[ir.Node, str] | None:
    """(node, reason) when ONNX data propagation on ``model`` could allocate without bound, else None.

    Call it after types and shapes inferred *without* propagation were written onto the model.
    """
    functions = {(f.domain, f.name, f.overload): f for f in model.functions.values()}
    bounds: dict[ir.Value, int | None] = {}  # largest value propagation can know (absent: none known, 0)
    hard: set[ir.Value] = set()  # shape may come from data of unbounded value
    soft: set[ir.Value] = set()  # shape may come from data of values at most MAX_DATA_DIM, lengths kept since
    for graph in model_graphs(model)[1:]:
        hard.update(v for v in graph.inputs if not _static(v.shape))
    for graph in model_graphs(model):
        for value in graph.initializers.values():
            bounds[value] = _constant_bound(value)
    seen: set[ir.Value] = set()
    total = 0
    for node in _nodes(model):  # graph order, as ONNX infers: a producer comes before its users
        if node.domain in _DEFAULT:
            op = node.op_type
        else:
            function = functions.get((node.domain, node.op_type, node.overload))
            if function is not None and any(n.domain in _DEFAULT and n.op_type in _PROPAGATING for n in function):
                return node, f"calls model-local function '{node.op_type}', whose body propagates data"
            op = ""
        if op == "Constant" and node.outputs:
            bounds[node.outputs[0]] = _constant_bound(node.outputs[0])
        elif op in _PROPAGATING or op == "Shape":
            out = _output_bound(op, node, bounds)
            bounds.update((v, out) for v in node.outputs)
        open_outputs = [v for v in node.outputs if not _static(v.shape)]
        if op in _SHAPE_FROM_DATA:
            index = _SHAPE_FROM_DATA[op]
            source = node.inputs[index] if index < len(node.inputs) else None
            value_bound = 0 if source is None else bounds.get(source, 0)
            (hard if value_bound is None or value_bound > MAX_DATA_DIM else soft).update(open_outputs)
        elif any(v in hard for v in node.inputs if v is not None):
            hard.update(open_outputs)
        elif any(v in soft for v in node.inputs if v is not None):
            (soft if op in _LENGTH_KEEPING else hard).update(open_outputs)
        if op not in _PROPAGATING:
            continue
        read = node.inputs
        if op == "Gather" and read and read[0] is not None and _length(read[0]) is None:
            read = read[:1]  # its propagator stops at a data input of rank 0 or 2+, before the indices
        for value in (*read, *node.outputs):
            if value is None or value in seen:
                continue
            seen.add(value)
            length = _length(value)
            if length is None:
                continue
            if length < 0:
                if value in hard and value not in node.outputs:
                    return node, (f"input '{value.name}' has an unknown length that only data propagation would "
                                  "give it")
                if value in soft:
                    total += MAX_DATA_DIM
                continue
            total += length
            if total > budget:
                return node, (f"'{value.name}' is a 1-D tensor of {length} elements; propagating data through it "
                              f"and the others would materialize more than {budget} dims")
    return None
