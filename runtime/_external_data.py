"""Find and check every external-data reference of an ONNX model, from its bytes, with the standard library only.

One mechanism serves the compiler (:mod:`qcompiler.io`) and the runtime (:class:`qcompiler.runtime.Session`):
:func:`find_external_refs` walks the protobuf wire format of a serialized ``ModelProto`` and returns every
``TensorProto`` that names external data, wherever it sits: graph and subgraph initializers, sparse initializers,
node attributes (``t``, ``tensors``, ``sparse_tensor(s)``, the bodies of ``If``/``Loop``/``Scan``), model-local
functions' nodes *and their attribute defaults* (``FunctionProto.attribute_proto``) and training info.
:func:`check_external_refs` then opens each referenced file once with :func:`~._safe_files.open_beneath` (no
symlink, no ``..``, no absolute path, no FIFO or device, one hard link) and checks every reference's fields
against what was opened (keys, offset, length, bounds). What a reader later maps must be the file that was checked:
:meth:`CheckedFiles.open` reopens a location the same safe way and refuses it unless it is the same inode.

The walk mirrors how protobuf parses: a field whose wire type does not match the schema is an unknown field and is
skipped; a *singular* message field that occurs twice (protobuf would merge the two) is refused, so that what is
checked here is what any parser builds. Limits: nesting deeper than :data:`MAX_DEPTH` messages is refused.

Reference fields (field numbers of onnx.proto3): ModelProto graph=7, training_info=20, functions=25; GraphProto
node=1, initializer=5, sparse_initializer=15; NodeProto attribute=5; AttributeProto t=5, g=6, tensors=10,
graphs=11, sparse_tensor=22, sparse_tensors=23; FunctionProto node=7, attribute_proto=11; SparseTensorProto
values=1, indices=2; TrainingInfoProto initialization=1, algorithm=2; TensorProto dims=1, data_type=2, name=8,
external_data=13 (key=1, value=2), data_location=14.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator

from qcompiler.runtime._onnx_scan import _fields, _text, _varint
from qcompiler.runtime._safe_files import FileIdentity, SafeOpenError, location_problem, open_beneath

__all__ = ["MAX_DEPTH", "VALID_KEYS", "ExternalDataError", "ExternalRef", "CheckedFiles", "check_external_refs",
           "find_external_refs", "inline_external", "read_ref", "tensor_nbytes"]

#: The keys of ``TensorProto.external_data`` that the ONNX spec defines (``basepath`` is refused on purpose).
VALID_KEYS = frozenset({"location", "offset", "length", "checksum"})
#: How many messages deep the walk goes (graphs in attributes in nodes in graphs ...) before refusing the model.
MAX_DEPTH = 100
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Bits per element of each TensorProto.DataType (None: no fixed size: UNDEFINED, STRING, unknown).
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
         16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2, 27: 6, 28: 6}
_DIGITS = re.compile(r"[0-9]+")
_LOCATION_KEY = b"location"  # a key of StringStringEntryProto is stored verbatim: no reference without these bytes


class ExternalDataError(ValueError):
    """An external-data reference is malformed or unsafe; ``str(exc)`` is one line for a user."""


@dataclasses.dataclass(frozen=True)
class ExternalRef:
    """One tensor that names external data.

    Attributes:
        name: the tensor's name.
        where: where it sits, in words (e.g. ``"function 'f' attribute default 'w'"``).
        entries: its ``external_data`` (key, value) pairs, in order.
        data_location: its ``data_location`` (1 = EXTERNAL).
        data_type: its ``TensorProto.DataType``.
        dims: its dimensions.
        span: (start, end) of the tensor's message in the model's bytes.
        nested: False for a main-graph initializer or a tensor attribute of a main-graph node (what ONNX Runtime
            takes from in-memory files), True anywhere else (subgraphs, functions, sparse tensors, training info).
    """

    name: str
    where: str
    entries: tuple[tuple[str, str], ...]
    data_location: int
    data_type: int
    dims: tuple[int, ...]
    span: tuple[int, int] = (0, 0)
    nested: bool = True

    def field(self, key: str) -> str | None:
        return next((v for k, v in self.entries if k == key), None)

    @property
    def location(self) -> str:
        return self.field("location") or ""


def tensor_nbytes(data_type: int, dims: tuple[int, ...]) -> int | None:
    """Bytes that a tensor of this type and shape occupies, or None when the type has no fixed size."""
    bits = _BITS.get(data_type)
    if bits is None or any(d < 0 for d in dims):
        return None
    count = 1
    for d in dims:
        count *= d
    return (count * bits + 7) // 8


# ---------------------------------------------------------------------------------------------------------------
# The wire walk
# ---------------------------------------------------------------------------------------------------------------
def _messages(buf: memoryview, start: int, end: int, wanted: dict[int, bool]) -> Iterator[tuple[int, int, int]]:
    """(field, start, end) of each length-delimited field in ``wanted`` (field -> repeated?); a singular one twice
    is refused (protobuf would merge the two occurrences)."""
    seen: set[int] = set()
    for field, wire, a, b in _fields(buf, start, end):
        if wire != 2 or field not in wanted:
            continue
        if not wanted[field]:
            if field in seen:
                raise ExternalDataError(f"is malformed: field {field} of one message occurs twice")
            seen.add(field)
        yield field, a, b


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


class _Walker:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.found: list[ExternalRef] = []

    def _deeper(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise ExternalDataError(f"nests messages more than {MAX_DEPTH} deep (graphs in attributes in nodes ...)")
        return depth + 1

    def model(self) -> None:
        buf = self.buf
        for field, a, b in _messages(buf, 0, len(buf), {7: False, 20: True, 25: True}):
            if field == 7:
                self.graph(a, b, "graph", 1, main=True)
            elif field == 25:
                self.function(a, b, 1)
            else:
                for sub, c, d in _messages(buf, a, b, {1: False, 2: False}):
                    self.graph(c, d, "training info " + ("initialization" if sub == 1 else "algorithm"), 2)

    def graph(self, start: int, end: int, where: str, depth: int, main: bool = False) -> None:
        depth = self._deeper(depth)
        for field, a, b in _messages(self.buf, start, end, {1: True, 5: True, 15: True}):
            if field == 1:
                self.node(a, b, where, depth, main)
            elif field == 5:
                self.tensor(a, b, f"{where} initializer", depth, nested=not main)
            else:
                self.sparse(a, b, f"{where} sparse initializer", depth)

    def _strings(self, start: int, end: int, *wanted: int) -> list[str]:
        """The last value of each string field in ``wanted`` of one message ("" when absent)."""
        found = dict.fromkeys(wanted, "")
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire == 2 and field in found:
                found[field] = _text(self.buf, a, b)
        return list(found.values())

    def function(self, start: int, end: int, depth: int) -> None:
        depth = self._deeper(depth)
        where = f"function {self._strings(start, end, 1)[0]!r}"
        for field, a, b in _messages(self.buf, start, end, {7: True, 11: True}):
            if field == 7:
                self.node(a, b, where, depth)
            else:
                self.attribute(a, b, f"{where} attribute default", depth)

    def node(self, start: int, end: int, where: str, depth: int, main: bool = False) -> None:
        depth = self._deeper(depth)
        label = None
        for _, a, b in _messages(self.buf, start, end, {5: True}):
            if label is None:
                name, op_type = self._strings(start, end, 3, 4)
                label = f"{where} node {name or op_type!r}"
            self.attribute(a, b, f"{label} attribute", depth, main)

    def attribute(self, start: int, end: int, where: str, depth: int, main: bool = False) -> None:
        depth = self._deeper(depth)
        where = f"{where} {self._strings(start, end, 1)[0]!r}"
        wanted = {5: False, 6: False, 10: True, 11: True, 22: False, 23: True}
        for field, a, b in _messages(self.buf, start, end, wanted):
            if field in (5, 10):
                self.tensor(a, b, where, depth, nested=not main)
            elif field in (6, 11):
                self.graph(a, b, f"{where} subgraph", depth)
            else:
                self.sparse(a, b, where, depth)

    def sparse(self, start: int, end: int, where: str, depth: int) -> None:
        depth = self._deeper(depth)
        for field, a, b in _messages(self.buf, start, end, {1: False, 2: False}):
            self.tensor(a, b, f"{where} ({'values' if field == 1 else 'indices'})", depth)

    def tensor(self, start: int, end: int, where: str, depth: int, nested: bool = True) -> None:
        self._deeper(depth)
        buf = self.buf
        name = ""
        data_type = data_location = 0
        dims: list[int] = []
        entries: list[tuple[str, str]] = []
        for field, wire, a, b in _fields(buf, start, end):
            if field == 13 and wire == 2:
                key = value = ""
                for f, w, c, d in _fields(buf, a, b):
                    if w == 2 and f == 1:
                        key = _text(buf, c, d)
                    elif w == 2 and f == 2:
                        value = _text(buf, c, d)
                entries.append((key, value))
            elif field == 14 and wire == 0:
                data_location = a
            elif field == 2 and wire == 0:
                data_type = a
            elif field == 8 and wire == 2:
                name = _text(buf, a, b)
            elif field == 1 and wire == 0:
                dims.append(_signed64(a))
            elif field == 1 and wire == 2:  # packed dims
                pos = a
                while pos < b:
                    value, pos = _varint(buf, pos, b)
                    dims.append(_signed64(value))
        if entries or data_location == EXTERNAL:
            self.found.append(ExternalRef(name, where, tuple(entries), data_location, data_type, tuple(dims),
                                          (start, end), nested))


def find_external_refs(blob: bytes | bytearray | memoryview) -> list[ExternalRef]:
    """Every tensor of the serialized model ``blob`` that names external data, in file order.

    Raises:
        ExternalDataError: the model nests too deep or repeats a singular message field.
        ValueError: ``blob`` is not well-formed protobuf.
    """
    buf = memoryview(blob)
    try:
        walker = _Walker(buf)
        walker.model()
        return walker.found
    finally:
        buf.release()


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _spans(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire type, field start, payload start, field end) of each field in ``buf[start:end]``."""
    pos = start
    for field, wire, a, b in _fields(buf, start, end):
        field_start = pos
        if wire == 2:
            yield field, wire, field_start, a, b
            pos = b
        else:
            pos = _skip_to(buf, pos, end, wire)
            yield field, wire, field_start, pos, pos


