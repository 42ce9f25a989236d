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
  depend on an op that takes its output shape from data (ConstantOfShape, Expand, Reshape, Resize, AffineGrid:
  what only propagation would size, e.g. ``ConstantOfShape(Size(x))``) through values whose shape is not fully
  static; otherwise propagation could give it any length.
- model-local functions: their bodies carry no shapes before inference, so propagation is skipped when a called
  function contains a propagating op.

Limits: the op lists follow onnx 1.23 (``onnx/defs``, ``PartialDataPropagationFunction`` and ``getShapeInput``);
an op that gains a data propagator in a later onnx is not bounded here. A value's data is counted for any element
type (ONNX materializes float vectors too). If/Loop/Scan bodies are analysed with the shapes inference gave them;
a subgraph input whose shape is not fully static counts as depending on data.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

__all__ = ["MAX_PROPAGATED_DIMS", "data_prop_risk"]

#: Most dims the 1-D values seen by propagating ops may add up to before data propagation is skipped.
MAX_PROPAGATED_DIMS = 1 << 21

# Ops of the default domain whose data propagator reads its inputs' data (onnx 1.23; Shape reads only the type).
_PROPAGATING = frozenset({"Add", "Sub", "Mul", "Cast", "Size", "Concat", "Slice", "Gather", "Squeeze", "Unsqueeze"})
# Ops whose shape inference takes an output shape from an input's propagated data (``getShapeInput``).
_SHAPE_FROM_DATA = frozenset({"ConstantOfShape", "Expand", "Reshape", "Resize", "AffineGrid"})
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
    for graph in model.graphs():
        yield from graph


def data_prop_risk(model: ir.Model, budget: int = MAX_PROPAGATED_DIMS) -> tuple[ir.Node, str] | None:
    """(node, reason) when ONNX data propagation on ``model`` could allocate without bound, else None.

    Call it after types and shapes inferred *without* propagation were written onto the model.
    """
    functions = {(f.domain, f.name, f.overload): f for f in model.functions.values()}
    tainted: set[ir.Value] = set()
    for graph in model.graphs():
        if graph is not model.graph:
            tainted.update(v for v in graph.inputs if not _static(v.shape))
    seen: set[ir.Value] = set()
    total = 0
    for node in _nodes(model):  # graph order: a producer comes before its users
        if node.domain in _DEFAULT:
            op = node.op_type
        else:
            function = functions.get((node.domain, node.op_type, node.overload))
            if function is not None and any(n.domain in _DEFAULT and n.op_type in _PROPAGATING for n in function):
                return node, f"calls model-local function '{node.op_type}', whose body propagates data"
            op = ""
        if op in _SHAPE_FROM_DATA or any(v in tainted for v in node.inputs if v is not None):
            tainted.update(v for v in node.outputs if not _static(v.shape))
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
                if value in tainted and value not in node.outputs:
                    return node, (f"input '{value.name}' has an unknown length that only data propagation would "
                                  "give it")
                continue
            total += length
            if total > budget:
                return node, (f"'{value.name}' is a 1-D tensor of {length} elements; propagating data through it "
                              f"and the others would materialize more than {budget} dims")
    return None
