"""Serialize an IR model to ONNX bytes without building the whole ``ModelProto`` first.

``ir.serde.serialize_model`` builds a protobuf message for every node and value, then ``SerializeToString`` copies
it into bytes: on a 1,000,000-node graph the message tree alone is about 1 GB, on top of the IR. Here the main
graph's nodes (with their ``value_info`` and quantization annotations) are serialized in chunks of
:data:`CHUNK_NODES` by onnx-ir's own serializer, each chunk as a ``GraphProto`` holding only those repeated fields,
turned into bytes at once and dropped. Repeated fields of a message may be split across occurrences on the wire
and concatenated bytes of the same message type parse as one message, so the graph is written as its header
(name, inputs, initializers, outputs, metadata: everything but the nodes) followed by the chunks, under one
``graph`` field whose length is known once the chunks are made. The result parses to the same ``ModelProto`` as
``serialize_model`` gives (same fields, same order within each repeated field; only the position of the ``graph``
field among the model's fields differs), and every singular field occurs once.

Importing this module also stops onnx-ir's serializer from allocating: it reads ``value.meta`` of every value it
writes to look for a quantization annotation, and reading ``meta`` creates an empty ``MetadataStore`` (~370 bytes)
on a value that had none: 370 MB that stay after one serialization of a 1,000,000-node graph. A value that never
had a store has no annotation, so it is skipped (:func:`_annotation_of_stored_meta_only`).

Limits: relies on onnx-ir's ``serialize_model_into``/``serialize_graph_into`` accepting a ``GraphView`` (true of
onnx-ir 1.x); subgraphs and functions are serialized whole (they are small next to a main graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

__all__ = ["CHUNK_NODES", "model_to_bytes"]

#: Main-graph nodes serialized per chunk.
CHUNK_NODES = 4096
_GRAPH_FIELD = 7  # ModelProto.graph


_MISSING = object()
_ANNOTATION_KEY = getattr(ir.serde, "_QUANT_PARAMETER_TENSOR_NAMES_FIELD", "quant_parameter_tensor_names")
_maybe_add_annotation = ir.serde._maybe_add_quantization_annotation


def _annotation_of_stored_meta_only(graph_proto: onnx.GraphProto, value: Any) -> None:
    """onnx-ir's ``_maybe_add_quantization_annotation``, skipping values without a metadata store."""
    if getattr(value, "_metadata", _MISSING) is None:
        return  # never had metadata, so no annotation: do not let ``value.meta`` create an empty store
    _maybe_add_annotation(graph_proto, value)


if getattr(_maybe_add_annotation, "__name__", "") == "_maybe_add_quantization_annotation":
    ir.serde._maybe_add_quantization_annotation = _annotation_of_stored_meta_only


class _WithGraph:
    """The model as serialize_model_into sees it, with another graph."""

    def __init__(self, model: ir.Model, graph: ir.GraphView) -> None:
        self._model = model
        self.graph = graph

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def model_to_bytes(model: ir.Model, *, edit: Callable[[onnx.ModelProto], None] | None = None,
                   weights_as_inputs: int | None = None) -> bytes:
    """The model's ONNX bytes (what ``serialize_model(model).SerializeToString(deterministic=True)`` parses to).

    Args:
        model: the model (not modified, except what onnx-ir's serializer itself sets, e.g. tensor names, and the
            type and shape of an initializer written as an input, taken from its tensor when missing).
        edit: called with the model's proto *without* the main graph's nodes and their value_info (its graph has
            the name, inputs, initializers, outputs and metadata) before it is turned into bytes.
        weights_as_inputs: when set, main-graph initializers of more bytes than this (or without a tensor) are
            written as typed graph inputs instead, without their data (for ONNX shape inference and the checker,
            which need names and types, not values).
    """
    graph = model.graph
    inputs, initializers = list(graph.inputs), list(graph.initializers.values())
    if weights_as_inputs is not None:
        declared = set(inputs)
        small = []
        for value in initializers:
            tensor = value.const_value
            if tensor is not None and tensor.nbytes <= weights_as_inputs:
                small.append(value)
                continue
            if tensor is not None and value.shape is None:
                value.shape = ir.Shape(tensor.shape)
            if tensor is not None and value.dtype is None:
                value.dtype = tensor.dtype
            if value not in declared:
                inputs.append(value)
        initializers = small
    header = _WithGraph(model, ir.GraphView(
        inputs, graph.outputs, nodes=(), initializers=initializers, doc_string=graph.doc_string,
        opset_imports=dict(graph.opset_imports), name=graph.name, metadata_props=dict(graph.metadata_props) or None))
    proto = onnx.ModelProto()
    ir.serde.serialize_model_into(proto, header)  # type: ignore[arg-type]
    if edit is not None:
        edit(proto)
    # the graph outputs' quantization annotations come last (after the nodes') in onnx-ir's order
    annotations = proto.graph.quantization_annotation
    outputs_annotated = sum(1 for v in graph.outputs if getattr(v, "_metadata", None) is not None
                            and v.meta.get(_ANNOTATION_KEY))
    tail = onnx.GraphProto()
    if outputs_annotated:
        tail.quantization_annotation.extend(annotations[len(annotations) - outputs_annotated:])
        del annotations[len(annotations) - outputs_annotated:]
    parts = [proto.graph.SerializeToString(deterministic=True)]
    proto.ClearField("graph")
    head = proto.SerializeToString(deterministic=True)
    del proto
    nodes = list(graph)
    for start in range(0, len(nodes), CHUNK_NODES):
        chunk = onnx.GraphProto()
        ir.serde.serialize_graph_into(chunk, ir.GraphView((), (), nodes=nodes[start:start + CHUNK_NODES]),
                                      model_ir_version=model.ir_version)
        parts.append(chunk.SerializeToString(deterministic=True))
    del nodes
    parts.append(tail.SerializeToString(deterministic=True))
    length = sum(len(p) for p in parts)
    return b"".join([head, _varint(_GRAPH_FIELD << 3 | 2), _varint(length), *parts])
