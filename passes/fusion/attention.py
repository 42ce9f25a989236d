"""Fuse the scaled-dot-product attention core of BERT-style exports into ONNX Runtime's ``MultiHeadAttention``.

PyTorch exports multi-head self-attention as a dozen ops between the Q/K/V projections and the output projection::

    Qh = Transpose[0,2,1,3](Reshape(q, [B,S,N,H]))      Kt = Transpose[0,2,3,1](Reshape(k, [B,T,N,H]))
    Vh = Transpose[0,2,1,3](Reshape(v, [B,T,N,H]))
    P  = Softmax(MatMul(Qh, Kt) * c  [+ mask])           (or / c; the mask Add in either operand order)
    y  = Reshape(Transpose[0,2,1,3](MatMul(P, Vh)), [B,S,N*H])

ONNX Runtime's session optimizer does not recognise this spelling (only its offline transformers optimizer does),
so it runs two batched MatMuls, a Softmax and four transposes per layer. This pass replaces the core with
``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=mask)`` (``num_heads=N``, ``scale=c``): one kernel
that ONNX Runtime runs on CPU (and CUDA). For quantization the boundary then falls exactly where ONNX Runtime has
integer kernels: the Q/K/V and output projections stay MatMuls with weights (MatMulIntegerToFloat), the attention
core stays float inside one op instead of offering its Softmax and mask Add as quantization candidates.

Conditions (else a counted skip): q, k, v rank 3 with a static last dim ``D = N*H``; ``N`` and ``H`` read from the
Reshape's target shape (a constant, or a Concat whose last two inputs are constants; one of them may be -1); the Transposes exactly as
above; every intermediate read only inside the pattern; ``c`` a scalar constant; Softmax over the last axis; the
output Reshape back to ``D`` channels; a mask whose shape is ``[B or 1, 1, 1 or S, T]`` (rank 4), which is expanded
to ``[B, 1, S, T]`` once per mask value (MultiHeadAttention wants that dim 2 equal to ``S``); default opset 15 or
newer (the expansion reads ``Shape(q, start=1, end=2)``). The float result differs from the spelled-out ops only
by float rounding (measured below 1e-6 relative on MiniLM). Main graph only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import (
    NameScope,
    const_array,
    copy_type,
    default_opset,
    drop_unused_initializers,
    scalar_constant,
)

__all__ = ["FuseAttentionPass"]

logger = logging.getLogger(__name__)

_CONTRIB = "com.microsoft"
_HEADS = (0, 2, 1, 3)
_KEYS_T = (0, 2, 3, 1)


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and [user for user, _ in value.uses()] == [node]


def _perm(node: ir.Node) -> tuple[int, ...]:
    attr = node.attributes.get("perm")
    return tuple(attr.as_ints()) if attr is not None else ()


def _target_tail(reshape: ir.Node, count: int) -> list[int] | None:
    """The last ``count`` entries of a Reshape's target shape: from a constant, or a Concat of constants there."""
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    array = const_array(shape)
    if array is not None:
        return [int(v) for v in array.reshape(-1)[-count:]] if array.size >= count else None
    concat = _op(shape, "Concat")
    if concat is None:
        return None
    tail: list[int] = []
    for part in reversed(concat.inputs):
        piece = const_array(part)
        if piece is None:
            break
        tail = [int(v) for v in piece.reshape(-1)] + tail
        if len(tail) >= count:
            return tail[-count:]
    return None


