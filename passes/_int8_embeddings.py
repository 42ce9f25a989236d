"""Embedding tables of the int8 recipes: which ``Gather`` nodes read a table that can be quantized, who else reads
it, and the int8 codes of a table (shared by ``annotate-int8``, which decides, and the int8 lowerings, which write
them, so that neither imports the other).

A candidate is ``Gather(E, ids)`` over axis 0 of a constant float32 ``E[rows, cols]`` (an initializer that is not a
graph input) with int32/int64 ``ids``. Every other reader of ``E`` decides what may be done with it:

- more ``Gather`` candidates: they share the codes;
- ``Transpose(E, perm=[1, 0])`` whose every reader is a ``MatMul`` taking it as its weight: a *tied* output
  projection (a language model's lm_head ``x @ E^T``). It is quantized with the table, from the same codes: int8
  per row of ``E``, which is per output column of the projection, the int8 layers' own per-channel scheme. The file
  then holds one int8 table; the projection reads ``Transpose(E_q)``, which ONNX Runtime folds when it loads;
- anything else (another op, a graph output, an excluded node): the table stays float, since an int8 copy next to
  the float one would make the model larger, and making the other reader use the int8 table would change what it
  computes.

Codes (:func:`table_codes`), for ``E`` finite (else :class:`~qcompiler.errors.InvalidModelError`):

- per row (``QuantSpec`` per channel, axis 0): :func:`qcompiler.formats.channelwise.quantize_weight`,
  ``s[r] = max(max_c |E[r, c]| / qmax, 1e-12)``, ``q = clip(rint(E / s[r]), -qmax, qmax)`` int8, so
  ``|E - s q| <= s / 2``; ``qmax`` is 127, or the lowering's weight range when a tied projection shares the codes
  (63 with ``reduce_range``);
- blockwise (``QuantSpec`` block, axis 1): the ``int8`` weight-only grid of :mod:`qcompiler.formats.blockwise`
  along each row, ``s = max|E_block| / 127.5``, uint8 codes around the zero point 128 (``-128 .. 127`` times ``s``),
  the layout of ``com.microsoft.GatherBlockQuantized``; the last block of a row whose length is not a multiple of
  the block size is padded (the padding takes no part in the scale).

The codes of a table are computed once per compilation: the lowering keeps them in a holder that annotation put in
the table's metadata, which the clones that ``select-precision`` lowers share with the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats.blockwise import BlockwiseWeight, quantize_rtn
from qcompiler.formats.channelwise import QuantizedWeight, quantize_weight
from qcompiler.metadata import TABLE_CODES_KEY
from qcompiler.passes._common import const_array
from qcompiler.passes._finite import require_finite
from qcompiler.qspec import QuantSpec

__all__ = ["DEFAULT_EMBEDDING_BLOCK", "MIN_TABLE_ELEMENTS", "CodesHolder", "TableReaders", "embedding_candidate", "embedding_spec",
           "new_codes_holder", "table_codes", "table_readers"]

#: ``annotate-int8``'s default ``embedding_block_size`` (0: per row)
DEFAULT_EMBEDDING_BLOCK = 0
#: ``annotate-int8``'s default ``embedding_min_elements``: a smaller table stays float (it saves under 192 KB, and a
#: table of few rows, such as BERT's two token-type rows, adds the same rounding error to every token: on MiniLM its
#: int8 per-row rows cost ten times the mean cosine error of the 30,522-row word table)
MIN_TABLE_ELEMENTS = 1 << 16
_INDEX_TYPES = (ir.DataType.INT32, ir.DataType.INT64)


def embedding_candidate(node: ir.Node) -> ir.Value | None:
    """The table ``E`` of a ``Gather(E, ids)`` candidate (see the module docstring), else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    table, ids = node.inputs
    if table is None or ids is None or table.is_graph_input() or not table.is_initializer():
        return None
    attr = node.attributes.get("axis")
    if attr is not None and attr.as_int() != 0:
        return None
    tensor = table.const_value
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None
    return table


def _index_type_ok(node: ir.Node) -> bool:
    ids = node.inputs[1]
    return ids is not None and (ids.dtype is None or ids.dtype in _INDEX_TYPES)