def _skip_to(buf: memoryview, pos: int, end: int, wire: int) -> int:
    _, pos = _varint(buf, pos, end)  # the tag
    if wire == 0:
        _, pos = _varint(buf, pos, end)
        return pos
    return pos + (8 if wire == 1 else 4)


def _splice(buf: memoryview, start: int, end: int, new: dict[tuple[int, int], bytes]) -> bytes:
    """The message ``buf[start:end]`` with each sub-message payload span in ``new`` replaced (lengths re-encoded
    on the way up)."""
    out = bytearray()
    for _field, wire, field_start, a, b in _spans(buf, start, end):
        inner = [span for span in new if a <= span[0] and span[1] <= b] if wire == 2 else []
        if not inner:
            out += buf[field_start:b]
            continue
        tag_end = field_start
        _, tag_end = _varint(buf, tag_end, end)
        payload = new[(a, b)] if (a, b) in new else _splice(buf, a, b, {s: new[s] for s in inner})
        out += buf[field_start:tag_end]
        out += _encode_varint(len(payload))
        out += payload
    return bytes(out)


def _inline_tensor(buf: memoryview, start: int, end: int, data: bytes) -> bytes:
    """The tensor message with its external-data fields replaced by ``raw_data``."""
    out = bytearray()
    for field, _wire, field_start, _a, b in _spans(buf, start, end):
        if field not in (9, 13, 14):  # raw_data, external_data, data_location
            out += buf[field_start:b]
    out += b"\x4a" + _encode_varint(len(data)) + data  # field 9, wire type 2
    return bytes(out)


