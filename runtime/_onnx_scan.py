"""Read, without onnx, what the runtime checks in an ONNX file: its opset imports, its metadata and its nodes of
one domain.

The protobuf wire format is walked by hand over a memory map of the file: the top level of ``ModelProto``
(``opset_import`` = 8, ``metadata_props`` = 14; ``graph`` = 7 and ``functions`` = 25 only when nodes are asked
for), then ``GraphProto.node`` (1) and ``FunctionProto.node`` (7), and inside each ``NodeProto`` its ``op_type``
(4), ``domain`` (7), ``name`` (3), inputs (1) and attributes (5) for subgraphs (``AttributeProto.g`` = 6,
``graphs`` = 11). Everything else, the initializers above all, is skipped by its length: nothing is copied, so
the cost does not grow with the weights, and a model with external data is read the same way. A file that is not
well-formed protobuf raises :class:`ValueError`.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Iterator

__all__ = ["ModelScan", "scan_blob", "scan_model"]


@dataclasses.dataclass(frozen=True)
class ModelScan:
    """What :func:`scan_model` found.

    Attributes:
        opsets: domain -> version of the model's ``opset_import`` (the default domain is ``""``).
        metadata: the model's ``metadata_props``.
        nodes: (node name, op type, input names) of every node in the asked domain, subgraphs and model-local
            functions included.
    """

    opsets: dict[str, int]
    metadata: dict[str, str]
    nodes: list[tuple[str, str, tuple[str, ...]]]


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a length-delimited field runs past its message")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError("a fixed-width field runs past its message")
            yield field, wire, pos, pos
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past its message")


def _text(buf: memoryview, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", errors="replace")


def _pair(buf: memoryview, start: int, end: int, first: int, second: int) -> tuple[str, int | str]:
    """(string field ``first``, varint or string field ``second``) of a small message."""
    key, value = "", None
    for field, wire, a, b in _fields(buf, start, end):
        if field == first and wire == 2:
            key = _text(buf, a, b)
        elif field == second:
            value = a if wire == 0 else _text(buf, a, b)
    return key, value


def _graph_nodes(buf: memoryview, start: int, end: int, node_field: int, domain: str,
                 found: list[tuple[str, str, tuple[str, ...]]], depth: int = 0) -> None:
    if depth > 64:
        raise ValueError("subgraphs nested too deep")
    for field, wire, a, b in _fields(buf, start, end):
        if field != node_field or wire != 2:
            continue
        name = op_type = node_domain = ""
        inputs: list[str] = []
        for nf, nw, c, d in _fields(buf, a, b):
            if nw != 2:
                continue
            if nf == 1:
                inputs.append(_text(buf, c, d))
            elif nf == 3:
                name = _text(buf, c, d)
            elif nf == 4:
                op_type = _text(buf, c, d)
            elif nf == 7:
                node_domain = _text(buf, c, d)
            elif nf == 5:  # an attribute: its subgraphs
                for af, aw, e, f in _fields(buf, c, d):
                    if aw == 2 and af in (6, 11):
                        _graph_nodes(buf, e, f, 1, domain, found, depth + 1)
        if node_domain == domain:
            found.append((name, op_type, tuple(inputs)))


def scan_model(path: str | os.PathLike[str], node_domain: str | None = None) -> ModelScan:
    """Opset imports and metadata of the model file at ``path``, and its nodes of ``node_domain`` when that
    domain is imported (None: no nodes are read).

    Raises:
        ValueError: the file is empty or not well-formed protobuf.
    """
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                return _scan(buf, node_domain)
            finally:
                buf.release()


def scan_blob(blob: bytes, node_domain: str | None = None) -> ModelScan:
    """:func:`scan_model` over a model's bytes already in memory.

    Raises:
        ValueError: ``blob`` is empty or not well-formed protobuf.
    """
    if not blob:
        raise ValueError("empty file")
    buf = memoryview(blob)
    try:
        return _scan(buf, node_domain)
    finally:
        buf.release()


def _scan(buf: memoryview, node_domain: str | None) -> ModelScan:
    opsets: dict[str, int] = {}
    metadata: dict[str, str] = {}
    graphs: list[tuple[int, int, int]] = []
    for field, wire, a, b in _fields(buf, 0, len(buf)):
        if wire != 2:
            continue
        if field == 8:
            domain, version = _pair(buf, a, b, 1, 2)
            opsets["" if domain == "ai.onnx" else domain] = int(version or 0)
        elif field == 14:
            key, value = _pair(buf, a, b, 1, 2)
            metadata[key] = str(value or "")
        elif field == 7:
            graphs.append((a, b, 1))
        elif field == 25:
            graphs.append((a, b, 7))
    nodes: list[tuple[str, str, tuple[str, ...]]] = []
    if node_domain is not None and node_domain in opsets:
        for start, end, node_field in graphs:
            _graph_nodes(buf, start, end, node_field, node_domain, nodes)
    return ModelScan(opsets, metadata, nodes)