@dataclasses.dataclass
class TableReaders:
    """Every node that reads a table, sorted: the Gather candidates, the Transposes of a tied projection with the
    MatMuls that read them, and a description of the first other reader (None when there is none)."""

    gathers: list[ir.Node]
    transposes: list[ir.Node]
    heads: list[ir.Node]
    other: str | None


def _tied_heads(transpose: ir.Node) -> list[ir.Node] | None:
    """The MatMuls that read ``transpose``'s output as their weight, or None when it is not a tied projection."""
    perm = transpose.attributes.get("perm")
    if transpose.domain not in ("", "ai.onnx") or (perm is not None and tuple(perm.as_ints()) != (1, 0)):
        return None
    out = transpose.outputs[0]
    if out.is_graph_output() or not out.uses():
        return None
    heads = []
    for user, index in out.uses():
        if user.op_type != "MatMul" or user.domain not in ("", "ai.onnx") or index != 1:
            return None
        heads.append(user)
    return list(dict.fromkeys(heads))


def table_readers(table: ir.Value) -> TableReaders:
    """Sort the readers of ``table`` (see :class:`TableReaders`)."""
    gathers: list[ir.Node] = []
    transposes: list[ir.Node] = []
    heads: list[ir.Node] = []
    other = "a graph output" if table.is_graph_output() else None
    for user, index in table.uses():
        if index == 0 and embedding_candidate(user) is table:
            if not _index_type_ok(user):
                other = other or f"Gather node {user.name or '(unnamed)'!r} with indices that are not int32/int64"
            elif user not in gathers:
                gathers.append(user)
            continue
        found = _tied_heads(user) if user.op_type == "Transpose" and index == 0 else None
        if found is not None:
            if user not in transposes:
                transposes.append(user)
                heads.extend(h for h in found if h not in heads)
            continue
        if other is None:
            other = f"{user.op_type} node {user.name or '(unnamed)'!r}"
    return TableReaders(gathers, transposes, heads, other)


def embedding_spec(block_size: int) -> QuantSpec:
    """The table's spec: int8 per row (``block_size`` 0) or blocks of ``block_size`` along each row."""
    if block_size == 0:
        return QuantSpec(dtype="int8", granularity="per_channel", axis=0, symmetric=True)
    return QuantSpec(dtype="int8", granularity="block", axis=1, block_size=block_size, symmetric=True)


class CodesHolder:
    """The codes of one table, filled by the first lowering that needs them (keyed by spec and qmax)."""

    def __init__(self) -> None:
        self.codes: dict[tuple[QuantSpec, int], Any] = {}


def new_codes_holder(table: ir.Value) -> None:
    """Give ``table`` an empty holder for its codes (annotation; a clone of the model shares it)."""
    if not isinstance(table.meta.get(TABLE_CODES_KEY), CodesHolder):
        table.meta[TABLE_CODES_KEY] = CodesHolder()


def table_codes(table: ir.Value, spec: QuantSpec, qmax: int, node: ir.Node) -> QuantizedWeight | BlockwiseWeight:
    """The codes of ``table`` for ``spec`` (see the module docstring); ``node`` names the reader in an error.

    Per row: a :class:`~qcompiler.formats.channelwise.QuantizedWeight` (``q[rows, cols]`` int8, ``scale[rows]``).
    Blockwise: a :class:`~qcompiler.formats.blockwise.BlockwiseWeight` whose ``codes`` are ``[rows, cols]``."""
    holder = table.meta.get(TABLE_CODES_KEY)
    key = (spec, qmax)
    if isinstance(holder, CodesHolder) and key in holder.codes:
        return holder.codes[key]
    array = const_array(table)
    require_finite(array, table.name, node.name, what="embedding table")
    if spec.granularity == "block":
        codes: Any = quantize_rtn(np.ascontiguousarray(array.T), 8, int(spec.block_size), True)
    else:
        codes = quantize_weight(array, 0, qmax=qmax)
    if isinstance(holder, CodesHolder):
        holder.codes[key] = codes
    return codes
