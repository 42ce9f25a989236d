"""Which activations are computed from the model's integer inputs: attention masks and their additive forms.

A BERT-style encoder turns its ``attention_mask`` input into an additive mask, ``(1 - mask) * finfo.min``, and adds
it to the attention scores. The range of that tensor, and of the sum, depends on whether the input holds padding:
calibrated on unpadded samples it is exactly ``[0, 0]`` (quantizing it then erases the mask, and every padded input
attends to its padding), calibrated on padded ones it spans ``-3.4e38`` (a scale of about ``1e36`` that wipes out
the scores). No calibration set can give such a tensor a range that holds for inputs it did not see, so the int8
annotation leaves activation-only ops that read or write one in float (:func:`integer_derived_values`).

The analysis follows data forward from every integer or bool graph input through the main graph, in graph order
(ONNX's topological order). A node's outputs are derived when one of its inputs is, except where the op bounds
its output whatever the integer values were or only looks at shapes:

- ``Gather``/``GatherElements``/``GatherND`` whose integer input is only the indices: the values come from the
  data operand (an embedding lookup's range is its table's), not from the indices;
- ``Shape``, ``Size``: the shape, not the values;
- ``Softmax``, ``Sigmoid``, ``Tanh``, ``Erf``, ``LayerNormalization``: a bounded or normalized output (the masked
  softmax's probabilities lie in ``[0, 1]`` whatever the mask was).

Limits: conservative by design. A float feature computed from an integer input by arithmetic (a count cast to
float) is treated like a mask; only activation-only ops are affected (layers with weights keep their activation
quantization). Subgraphs (If/Loop bodies) are not followed.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["integer_derived_values"]

_INDEX_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
_BOUNDING_OPS = frozenset({"Softmax", "Sigmoid", "Tanh", "Erf", "LayerNormalization"})

_INTEGER_TYPES = frozenset({
    ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
})


def integer_derived_values(model: ir.Model) -> dict[ir.Value, str]:
    """Every value of the main graph computed from an integer/bool graph input (see the module docstring), mapped
    to the name of one such input it derives from."""
    derived: dict[ir.Value, str] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.const_value is not None:
            continue
        if value.dtype in _INTEGER_TYPES:
            derived[value] = value.name or "?"
    if not derived:
        return derived
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type in _SHAPE_OPS or node.op_type in _BOUNDING_OPS:
            continue
        inputs = list(node.inputs)
        if node.op_type in _INDEX_OPS:
            inputs = inputs[:1]  # the data operand only: indices select, they do not make values
        origin = next((derived[x] for x in inputs if x is not None and x in derived), None)
        if origin is None:
            continue
        for out in node.outputs:
            derived[out] = origin
    return derived