def inline_external(blob: bytes, refs: list[ExternalRef], read: Callable[[ExternalRef], bytes]) -> bytes:
    """``blob`` with the data of ``refs`` read in (``read(ref)`` gives each tensor's bytes) as ``raw_data``."""
    if not refs:
        return blob
    buf = memoryview(blob)
    try:
        new = {ref.span: _inline_tensor(buf, *ref.span, read(ref)) for ref in refs}
        return _splice(buf, 0, len(buf), new)
    finally:
        buf.release()


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckedFiles:
    """The external-data files of one model, as checked: location -> identity (device, inode, size)."""

    folder: str
    identities: dict[str, FileIdentity] = dataclasses.field(default_factory=dict)

    def open(self, location: str) -> int:
        """Reopen a checked location safely; return a read-only fd of the very file that was checked.

        Raises:
            ExternalDataError: the location was never checked, or is no longer that file (swapped, grown, linked).
        """
        expected = self.identities.get(location)
        if expected is None:
            raise ExternalDataError(f"external data file {location!r} was not among the checked ones")
        try:
            fd, st = open_beneath(self.folder, location, what=f"external data file {location!r}")
        except SafeOpenError as exc:
            raise ExternalDataError(str(exc)) from None
        if FileIdentity(st) != expected:
            os.close(fd)
            raise ExternalDataError(f"external data file {location!r} changed after it was checked")
        return fd