class _Attention:
    """The matched values and nodes of one attention core."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.q = self.k = self.v = self.mask = self.output = None
        self.heads = self.head_size = 0
        self.scale = 1.0


def _heads_input(transposed: ir.Value, perm: tuple[int, ...], found: _Attention) -> tuple[ir.Value, int, int] | str:
    """(the projection, N, H) behind ``Transpose[perm](Reshape(x, [.., N, H]))``, or the reason it is not."""
    transpose = _op(transposed, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return "Q/K/V are not split into heads by Reshape + Transpose"
    reshape = _op(transpose.inputs[0], "Reshape")
    if reshape is None or not _only_use(reshape.outputs[0], transpose):
        return "Q/K/V are not split into heads by Reshape + Transpose"
    x = reshape.inputs[0]
    tail = _target_tail(reshape, 2)
    if x is None or x.shape is None or x.shape.rank() != 3 or not isinstance(x.shape[-1], int) or tail is None:
        return "head count and size are not static"
    heads, size = tail
    channels = x.shape[-1]
    if heads == -1 and size > 0 and channels % size == 0:  # view(B, S, -1, H)
        heads = channels // size
    elif size == -1 and heads > 0 and channels % heads == 0:
        size = channels // heads
    if heads <= 0 or size <= 0 or heads * size != x.shape[-1]:
        return "head count and size do not split the channels"
    found.nodes += [reshape, transpose]
    return x, heads, size


def _is_scores(value: ir.Value | None) -> bool:
    """A MatMul output, or a Mul/Div of one (the scaled scores, as opposed to the mask)."""
    if _op(value, "MatMul") is not None:
        return True
    node = _op(value, "Mul") or _op(value, "Div")
    return node is not None and any(_op(v, "MatMul") is not None for v in node.inputs)


def _match(softmax: ir.Node) -> _Attention | str:
    """The attention core around ``softmax``, or the reason it is not one (``""``: not a candidate at all)."""
    found = _Attention()
    probs = softmax.outputs[0]
    pv = [user for user, _ in probs.uses()]
    if len(pv) != 1 or pv[0].op_type != "MatMul" or pv[0].inputs[0] is not probs or probs.is_graph_output():
        return ""
    pv = pv[0]
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 3):
        return "Softmax is not over the last axis"
    value = softmax.inputs[0]
    add = _op(value, "Add")
    if add is not None and _only_use(value, softmax):
        scaled = next((v for v in add.inputs if _is_scores(v)), None)
        if scaled is None:
            return "attention scores are not a scaled MatMul"
        found.mask = add.inputs[1] if add.inputs[0] is scaled else add.inputs[0]
        found.nodes.append(add)
        value = scaled
    scale_node = _op(value, "Mul") or _op(value, "Div")
    if scale_node is not None:
        if not _only_use(value, found.nodes[-1] if found.nodes else softmax):
            return "scaled scores have other readers"
        scores = next((v for v in scale_node.inputs if _op(v, "MatMul")), None)
        factor = scalar_constant(scale_node.inputs[1] if scale_node.inputs[0] is scores else scale_node.inputs[0])
        if scores is None or factor is None or factor == 0:
            return "attention scale is not a scalar constant"
        if scale_node.op_type == "Div" and scale_node.inputs[1] is scores:
            return "attention scale divides by the scores"
        found.scale = factor if scale_node.op_type == "Mul" else 1.0 / factor
        found.nodes.append(scale_node)
        value = scores
    qk = _op(value, "MatMul")
    if qk is None or not _only_use(value, found.nodes[-1] if found.nodes else softmax):
        return "attention scores are not a MatMul read once"
    found.nodes += [qk, softmax, pv]
    for name, transposed, perm in (("q", qk.inputs[0], _HEADS), ("k", qk.inputs[1], _KEYS_T),
                                   ("v", pv.inputs[1], _HEADS)):
        if not _only_use(transposed, qk if name != "v" else pv):
            return "Q/K/V heads have other readers"
        split = _heads_input(transposed, perm, found)
        if isinstance(split, str):
            return split
        x, heads, size = split
        if found.heads and (heads, size) != (found.heads, found.head_size):
            return "Q, K and V have different head shapes"
        found.heads, found.head_size = heads, size
        setattr(found, name, x)
    merged = pv.outputs[0]
    transpose = next(iter(u for u, _ in merged.uses()), None)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != _HEADS or \
            not _only_use(merged, transpose):
        return "attention output is not merged by Transpose + Reshape"
    reshape = next(iter(u for u, _ in transpose.outputs[0].uses()), None)
    if reshape is None or reshape.op_type != "Reshape" or not _only_use(transpose.outputs[0], reshape):
        return "attention output is not merged by Transpose + Reshape"
    tail = _target_tail(reshape, 1)
    if tail is None or tail[0] not in (found.heads * found.head_size, -1):
        return "attention output is not reshaped back to N*H channels"
    if found.mask is not None:
        shape = found.mask.shape
        if shape is None or shape.rank() != 4 or shape[1] != 1:
            return "mask is not [B or 1, 1, 1 or S, T]"
    found.nodes += [transpose, reshape]
    found.output = reshape.outputs[0]
    return found


class FuseAttentionPass(QPass):
    """Replace BERT-style attention cores with ``com.microsoft.MultiHeadAttention``."""

    name = "fuse-attention"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        softmaxes = [n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
        if not softmaxes:
            return ir.passes.PassResult(model, False)
        if default_opset(model) < 15:
            for node in softmaxes:
                self.skip(node, "default opset below 15")
            return ir.passes.PassResult(model, False)
        names = NameScope(model)
        expanded: dict[ir.Value, ir.Value] = {}
        fused = 0
        for softmax in softmaxes:
            if softmax.graph is not graph:
                continue
            found = _match(softmax)
            if isinstance(found, str):
                if found:
                    self.skip(softmax, found)
                continue
            self._replace(graph, found, names, expanded)
            fused += 1
        if fused:
            model.opset_imports.setdefault(_CONTRIB, 1)
            RemoveUnusedNodesPass()(model)  # the shape computations that only fed the removed Reshapes
        self.count("fused", fused)
        return ir.passes.PassResult(model, fused > 0)

    def _expanded_mask(self, graph: ir.Graph, found: _Attention, names: NameScope,
                       expanded: dict[ir.Value, ir.Value]) -> ir.Value:
        """``mask`` broadcast to ``[B, 1, S, T]`` (made once per mask value, next to the mask's producer)."""
        mask = found.mask
        if mask in expanded:
            return expanded[mask]
        seq = ir.node("Shape", [found.q], attributes={"start": 1, "end": 2}, name=names.fresh("attention_mask_seq"))
        ones = ir.Value(name=names.fresh("attention_mask_ones"), const_value=ir.tensor(np.array([1, 1], np.int64)))
        last = ir.Value(name=names.fresh("attention_mask_one"), const_value=ir.tensor(np.array([1], np.int64)))
        for value in (ones, last):
            graph.register_initializer(value)
        shape = ir.node("Concat", [ones, seq.outputs[0], last], attributes={"axis": 0},
                        name=names.fresh("attention_mask_shape"))
        expand = ir.node("Expand", [mask, shape.outputs[0]], name=names.fresh("attention_mask_expand"))
        expand.outputs[0].name = names.fresh("attention_bias")
        if mask.dtype is not None:
            expand.outputs[0].dtype = mask.dtype
        graph.insert_before(found.nodes[0], [seq, shape, expand])
        expanded[mask] = expand.outputs[0]
        return expand.outputs[0]

    def _replace(self, graph: ir.Graph, found: _Attention, names: NameScope,
                 expanded: dict[ir.Value, ir.Value]) -> None:
        inputs: list[ir.Value | None] = [found.q, found.k, found.v]
        if found.mask is not None:
            inputs += [None, None, self._expanded_mask(graph, found, names, expanded)]
        last = found.nodes[-1]
        mha = ir.node("MultiHeadAttention", inputs, domain=_CONTRIB, name=last.name,
                      attributes={"num_heads": found.heads, "scale": float(found.scale)})
        copy_type(mha.outputs[0], found.output)
        constants = [v for n in found.nodes for v in n.inputs if v is not None and v.is_initializer()]
        ir.convenience.replace_nodes_and_values(graph, last, found.nodes, [mha], [found.output], mha.outputs)
        drop_unused_initializers(constants)
