"""Lower MatMul/Gemm weights to weight-only low-bit blocks: ONNX Runtime's ``com.microsoft.MatMulNBits``.

For ``Y = A @ W`` (MatMul with a constant float32 ``W[K, N]``) or ``Y = A @ B' + C`` (Gemm with ``transA = 0``,
``alpha = beta = 1``, ``B' = B`` or ``B^T``, an optional 1-D bias ``C[N]``), the pass quantizes ``W`` blockwise
along K (:mod:`qcompiler.passes.lower._blockwise`, layout :mod:`qcompiler.runtime.packing`) and writes::

    Y = MatMulNBits(A, B_packed, scales, [zero_points], , [bias]; K, N, bits, block_size, accuracy_level)

Activations stay float (the kernel dequantizes the weights, or, at ``accuracy_level = 4`` on CPU, quantizes the
activations to int8 per block). Widths MatMulNBits lacks on CPU (3, 5, 6, 7 bits; it runs 2, 4 and 8 in ORT 1.32)
go to our own op, in the same arrangement with a generic packing and uint8 zero points only (NF4 goes to
``com.microsoft.MatMulBnb4``, which has no bias input: a Gemm's bias becomes an ``Add`` after it)::

    Y = ai.qcompiler.MatMulIntN(A, B_packed, scales, zero_points, bias; K, N, bits, block_size)

and FP8 E4M3 weights go either to ``DequantizeLinear`` + the float MatMul/Gemm (``fp8_fused = False``, plain ONNX)
or to the fused ``Y = ai.qcompiler.MatMulFp8(A, W^T_e4m3 [N, K] as uint8, scale [N], bias; K, N)``. The custom ops
take every input (an absent zero point or bias is an empty tensor) and run through :mod:`qcompiler.runtime`'s
``Session`` (:mod:`qcompiler.runtime.custom_ops`); the model then imports ``ai.qcompiler`` opset 1.

A weight read by several MatMul/Gemm nodes is quantized once and its packed tensors are shared; the float weight is
dropped when nothing else reads it (a tied embedding's Gather keeps it).

Skipped with a counted reason: excluded names, nodes in subgraphs, non-constant or non-float32 weights (or weights
that are graph inputs), weights not 2-D, a 1-D activation, Gemm with ``transA = 1``, ``alpha``/``beta`` other than
1 or a bias that is not a constant ``[N]``. Per-layer weight SQNR is recorded. ``preserves_float = False``.
A weight (or embedding table) that is quantized and holds NaN or Inf is refused (:func:`quantized_weight`,
:class:`~qcompiler.errors.InvalidModelError`, exit code 2); the same check guards the algorithm passes that read the
weights before the lowering (GPTQ, AWQ, HQQ, ``select-weight-bits``). A float bias is not checked: it stays float.

Tied embeddings: exporters write a tied lm_head as ``MatMul(x, Transpose(E))`` with ``E[vocab, hidden]`` the token
embedding that a Gather also reads. The pass quantizes ``E^T`` as the lm_head's weight (the Transpose goes away)
and, with ``embedding = "float"``, leaves ``E`` in float for the Gather. With ``embedding = "int8"``/``"int4"``
every ``Gather`` over axis 0 of a constant float32 table becomes ``com.microsoft.GatherBlockQuantized`` (blocks
along the table's rows, the lowering's block size and symmetry), and the float table goes. The lm_head's format is
``lm_head``: the recipe's ("same"), "int8", or "float" (the output projection: a MatMul/Gemm whose output is a graph
output, or whose weight is a table a Gather reads).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, const_array, copy_type, drop_unused_initializers, release_external
from qcompiler.passes._finite import require_finite
from qcompiler.passes.lower._blockwise import BlockwiseWeight, quantize_nf4, quantize_rtn, resolve_block_size
from qcompiler.passes.lower._weights import quantize_weight_fp8, sqnr_from_energies
from qcompiler.progress import track
from qcompiler.runtime import custom_ops, packing

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["BLOCKWISE_KEY", "WEIGHT_BITS_KEY", "LowerWeightOnlyPass", "is_lm_head", "layer_bits", "layer_weight",
           "quantized_weight", "transposed_constant"]

logger = logging.getLogger(__name__)

_CONTRIB = "com.microsoft"
#: node metadata key: a :class:`BlockwiseWeight` chosen by an algorithm pass (GPTQ...) for this node's weight
BLOCKWISE_KEY = "qcompiler.blockwise_weight"
#: node metadata key: the bits mixed precision (``select-weight-bits``) chose for this node's weight
WEIGHT_BITS_KEY = "qcompiler.weight_bits"
#: the bits the pass lowers; MatMulNBits takes :data:`_NBITS` (its CPU widths), MatMulIntN the others
_BITS = (2, 3, 4, 5, 6, 7, 8)
_NBITS = (2, 4, 8)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def weight_sqnr_db(weight: np.ndarray, dequantized: np.ndarray) -> float:
    """SQNR (dB) of a weight against its dequantized value."""
    w = weight.astype(np.float64)
    return sqnr_from_energies(float(np.vdot(w, w)), float(np.sum((w - dequantized) ** 2)))


def transposed_constant(value: ir.Value) -> ir.Value | None:
    """The constant 2-D float32 ``E`` when ``value = Transpose(E, perm=[1, 0])`` (a tied lm_head), else None."""
    node = value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    perm = node.attributes.get("perm")
    source = node.inputs[0]
    array = const_array(source)
    if array is None or array.ndim != 2 or array.dtype != np.float32 or source.is_graph_input():
        return None
    return source if perm is None or tuple(perm.as_ints()) == (1, 0) else None


def is_lm_head(node: ir.Node) -> bool:
    """The output projection: its output is a graph output, or its weight is a tied embedding (Transpose(E), E
    read by a Gather)."""
    if any(out.is_graph_output() for out in node.outputs):
        return True
    source = transposed_constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return source is not None and any(user.op_type == "Gather" for user, _ in source.uses())


def layer_bits(node: ir.Node, bits: int, lm_head: str) -> int | None:
    """The bits this node's weight gets (None: it stays float): the ``lm_head`` choice for the output projection,
    else the bits mixed precision chose for it, else ``bits``."""
    if lm_head != "same" and is_lm_head(node):
        return 8 if lm_head == "int8" else None
    chosen = node.meta.get(WEIGHT_BITS_KEY)
    return bits if chosen is None else int(chosen)


def layer_weight(model: ir.Model, node: ir.Node,
                 exclude_nodes: frozenset[str] = frozenset()) -> tuple[np.ndarray, ir.Value | None] | str:
    """(``W[K, N]`` float32 of a MatMul/Gemm, its bias value or None), or the reason the node cannot be lowered."""
    if node.graph is not model.graph:
        return "inside a subgraph"
    if node.name in exclude_nodes:
        return "excluded by name"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing input"
    x, w = node.inputs[0], node.inputs[1]
    if w.is_graph_input():
        return "weight is a graph input (overridable initializer)"
    array = const_array(w)
    source = transposed_constant(w)
    if array is None and source is not None:  # a tied lm_head: MatMul(x, Transpose(embedding))
        array = const_array(source).T
    if array is None:
        return "non-constant weight"
    if array.dtype != np.float32 or (x.dtype is not None and x.dtype != ir.DataType.FLOAT):
        return "unsupported dtype (float32 only)"
    if array.ndim != 2:
        return f"weight of rank {array.ndim} (2-D only)"
    if array.size == 0:
        return "empty weight (0 elements)"
    if x.shape is not None and x.shape.rank() < 2:
        return "1-D activation"
    bias = None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return "Gemm with transA=1"
        if float(_attr(node, "alpha", 1.0)) != 1.0 or float(_attr(node, "beta", 1.0)) != 1.0:
            return "Gemm with alpha or beta other than 1"
        if _attr(node, "transB", 0):
            array = array.T
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            b = const_array(bias)
            if b is None or b.shape != (array.shape[1],) or b.dtype != np.float32:
                return "Gemm bias is not a constant float32 [N]"
    return np.ascontiguousarray(array), bias


def quantized_weight(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """``weight`` (``W[K, N]`` of ``node``, as :func:`layer_weight` found it) if it is finite, else
    :class:`~qcompiler.errors.InvalidModelError` naming the weight (a tied lm_head's embedding table) and the node.

    Every pass that quantizes (or measures the quantization of) a layer's weight calls it first."""
    stored = transposed_constant(node.inputs[1]) or node.inputs[1]
    array = const_array(stored)  # the stored orientation, so that the index in the message is the file's
    require_finite(weight if array is None else array, stored.name, node.name)
    return weight


def empty_constant(graph: ir.Graph, names: NameScope, dtype: type) -> ir.Value:
    """A shared empty 1-D initializer of ``dtype``: the "absent" input of our custom ops (created once per graph)."""
    name = f"qcompiler_empty_{np.dtype(dtype).name}"
    value = graph.initializers.get(name)
    if value is not None and value.const_value is not None and value.const_value.numpy().size == 0 and \
            value.const_value.numpy().dtype == np.dtype(dtype):
        return value
    return register_constants(graph, names, "qcompiler_empty", [(np.dtype(dtype).name, np.zeros(0, dtype))])[0]


def register_constants(graph: ir.Graph, names: NameScope, base: str,
                       arrays: list[tuple[str, np.ndarray | None]]) -> list[ir.Value | None]:
    """New initializers named ``base_suffix`` (unique) for each array; None stays None (an absent input)."""
    values: list[ir.Value | None] = []
    for suffix, array in arrays:
        if array is None:
            values.append(None)
            continue
        name = names.fresh(f"{base}_{suffix}")
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
        graph.register_initializer(value)
        values.append(value)
    return values


class LowerWeightOnlyPass(QPass):
    """Replace MatMul/Gemm with constant weights by MatMulNBits over blockwise low-bit codes.

    Args:
        bits: 2, 4 or 8 (MatMulNBits), or 3, 5, 6 or 7 (``ai.qcompiler.MatMulIntN``).
        block_size: values per block along K (a power of two from 16 to 256), or 0 for one block per column.
        symmetric: fixed middle zero point (no zero-point input) or a zero point per block.
        float_zero_point: asymmetric zero points as float32 (the exact block range) instead of uint8 codes.
        accuracy_level: MatMulNBits' ``accuracy_level`` attribute (0-4).
        exclude_nodes: node names to leave in float.
        ternary: 2-bit layers get the ternary grid (codes 1..3: ``{-s, 0, +s}``, ``s`` the block's mean ``|w|``).
        nf4: 4-bit layers become MatMulBnb4 (NF4 codebook, absmax per block).
        fp8: 8-bit layers store FP8 E4M3 weights with one scale per output column and a ``DequantizeLinear``
            before the float MatMul/Gemm (no fused ONNX Runtime kernel exists for it; needs default opset 19,
            to which the model is converted when older).
        fp8_fused: with ``fp8``, the fused ``ai.qcompiler.MatMulFp8`` instead (no DequantizeLinear, no opset
            change; needs qcompiler's runtime Session and onnxruntime-extensions).
    """

    name = "lower-weight-only"
    stage = "lower"
    preserves_float = False

    def __init__(self, *, bits: int = 4, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 0,
                 exclude_nodes: tuple[str, ...] = (), float_zero_point: bool = False, lm_head: str = "same",
                 embedding: str = "float", nf4: bool = False, ternary: bool = False, fp8: bool = False,
                 fp8_fused: bool = False, progress: bool = False) -> None:
        super().__init__()
        if bits not in _BITS:
            raise ConfigError(f"{self.name}: bits must be one of {_BITS}, got {bits!r}")
        if not (block_size == 0 or (16 <= block_size <= 256 and block_size & (block_size - 1) == 0)):
            raise ConfigError(f"{self.name}: block_size must be a power of two from 16 to 256, or 0")
        self.bits, self.block_size, self.symmetric = bits, block_size, bool(symmetric)
        self.accuracy_level = int(accuracy_level)
        self.exclude_nodes = frozenset(exclude_nodes)
        self.float_zero_point = bool(float_zero_point) and not self.symmetric
        if lm_head not in ("same", "int8", "float"):
            raise ConfigError(f"{self.name}: lm_head must be 'same', 'int8' or 'float', got {lm_head!r}")
        self.lm_head = lm_head
        if embedding not in ("float", "int8", "int4"):
            raise ConfigError(f"{self.name}: embedding must be 'float', 'int8' or 'int4', got {embedding!r}")
        self.embedding = embedding
        self.nf4 = bool(nf4)
        if self.nf4 and (bits != 4 or not self.symmetric):
            raise ConfigError(f"{self.name}: nf4 needs bits=4 and symmetric (absmax) blocks")
        if self.float_zero_point and bits == 8:
            raise ConfigError(f"{self.name}: float zero points with 8 bits have no ONNX Runtime CPU kernel")
        if self.float_zero_point and bits not in _NBITS:
            raise ConfigError(f"{self.name}: float zero points need 2 or 4 bits (MatMulNBits); {bits}-bit "
                              "MatMulIntN stores uint8 zero points")
        self.ternary = bool(ternary)
        if self.ternary and (bits != 2 or not self.symmetric):
            raise ConfigError(f"{self.name}: ternary needs bits=2 and symmetric blocks")
        self.fp8, self.fp8_fused, self.progress = bool(fp8), bool(fp8_fused), bool(progress)
        if self.fp8 and bits != 8:
            raise ConfigError(f"{self.name}: fp8 weights are 8-bit (bits=8)")
        if self.fp8_fused and not self.fp8:
            raise ConfigError(f"{self.name}: fp8_fused needs fp8 = True")

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> LowerWeightOnlyPass:
        """Options from the recipe's ``[weight-only]`` section (pass-options override them)."""
        w = recipe.weight_only
        kwargs: dict[str, Any] = {"bits": w.bits, "block_size": w.block_size, "symmetric": w.symmetric,
                                  "accuracy_level": w.accuracy_level, "exclude_nodes": w.exclude_nodes,
                                  "float_zero_point": w.zero_point == "float", "lm_head": w.lm_head,
                                  "embedding": w.embedding, "nf4": w.format == "nf4",
                                  "ternary": w.ternary, "fp8": w.format == "fp8",
                                  "fp8_fused": w.format == "fp8" and w.fp8_kernel == "fused",
                                  "progress": bool(getattr(context, "progress", False))}
        kwargs.update(options)
        return cls(**kwargs)

    # -- the pass ---------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.fp8 and not self.fp8_fused:
            self._ensure_opset(model, 19)
        graph = model.graph
        names = NameScope(model)
        shared: dict[tuple[int, bool, int], tuple[list[ir.Value | None], int]] = {}
        old: list[ir.Value] = []
        lowered = 0
        candidates = [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]
        for node in track(candidates, enabled=self.progress and len(candidates) > 8, desc="lower weights",
                          unit="layer"):
            before: list[ir.Node] = []  # nodes ahead of the replacement (nf4: MatMulBnb4 before its bias Add)
            found = layer_weight(model, node, self.exclude_nodes)
            if isinstance(found, str):
                self.skip(node, found)
                continue
            weight, bias = found
            bits = layer_bits(node, self.bits, self.lm_head)
            if bits is None:
                self.skip(node, "lm_head left in float (lm_head = 'float')")
                continue
            quantized_weight(node, weight)
            source = transposed_constant(node.inputs[1])
            if self.fp8 and bits == 8 and not (self.lm_head == "int8" and is_lm_head(node)):
                fp8_node = self._fp8_fused_node if self.fp8_fused else self._fp8_node
                replacement = fp8_node(graph, node, weight, bias, names)
                kind = f"{node.op_type}_fp8"
            elif self.float_zero_point and bits not in _NBITS:
                self.skip(node, f"float zero points: {bits}-bit MatMulIntN stores uint8 zero points only")
                continue
            elif self.nf4 and bits == 4:
                replacement = self._nf4_node(graph, node, weight, names)
                if bias is not None:  # MatMulBnb4 has no bias input: the Gemm's bias is added after it
                    replacement.outputs[0].name = names.fresh(f"{node.name or 'gemm'}_nf4")
                    before = [replacement]
                    replacement = ir.node("Add", [replacement.outputs[0], bias], name=names.fresh(f"{node.name}_bias"))
                    copy_type(replacement.outputs[0], node.outputs[0])
                kind = f"{node.op_type}_nf4"
            else:
                replacement = self._matmulnbits_node(graph, node, weight, bias, bits, source, shared, names)
                kind = node.op_type if bits in _NBITS else f"{node.op_type}_intn"
            transposer = node.inputs[1].producer() if source is not None else None
            old.extend(v for v in node.inputs[1:] if v is not None)
            read = (node.inputs[1], source)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [*before, replacement], [node.outputs[0]],
                                                   replacement.outputs)
            if transposer is not None:
                self.count("tied_weight_transpose_read")
                if not transposer.outputs[0].uses() and not transposer.outputs[0].is_graph_output():
                    graph.remove(transposer, safe=True)
                    old.append(source)
            lowered += 1
            self.count(f"lowered_{kind}")
            del weight, found  # the last views of the float bytes: unmap them
            for value in read:
                release_external(value)
        if self.embedding != "float":
            lowered += self._lower_embeddings(model, names, old)
        if lowered:
            model.opset_imports.setdefault(_CONTRIB, 1)
        if any(n.domain == custom_ops.DOMAIN for n in graph):
            model.opset_imports.setdefault(custom_ops.DOMAIN, custom_ops.OPSET_VERSION)
        self.count("float_weights_removed", drop_unused_initializers(old))
        return ir.passes.PassResult(model, lowered > 0)

    def _matmulnbits_node(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: ir.Value | None,
                          bits: int, source: ir.Value | None, shared: dict[tuple[int, bool, int], Any],
                          names: NameScope) -> ir.Node:
        """MatMulNBits (or MatMulIntN for the other widths) over ``W[K, N]``, its packed tensors shared by every
        reader of the same weight."""
        transposed = source is not None or (node.op_type == "Gemm" and bool(_attr(node, "transB", 0)))
        key = (id(source if source is not None else node.inputs[1]), transposed, bits)
        chosen = node.meta.get(BLOCKWISE_KEY)
        if isinstance(chosen, BlockwiseWeight) and not self._fits(chosen, weight, bits):
            self.skip(node, "codes chosen for other bits, block size or symmetry: rounded to nearest instead")
            chosen = None
        if key not in shared:
            shared[key] = self._quantize(graph, node, weight, names, chosen, bits)
        else:
            self.count("weights_shared")
        tensors, block = shared[key]
        k, n = weight.shape
        if bits not in _NBITS:
            inputs = [node.inputs[0], *tensors, bias if bias is not None else empty_constant(graph, names, np.float32)]
            replacement = ir.node("MatMulIntN", inputs, domain=custom_ops.DOMAIN, name=node.name,
                                  attributes={"K": k, "N": n, "bits": bits, "block_size": block})
            copy_type(replacement.outputs[0], node.outputs[0])
            return replacement
        inputs: list[ir.Value | None] = [node.inputs[0], *tensors]
        if bias is not None:
            inputs += [None] * (5 - len(inputs)) + [bias]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block,
                      "accuracy_level": self.accuracy_level}
        replacement = ir.node("MatMulNBits", inputs, attributes=attributes, domain=_CONTRIB, name=node.name)
        copy_type(replacement.outputs[0], node.outputs[0])
        return replacement

    def _fits(self, chosen: BlockwiseWeight, weight: np.ndarray, bits: int) -> bool:
        block = resolve_block_size(self.block_size, weight.shape[0])
        return chosen.bits == bits and chosen.block_size == block and \
            (chosen.zero_points is None) == self.symmetric and chosen.codes.shape == weight.shape[::-1] and \
            (chosen.zero_points is None or (chosen.zero_points.dtype != np.uint8) == self.float_zero_point)

    def _quantize(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, names: NameScope,
                  chosen: BlockwiseWeight | None, bits: int) -> tuple[list[ir.Value | None], int]:
        """Quantize ``W[K, N]`` (or take the codes an algorithm chose), register its packed tensors; return them
        and the block size (the codes themselves are not kept: only the packed copy lives on)."""
        block = resolve_block_size(self.block_size, weight.shape[0])
        if chosen is not None:
            blockwise = chosen
            self.count("codes_chosen_by_algorithm")
        else:
            blockwise = quantize_rtn(weight, bits, block, self.symmetric, self.float_zero_point and bits != 8,
                                     ternary=self.ternary and bits == 2)
        base = node.inputs[1].name or node.name or "weight"
        if bits in _NBITS:
            packed, scales, zero_points = blockwise.packed()
            values = register_constants(graph, names, base, [("packed", packed), ("scales", scales),
                                                             ("zero_points", zero_points)])
        else:  # MatMulIntN: every input present, symmetric zero points an empty tensor
            packed, scales, zero_points = blockwise.packed_intn()
            values = register_constants(graph, names, base, [("packed", packed), ("scales", scales)])
            values.append(register_constants(graph, names, base, [("zero_points", zero_points)])[0]
                          if zero_points.size else empty_constant(graph, names, np.uint8))
        self.record_layer(node, weight_sqnr_db=round(sqnr_from_energies(*blockwise.error_energies(weight)), 3),
                          scheme="ternary-weight-only" if self.ternary and bits == 2 else f"int{bits}-weight-only",
                          block_size=block, symmetric=self.symmetric,
                          weight_shape=list(weight.shape))
        return values, blockwise.block_size

    def _lower_embeddings(self, model: ir.Model, names: NameScope, old: list[ir.Value]) -> int:
        """Gather(E, ids) over a constant table -> GatherBlockQuantized (codes blockwise along E's rows)."""
        graph = model.graph
        bits = 8 if self.embedding == "int8" else 4
        lowered = 0
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            table, ids = node.inputs
            array = const_array(table) if table is not None and not table.is_graph_input() else None
            if array is None or array.dtype != np.float32 or array.ndim != 2 or int(_attr(node, "axis", 0)) != 0:
                continue  # not an embedding lookup (shape gathers and the like): not counted
            if ids is None or ids.dtype not in (None, ir.DataType.INT64, ir.DataType.INT32):
                self.skip(node, "embedding indices are not int32/int64")
                continue
            if bits == 4 and array.shape[1] % 2:
                self.skip(node, "int4 embedding with an odd row length")
                continue
            require_finite(array, table.name, node.name, what="embedding table")
            block = resolve_block_size(self.block_size, array.shape[1])
            q = quantize_rtn(np.ascontiguousarray(array.T), bits, block, self.symmetric)  # codes [rows, cols]
            zero_points = None if q.zero_points is None else \
                packing.pack_zero_points(q.zero_points, bits).reshape(array.shape[0], -1)
            values = register_constants(graph, names, table.name or node.name or "embedding",
                                        [("quantized", packing.pack_rows(q.codes, bits)),
                                         ("scales", q.scales.astype(np.float32)), ("zero_points", zero_points)])
            inputs = [values[0], ids, *(v for v in values[1:] if v is not None)]
            replacement = ir.node("GatherBlockQuantized", inputs, domain=_CONTRIB, name=node.name,
                                  attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block,
                                              "bits": bits})
            copy_type(replacement.outputs[0], node.outputs[0])
            ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [node.outputs[0]],
                                                   replacement.outputs)
            old.append(table)
            self.record_layer(node, weight_sqnr_db=round(sqnr_from_energies(*q.error_energies(array.T)), 3),
                              scheme=f"int{bits}-embedding", block_size=block, weight_shape=list(array.shape))
            self.count("lowered_Gather")
            lowered += 1
        return lowered

    def _ensure_opset(self, model: ir.Model, version: int) -> None:
        """Convert the model's default-domain opset up to ``version`` (onnxscript's version converter)."""
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if current >= version:
            return
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, version)
        except Exception as exc:  # the converter raises many types; the reason is what the user needs
            raise ConfigError(f"{self.name}: fp8 needs default opset {version}; converting this opset-{current} "
                              f"model failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from exc
        self.count(f"opset_{current}_converted_to_{version}")

    def _fp8_node(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: ir.Value | None,
                  names: NameScope) -> ir.Node:
        """``DequantizeLinear(W_fp8[K, N], scale[N], axis=1)`` feeding a copy of the MatMul/Gemm (``transB = 0``)."""
        quantized = quantize_weight_fp8(weight, 1)
        base = node.inputs[1].name or node.name or "weight"
        values = register_constants(graph, names, base, [("fp8", quantized.q), ("scale", quantized.scale)])
        dq = ir.node("DequantizeLinear", values, attributes={"axis": 1}, name=names.fresh(f"{base}_fp8_dq"))
        dq.outputs[0].name = names.fresh(f"{base}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(weight.shape)
        graph.insert_before(node, [dq])
        inputs = [node.inputs[0], dq.outputs[0]] + ([bias] if bias is not None else [])
        replacement = ir.node(node.op_type, inputs, name=node.name)
        copy_type(replacement.outputs[0], node.outputs[0])
        self.record_layer(node, weight_sqnr_db=round(quantized.sqnr_db, 3), scheme="fp8-weight-only",
                          weight_shape=list(weight.shape))
        return replacement

    def _fp8_fused_node(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: ir.Value | None,
                        names: NameScope) -> ir.Node:
        """``ai.qcompiler.MatMulFp8(A, W^T_e4m3 [N, K] as uint8, scale [N], bias)``: the same codes and scales as
        :meth:`_fp8_node`, dequantized inside the op."""
        k, n = weight.shape
        quantized = quantize_weight_fp8(weight, 1)
        values = register_constants(graph, names, node.inputs[1].name or node.name or "weight",
                                    [("fp8", np.ascontiguousarray(quantized.q.view(np.uint8).T)),
                                     ("scale", quantized.scale.astype(np.float32))])
        inputs = [node.inputs[0], *values, bias if bias is not None else empty_constant(graph, names, np.float32)]
        replacement = ir.node("MatMulFp8", inputs, attributes={"K": k, "N": n}, domain=custom_ops.DOMAIN,
                              name=node.name)
        copy_type(replacement.outputs[0], node.outputs[0])
        self.record_layer(node, weight_sqnr_db=round(quantized.sqnr_db, 3), scheme="fp8-weight-only",
                          kernel="fused", weight_shape=list(weight.shape))
        return replacement

    def _nf4_node(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, names: NameScope) -> ir.Node:
        """MatMulBnb4 (quant_type 1, NF4) over ``W[K, N]``; the weight is not shared (each reader quantizes it)."""
        k, n = weight.shape
        block = resolve_block_size(self.block_size, k)
        codes, absmax = quantize_nf4(weight, block)
        values = register_constants(graph, names, node.inputs[1].name or node.name or "weight",
                                    [("nf4", packing.pack_bnb4(codes)), ("absmax", absmax)])
        replacement = ir.node("MatMulBnb4", [node.inputs[0], *values], domain=_CONTRIB, name=node.name,
                              attributes={"K": k, "N": n, "block_size": block, "quant_type": 1})
        copy_type(replacement.outputs[0], node.outputs[0])
        dequantized = packing.dequantize_bnb4(values[0].const_value.numpy(), absmax, k=k, n=n, block_size=block)
        self.record_layer(node, weight_sqnr_db=round(weight_sqnr_db(weight, dequantized), 3), scheme="nf4-weight-only",
                          block_size=block, weight_shape=list(weight.shape))
        return replacement
