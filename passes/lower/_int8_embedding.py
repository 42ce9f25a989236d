"""Lower the int8 embedding tables that ``annotate-int8`` chose (Gathers with role ``"embedding"``, tied output
projections with role ``"tied-head"``); called by ``lower-int8-qdq`` and ``lower-int8-dynamic``, each for its
scheme, so that ``select-precision`` measures a table exactly as it will run.

Forms, for ``Y = Gather(E, ids)`` (codes from :func:`qcompiler.passes._int8_embeddings.table_codes`):

- per row (standard ONNX, any opset, any runtime)::

      Y = Mul(Cast<float>(Gather(E_q, ids)), Gather(s[rows, 1], ids))    # E_q int8 [rows, cols]

  Both Gathers take ``ids`` as the float one did, so negative indices wrap and an out-of-range index is the same
  error;
- blockwise (``com.microsoft.GatherBlockQuantized``, uint8 codes, zero point 128)::

      Y = GatherBlockQuantized(E_q, Gather(Range(0, rows, 1), ids), s[rows, blocks]; block_size, bits=8)

  The ``Gather`` of a ``Range`` (which ONNX Runtime folds at load) passes each index through with negative ones
  wrapped, and refuses an out-of-range one as the float Gather did: ``GatherBlockQuantized`` itself returns zeros
  for it (ORT 1.32).

A tied projection ``Y = MatMul(x, Transpose(E))`` reads ``Transpose(E_q)`` (folded at load by ONNX Runtime, so the
file keeps one int8 table) with the per-row scales as its per-column weight scales, in its scheme's form (the
calling pass writes it). The codes then use the lowering's weight range (``qmax`` 63 or 127).

A table is lowered only when every reader is still annotated for this scheme (``select-precision`` may have left a
Gather or its projection in float: the whole table then stays float, counted) and, for a tied projection, when the
calling pass can lower it (a calibrated input range, the opset). The float table is dropped once nothing reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats import EmitContext
from qcompiler.formats.base import copy_output_type
from qcompiler.formats.channelwise import sqnr_from_energies
from qcompiler.formats.integer import int_format
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import const_array
from qcompiler.passes._int8_embeddings import TableReaders, table_codes, table_readers
from qcompiler.passes.annotate import is_embedding, is_tied_head, node_scheme
from qcompiler.passes.lower._weights import Namer, add_constant, drop_if_unused
from qcompiler.qspec import get_qspec

__all__ = ["HeadWriter", "annotated_tables", "lower_embeddings", "plan_tables"]

_CONTRIB = "com.microsoft"
_EMBEDDING_QMAX = 127

#: writes a tied projection: (head, Transpose(E_q) [cols, rows] int8, per-row scales [rows], codes) -> None
HeadWriter = Callable[[ir.Node, ir.Value, ir.Value, Any], None]


def annotated_tables(graph: ir.Graph, scheme: str) -> list[ir.Value]:
    """The tables read by a Gather annotated as an embedding of ``scheme``, in graph order."""
    return list(dict.fromkeys(node.inputs[0] for node in graph
                              if is_embedding(node) and node_scheme(node) == scheme and node.inputs[0] is not None))


def _problem(table: ir.Value, readers: TableReaders, scheme: str, head_problem: Callable[[ir.Node], str | None]) -> str | None:
    if get_qspec(table) is None or const_array(table) is None:
        return "the table lost its constant value or spec (after annotation)"
    if readers.other is not None:
        return f"the table is also read by {readers.other} (after annotation): left float"
    for node in readers.gathers:
        if not is_embedding(node) or node_scheme(node) != scheme:
            return f"another Gather of the table ({node.name!r}) stays float: the table stays float"
    for head in readers.heads:
        if not is_tied_head(head) or node_scheme(head) != scheme:
            return f"its tied projection {head.name!r} stays float: the table stays float"
        reason = head_problem(head)
        if reason is not None:
            return f"its tied projection {head.name!r} cannot be lowered ({reason}): the table stays float"
    return None


def plan_tables(graph: ir.Graph, scheme: str,
                head_problem: Callable[[ir.Node], str | None]) -> list[tuple[ir.Value, TableReaders, str | None]]:
    """Each annotated table of ``scheme`` with its readers and why it stays float (None: it is lowered);
    ``head_problem`` says why the calling pass cannot lower a tied projection."""
    plan = []
    for table in annotated_tables(graph, scheme):
        readers = table_readers(table)
        plan.append((table, readers, _problem(table, readers, scheme, head_problem)))
    return plan


def lower_embeddings(owner: QPass, model: ir.Model, namer: Namer,
                     plan: list[tuple[ir.Value, TableReaders, str | None]], qmax: int, write_head: HeadWriter) -> int:
    """Lower the tables of ``plan`` (:func:`plan_tables`; see the module docstring); return how many were lowered.

    ``owner`` is the calling pass (its counters and per-layer records), ``qmax`` its weight range (for tables with
    a tied projection) and ``write_head`` writes a tied projection in its form.
    """
    graph = model.graph
    lowered = 0
    for table, readers, reason in plan:
        if reason is not None:
            for node in readers.gathers + readers.heads:
                if is_embedding(node) or is_tied_head(node):
                    owner.skip(node, reason)
            continue
        spec = get_qspec(table)
        if spec.granularity == "block":
            _lower_blockwise(owner, graph, namer, table, readers.gathers, spec)
            model.opset_imports.setdefault(_CONTRIB, 1)
        else:
            _lower_per_row(owner, graph, namer, table, readers, spec, qmax if readers.heads else _EMBEDDING_QMAX,
                           write_head)
        if drop_if_unused(graph, table):
            owner.count("float_weights_removed")
        lowered += 1
    return lowered


def _record(owner: QPass, node: ir.Node, table: ir.Value, sqnr: float, **figures: Any) -> None:
    owner.record_layer(node, weight_sqnr_db=round(sqnr, 3), scheme="int8-embedding",
                       weight_shape=list(table.const_value.shape), **figures)


def _lower_per_row(owner: QPass, graph: ir.Graph, namer: Namer, table: ir.Value, readers: Any, spec: Any, qmax: int,
                   write_head: HeadWriter) -> None:
    first = readers.gathers[0] if readers.gathers else readers.heads[0]
    codes = table_codes(table, spec, qmax, first)
    base = table.name or "embedding"
    quantized = add_constant(graph, namer(f"{base}_quantized"), codes.q)
    if readers.gathers:
        row_scales = add_constant(graph, namer(f"{base}_row_scale"), codes.scale.reshape(-1, 1))
    for node in readers.gathers:
        ids = node.inputs[1]
        stem = node.name or base
        take = ir.node("Gather", [quantized, ids], attributes={"axis": 0}, name=namer(f"{stem}_codes"))
        take.outputs[0].name = namer(f"{base}_codes_gathered")
        take.outputs[0].dtype = ir.DataType.INT8
        scale = ir.node("Gather", [row_scales, ids], attributes={"axis": 0}, name=namer(f"{stem}_scales"))
        scale.outputs[0].name = namer(f"{base}_scales_gathered")
        scale.outputs[0].dtype = ir.DataType.FLOAT
        cast = ir.node("Cast", [take.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=namer(f"{stem}_cast"))
        cast.outputs[0].name = namer(f"{base}_codes_float")
        cast.outputs[0].dtype = ir.DataType.FLOAT
        mul = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=node.name)
        copy_output_type(mul.outputs[0], node.outputs[0])
        ir.convenience.replace_nodes_and_values(graph, node, [node], [take, scale, cast, mul], [node.outputs[0]],
                                               mul.outputs)
        _record(owner, node, table, codes.sqnr_db, per_row=True, qmax=qmax)
        owner.count("lowered_embedding_Gather")
    if readers.heads:
        col_scales = add_constant(graph, namer(f"{base}_scale"), codes.scale)
        for transpose in readers.transposes:
            flip = ir.node("Transpose", [quantized], attributes={"perm": [1, 0]}, name=namer(f"{base}_transpose"))
            flip.outputs[0].name = namer(f"{base}_quantized_transposed")
            flip.outputs[0].dtype = ir.DataType.INT8
            graph.insert_before(transpose, flip)
            for head in [user for user, _ in transpose.outputs[0].uses()]:
                write_head(head, flip.outputs[0], col_scales, codes)
                owner.record_layer(head, tied_table=table.name)  # the calling pass recorded its scheme
                owner.count("lowered_tied_head")
            if not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)


def _lower_blockwise(owner: QPass, graph: ir.Graph, namer: Namer, table: ir.Value, gathers: list[ir.Node],
                     spec: Any) -> None:
    array = const_array(table)
    codes = table_codes(table, spec, _EMBEDDING_QMAX, gathers[0])
    fmt = int_format(8)
    wspec = fmt.spec(block_size=int(spec.block_size), symmetric=True)
    ctx = EmitContext(graph, namer)
    rows = int(array.shape[0])
    bounds = [add_constant(graph, namer(f"{table.name}_{what}"), np.array(v, np.int64))
              for what, v in (("row_first", 0), ("rows", rows), ("row_step", 1))]
    sqnr = sqnr_from_energies(*codes.error_energies(array.T))
    shared: ir.Node | None = None
    for node in gathers:
        stem = node.name or table.name or "embedding"
        span = ir.node("Range", bounds, name=namer(f"{stem}_rows"))
        span.outputs[0].name = namer(f"{table.name}_row_index")
        span.outputs[0].dtype = ir.DataType.INT64
        check = ir.node("Gather", [span.outputs[0], node.inputs[1]], attributes={"axis": 0},
                        name=namer(f"{stem}_checked_ids"))
        check.outputs[0].name = namer(f"{table.name}_checked_ids")
        check.outputs[0].dtype = ir.DataType.INT64
        graph.insert_before(node, [span, check])
        if shared is None:  # the first Gather writes the codes and scales; the others read the same ones
            replacement, _ = fmt.gather(ctx, node, array, check.outputs[0], table.name or "embedding", wspec,
                                        quantized=codes)
            shared = replacement
        else:
            replacement = ir.node("GatherBlockQuantized", [shared.inputs[0], check.outputs[0], *shared.inputs[2:]],
                                  attributes={name: attr.value for name, attr in shared.attributes.items()},
                                  domain=_CONTRIB,
                                  name=node.name)
            copy_output_type(replacement.outputs[0], node.outputs[0])
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [node.outputs[0]],
                                               replacement.outputs)
        _record(owner, node, table, sqnr, block_size=int(spec.block_size))
        owner.count("lowered_embedding_GatherBlockQuantized")