def read_ref(files: CheckedFiles, ref: ExternalRef) -> bytes:
    """The bytes of one checked reference, read through :meth:`CheckedFiles.open`."""
    offset = int(ref.field("offset") or 0)
    length = ref.field("length")
    size = int(length) if length else (tensor_nbytes(ref.data_type, ref.dims) or 0)
    fd = files.open(ref.location)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ExternalDataError(f"external data file {ref.location!r} ended early for tensor {ref.name!r}")
    return data


def _ref_problem(ref: ExternalRef, files: CheckedFiles) -> str | None:
    """Why this reference is refused, or None (opening and checking its file on first sight)."""
    if ref.data_location != EXTERNAL:
        return "has external_data entries but its data_location is not EXTERNAL"
    fields: dict[str, str] = {}
    for key, value in ref.entries:
        if key not in VALID_KEYS:
            return f"has an unknown external_data key {key!r} (valid: {', '.join(sorted(VALID_KEYS))})"
        if key in fields:
            return f"repeats the external_data key {key!r}"
        fields[key] = value
    if "location" not in fields:
        return "has external data without a location"
    numbers: dict[str, int] = {}
    for key in ("offset", "length"):
        if key in fields:
            text = fields[key]
            if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
                return f"has a negative {key} ({text})"
            if not _DIGITS.fullmatch(text):
                return f"has a {key} that is not a non-negative integer ({text!r})"
            numbers[key] = int(text)
    if any(d < 0 for d in ref.dims):
        return f"has a negative dimension {list(ref.dims)}"
    location = fields["location"]
    problem = location_problem(location)
    if problem:
        return problem
    if location not in files.identities:
        try:
            fd, st = open_beneath(files.folder, location, what=f"points at {location!r}, which")
        except SafeOpenError as exc:
            return str(exc)
        os.close(fd)
        files.identities[location] = FileIdentity(st)
    size = files.identities[location].size
    offset = numbers.get("offset", 0)
    expected = tensor_nbytes(ref.data_type, ref.dims)
    length = numbers.get("length")
    if length is not None and expected is not None and length != expected:
        return f"has length {length} but its type and shape need {expected} bytes"
    if offset > size:
        return f"has offset {offset} past the end of {location!r} ({size} bytes)"
    needed = length if length is not None else expected
    if needed is not None and offset + needed > size:
        return f"reads {needed} bytes at offset {offset}, past the end of {location!r} ({size} bytes)"
    return None


def check_external_refs(refs: list[ExternalRef], folder: str | os.PathLike[str]) -> CheckedFiles:
    """Check every reference against the files beneath ``folder`` (each opened once, safely).

    Raises:
        ExternalDataError: the first refused reference, as ``"external data of tensor 'w' (where) <why>"``.
    """
    files = CheckedFiles(os.fspath(folder))
    for ref in refs:
        problem = _ref_problem(ref, files)
        if problem:
            raise ExternalDataError(f"external data of tensor {ref.name!r} ({ref.where}) {problem}")
    return files
