"""Reading and writing model files: the one place in qcompiler that touches the file system for models.

Loading parses the ``.onnx`` protobuf once, validates every external-data reference in it (main graph, subgraphs,
sparse tensors, tensor attributes, functions, training info) *before* any tensor data is read, and hands the proto
to onnx-ir's deserializer. External tensors stay lazy: they are memory-mapped only when a pass reads them, so
loading a multi-GB model costs only the size of its graph.

An external-data reference is refused (:class:`~qcompiler.errors.UnsafeModelError`) when its location is empty,
absolute, contains ``..`` or a NUL, goes through a symlinked file or folder, resolves outside the model's folder,
names a missing file, something that is not a regular file, or a file with more than one hard link; and when its
fields are malformed: a key other than ``location``/``offset``/``length``/``checksum`` (the ONNX spec's keys;
``basepath`` is refused on purpose), a repeated key, an offset or length that is not a non-negative decimal
integer, a length that differs from the tensor's size, or data that runs past the end of the file.

Saving writes to temporary files in the target folder, fsyncs them and renames them into place (the model last),
so an interrupted save (any exception, ``KeyboardInterrupt`` included) leaves no partial output and no temporary
file, and an existing output stays untouched. When the tensors would make the protobuf exceed
:data:`EXTERNAL_DATA_THRESHOLD` bytes, initializers of at least :data:`EXTERNAL_MIN_TENSOR_BYTES` go to one
external-data file ``<output name>.data`` beside the model, streamed tensor by tensor (a kernel copy for
memory-mapped inputs). The output is deterministic: the same model saved twice gives byte-identical files.

Limits: only the binary protobuf format is read and written; a single ``.onnx`` file cannot exceed protobuf's 2 GiB;
tensors held in node attributes (``Constant``) are always written inline; the checks run before the data is mapped,
so a file swapped between the check and the read (a race with a local attacker) is not detected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.errors import InputError, UnsafeModelError, UnsupportedModelError, UsageError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_MIN_TENSOR_BYTES",
    "VALID_EXTERNAL_DATA_KEYS",
    "load_model",
    "read_proto",
    "check_output_path",
    "save_model",
    "model_bytes",
    "external_data_files",
    "to_proto",
    "ort_session",
    "check_model",
]

logger = logging.getLogger(__name__)

#: Save with external data when the tensors total more than this many bytes (protobuf's limit is 2 GiB; the
#: margin leaves room for the graph itself). Tests monkeypatch it small.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: An output whose input model kept its weights in external data is saved the same way once its tensors exceed this
#: many bytes: an inline save holds the serialized model in memory twice, which is what a large model cannot afford.
EXTERNAL_LIKE_INPUT_BYTES = 64 << 20
#: When saving with external data, initializers smaller than this stay inline in the ``.onnx`` file.
EXTERNAL_MIN_TENSOR_BYTES = 1024
#: The keys of ``TensorProto.external_data`` that the ONNX spec defines.
VALID_EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum"})

_PROTOBUF_LIMIT = 2**31 - 1
_LARGE_TENSOR_BYTES = 1 << 20  # tensors at least this big start at a 64 KiB boundary in the data file
_LARGE_ALIGNMENT = 1 << 16
_SMALL_ALIGNMENT = 64
_STRIPPED_LOCATION = "__qcompiler_stripped__"
_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ``.onnx`` file into a ``ModelProto`` without loading external data, with one-line errors.

    Raises:
        InputError: the file is missing, a folder, empty, too large, not ONNX or truncated.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a folder, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise InputError(f"{path}: is empty, not an ONNX model")
    if st.st_size > _PROTOBUF_LIMIT:
        raise InputError(f"{path}: is {st.st_size} bytes, more than a protobuf file can hold (2 GiB); "
                         "large models must keep their weights in external data")
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(blob)
    except Exception:  # google.protobuf.message.DecodeError and friends
        raise InputError(f"{path}: not an ONNX model (the protobuf cannot be parsed: corrupt or truncated)") from None
    del blob
    missing = [name for name, ok in (("ir_version", proto.ir_version > 0), ("graph", proto.HasField("graph")),
                                     ("opset_import", len(proto.opset_import) > 0)) if not ok]
    if missing:
        raise InputError(f"{path}: not a complete ONNX model (no {', '.join(missing)}; truncated or another format)")
    return proto


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into the IR, external tensors left lazy (memory-mapped on first use).

    Every external-data reference is validated before any tensor data is touched; the file is opened read-only.

    Raises:
        InputError: the file cannot be read as an ONNX model.
        UnsafeModelError: an external-data reference is unsafe or malformed.
    """
    path = Path(path)
    proto = read_proto(path)
    model_dir = path.parent.absolute()
    _validate_external_data(proto, path, model_dir)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the model ({type(exc).__name__}: {_one_line(exc)})") from None
    for tensor, _, _ in _tensor_slots(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(model_dir)
    logger.debug("loaded %s (%d nodes in the main graph)", path, len(model.graph))
    return model


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _iter_node_tensors(graph.node)


def _iter_node_tensors(nodes: Any) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _iter_graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_graph_tensors(sub)


def _iter_proto_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: graphs, subgraphs, sparse tensors, attributes, functions, training info."""
    yield from _iter_graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _iter_node_tensors(function.node)
    for info in proto.training_info:
        yield from _iter_graph_tensors(info.initialization)
        yield from _iter_graph_tensors(info.algorithm)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The byte size the tensor's dims and type imply, or None when it has no fixed size (strings, unknown)."""
    try:
        dtype = ir.DataType(tensor.data_type)
        if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
            return None
        count = 1
        for dim in tensor.dims:
            count *= dim
        return (count * dtype.bitwidth + 7) // 8
    except Exception:
        return None


def _check_location(location: str) -> str | None:
    """Why a location string is unacceptable on its own, or None."""
    if not location:
        return "has an empty location"
    if "\x00" in location:
        return "has a location with a NUL character"
    if location.startswith(("/", "\\")) or os.path.isabs(location) or re.match(r"^[A-Za-z]:", location):
        return f"has an absolute location '{location}'"
    if ".." in re.split(r"[/\\]", location):
        return f"has a location '{location}' that leaves the model's folder ('..')"
    return None


def _check_data_file(model_dir: Path, location: str) -> tuple[str | None, int]:
    """Walk the location component by component under ``model_dir``; return (problem, file size)."""
    parts = [p for p in re.split(r"[/\\]", location) if p not in ("", ".")]
    if not parts:
        return f"has a location '{location}' that is not a file", 0
    current = model_dir
    st = None
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return f"points at '{location}', which does not exist", 0
        except OSError as exc:
            return f"points at '{location}', which cannot be read ({exc.strerror})", 0
        if stat.S_ISLNK(st.st_mode):
            kind = "file" if i == len(parts) - 1 else "folder"
            return f"points at '{location}', which goes through a symlinked {kind} ('{part}')", 0
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return f"points at '{location}', whose '{part}' is not a folder", 0
    assert st is not None
    if not stat.S_ISREG(st.st_mode):
        return f"points at '{location}', which is not a regular file", 0
    if st.st_nlink > 1:
        return f"points at '{location}', which is a hard-linked file ({st.st_nlink} links)", 0
    real_dir = os.path.realpath(model_dir)
    real = os.path.realpath(current)
    if os.path.commonpath([real_dir, real]) != real_dir:
        return f"points at '{location}', which resolves outside the model's folder", 0
    return None, st.st_size


def _check_tensor_external_data(tensor: onnx.TensorProto, model_dir: Path,
                                file_cache: dict[str, tuple[str | None, int]]) -> str | None:
    """Why this tensor's external-data reference is refused, or None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return "has external_data entries but its data_location is not EXTERNAL"
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in VALID_EXTERNAL_DATA_KEYS:
            return f"has an unknown external_data key '{entry.key}' (valid: {', '.join(sorted(VALID_EXTERNAL_DATA_KEYS))})"
        if entry.key in fields:
            return f"repeats the external_data key '{entry.key}'"
        fields[entry.key] = entry.value
    if "location" not in fields:
        return "has external data without a location"
    numbers: dict[str, int] = {}
    for key in ("offset", "length"):
        if key in fields:
            text = fields[key]
            if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
                return f"has a negative {key} ({text})"
            if not _DIGITS.fullmatch(text):
                return f"has a {key} that is not a non-negative integer ('{text}')"
            numbers[key] = int(text)
    location = fields["location"]
    problem = _check_location(location)
    if problem:
        return problem
    if location not in file_cache:
        file_cache[location] = _check_data_file(model_dir, location)
    problem, size = file_cache[location]
    if problem:
        return problem
    offset = numbers.get("offset", 0)
    expected = _expected_nbytes(tensor)
    length = numbers.get("length")
    if length is not None and expected is not None and length != expected:
        return f"has length {length} but its type and shape need {expected} bytes"
    if offset > size:
        return f"has offset {offset} past the end of '{location}' ({size} bytes)"
    needed = length if length is not None else expected
    if needed is not None and offset + needed > size:
        return f"reads {needed} bytes at offset {offset}, past the end of '{location}' ({size} bytes)"
    return None


def _validate_external_data(proto: onnx.ModelProto, path: Path, model_dir: Path) -> None:
    file_cache: dict[str, tuple[str | None, int]] = {}
    for tensor in _iter_proto_tensors(proto):
        if _is_external(tensor):
            problem = _check_tensor_external_data(tensor, model_dir, file_cache)
            if problem:
                raise UnsafeModelError(f"{path}: external data of tensor '{tensor.name}' {problem}; refusing to load")


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The distinct external-data files a model file references that exist in its folder (no safety checks)."""
    path = Path(path)
    proto = read_proto(path)
    seen: dict[str, Path] = {}
    for tensor in _iter_proto_tensors(proto):
        if not _is_external(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or _check_location(location):
            continue
        candidate = path.parent / location
        if candidate.is_file():
            seen.setdefault(os.path.realpath(candidate), candidate)
    return list(seen.values())


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus the external-data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_data_files(path))


# ---------------------------------------------------------------------------------------------------------------
# Tensors inside an IR model
# ---------------------------------------------------------------------------------------------------------------
_Setter = Callable[[Any], None]


def _attr_slots(node: ir.Node, slots: list[tuple[Any, _Setter, bool]]) -> list[ir.Graph]:
    subgraphs: list[ir.Graph] = []
    for name, attr in list(node.attributes.items()):
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
            def set_tensor(t: Any, node: ir.Node = node, name: str = name) -> None:
                old = node.attributes[name]
                node.attributes[name] = ir.Attr(name, ir.AttributeType.TENSOR, t, doc_string=old.doc_string)
            slots.append((attr.value, set_tensor, False))
        elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
            for i, tensor in enumerate(attr.value):
                def set_item(t: Any, node: ir.Node = node, name: str = name, i: int = i) -> None:
                    old = node.attributes[name]
                    values = list(old.value)
                    values[i] = t
                    node.attributes[name] = ir.Attr(name, ir.AttributeType.TENSORS, values, doc_string=old.doc_string)
                slots.append((tensor, set_item, False))
        elif attr.type == ir.AttributeType.GRAPH and attr.value is not None:
            subgraphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS and attr.value is not None:
            subgraphs.extend(attr.value)
    return subgraphs


def _tensor_slots(model: ir.Model, *, main_graph_only: bool = False) -> list[tuple[Any, _Setter, bool]]:
    """(tensor, setter, is_initializer) for every tensor in the model, in a deterministic order.

    Covers initializers of the main graph and subgraphs and tensor attributes of every node, functions included.
    """
    slots: list[tuple[Any, _Setter, bool]] = []
    pending: list[Any] = [model.graph, *model.functions.values()]
    while pending:
        graph = pending.pop(0)
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    def set_value(t: Any, value: ir.Value = value) -> None:
                        value.const_value = t
                    slots.append((value.const_value, set_value, graph is model.graph or not main_graph_only))
        for node in graph:
            pending.extend(_attr_slots(node, slots))
    return slots


@contextlib.contextmanager
def _swapped(replacements: list[tuple[_Setter, Any, Any]]) -> Iterator[None]:
    """Temporarily set each slot to its new tensor; restore the originals on exit, whatever happens."""
    done: list[tuple[_Setter, Any]] = []
    try:
        for setter, old, new in replacements:
            setter(new)
            done.append((setter, old))
        yield
    finally:
        for setter, old in reversed(done):
            setter(old)


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    """An in-memory tensor with the same content (a view of the memory map until serialized)."""
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                     metadata_props=dict(tensor.metadata_props) or None)


def _tensor_nbytes(tensor: Any) -> int:
    try:
        return int(tensor.nbytes)
    except Exception:
        return 0


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize the model into a self-contained ``ModelProto`` (external tensors read in). For small models only."""
    replacements = [(setter, t, _in_memory(t)) for t, setter, _ in _tensor_slots(model)
                    if isinstance(t, ir.ExternalTensor)]
    with _swapped(replacements):
        return ir.serde.serialize_model(model)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_destination(output_path: Path) -> None:
    if output_path.is_dir():
        raise UsageError(f"output {output_path} is an existing folder; give a file path")
    folder = output_path.parent
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")


def check_output_path(input_path: Path, output_path: Path) -> None:
    """Refuse an output path that would overwrite the input model or its external data, or cannot be written.

    Raises:
        UsageError: output is the input (same path, symlink or hard link), an existing folder, in a missing folder,
            or would replace one of the input's external-data files.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    _check_destination(output_path)
    if os.path.realpath(input_path) == os.path.realpath(output_path) or (
            output_path.exists() and input_path.exists() and _same_file(input_path, output_path)):
        raise UsageError(f"output {output_path} is the input model; choose another output path")
    data_path = output_path.with_name(output_path.name + ".data")
    candidates = [p for p in (output_path, data_path) if p.exists()]
    if candidates and input_path.is_file():
        try:
            inputs_data = external_data_files(input_path)
        except InputError:
            return  # load_model reports what is wrong with the input
        for candidate in candidates:
            for data_file in inputs_data:
                if _same_file(candidate, data_file):
                    raise UsageError(f"output {output_path} would overwrite {candidate}, the input's external data "
                                     "file; choose another output path")


def _open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create a new, empty, hidden temporary file beside the destination (permissions as for a normal file)."""
    for _ in range(100):
        path = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        return fd, path
    raise OSError(f"cannot create a temporary file in {folder}")


def _write_tensor(f: Any, tensor: Any) -> None:
    """Write one tensor's raw little-endian bytes at the file's current position (a kernel copy when mapped)."""
    tensor.tofile(f)


def _write_bytes(f: Any, blob: bytes) -> None:
    """Write the serialized model."""
    f.write(blob)


def _align(offset: int, nbytes: int) -> int:
    step = _LARGE_ALIGNMENT if nbytes >= _LARGE_TENSOR_BYTES else _SMALL_ALIGNMENT
    return (offset + step - 1) // step * step


def _write_external_data(f: Any, slots: list[tuple[Any, _Setter, bool]], folder: Path,
                         location: str) -> list[tuple[_Setter, Any, Any]]:
    """Stream the big initializers into ``f``; return the slot replacements pointing at them."""
    replacements: list[tuple[_Setter, Any, Any]] = []
    offset = 0
    for tensor, setter, is_initializer in slots:
        nbytes = _tensor_nbytes(tensor)
        if (is_initializer and tensor.dtype != ir.DataType.STRING and nbytes >= EXTERNAL_MIN_TENSOR_BYTES):
            offset = _align(offset, nbytes)
            f.seek(offset)
            _write_tensor(f, tensor)
            external = ir.ExternalTensor(location, offset, nbytes, tensor.dtype,
                                         shape=ir.Shape(tensor.shape.numpy()), name=tensor.name,
                                         doc_string=tensor.doc_string,
                                         metadata_props=dict(tensor.metadata_props) or None, base_dir=str(folder))
            replacements.append((setter, tensor, external))
            offset += nbytes
        elif isinstance(tensor, ir.ExternalTensor):
            replacements.append((setter, tensor, _in_memory(tensor)))
    f.flush()
    end = f.seek(0, os.SEEK_END)
    if end != offset:
        raise OSError(f"external data file has {end} bytes, expected {offset}")
    return replacements


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is renamed into place, so the commit is not cut in half."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_model(model: ir.Model, output_path: str | os.PathLike[str], *,
               input_path: str | os.PathLike[str] | None = None) -> None:
    """Write the model atomically; external data ``<name>.data`` when it is too large for one protobuf, or when the
    input model kept its weights in external data and the output's tensors exceed 64 MiB.

    The model object is left unchanged. Nothing is written in place: temporaries in the target folder are renamed
    over the destination once complete, and removed on any failure or interrupt.

    Raises:
        UsageError: the output is unsuitable (see :func:`check_output_path`) or would overwrite a file the model
            still reads its weights from.
        UnsupportedModelError: the part of the model that must stay inline exceeds the protobuf limit.
    """
    _save(model, Path(output_path), input_path=Path(input_path) if input_path is not None else None)


def _save(model: ir.Model, output_path: Path, *, input_path: Path | None = None,
          external: bool | None = None) -> None:
    if input_path is not None:
        check_output_path(input_path, output_path)
    _check_destination(output_path)
    output_path = output_path.absolute()
    folder = output_path.parent
    data_name = output_path.name + ".data"
    data_path = folder / data_name
    slots = _tensor_slots(model)
    for tensor, _, _ in slots:
        if isinstance(tensor, ir.ExternalTensor) and os.path.exists(tensor.path):
            for target in (output_path, data_path):
                if target.exists() and _same_file(Path(tensor.path), target):
                    raise UsageError(f"output {output_path} would overwrite {target}, which the model still reads "
                                     f"tensor '{tensor.name}' from; choose another output path")
    total = sum(_tensor_nbytes(t) for t, _, _ in slots)
    if external is None:
        external = total > EXTERNAL_DATA_THRESHOLD or (
            total > EXTERNAL_LIKE_INPUT_BYTES and input_path is not None and input_path.is_file()
            and bool(external_data_files(input_path)))
    temps: list[Path] = []
    try:
        if external:
            fd, data_tmp = _open_temp(folder, data_name)
            temps.append(data_tmp)
            with os.fdopen(fd, "wb") as f:
                replacements = _write_external_data(f, slots, folder, data_name)
                os.fsync(f.fileno())
        else:
            replacements = [(setter, t, _in_memory(t)) for t, setter, _ in slots if isinstance(t, ir.ExternalTensor)]
        inline = total - sum(_tensor_nbytes(old) for _, old, new in replacements if isinstance(new, ir.ExternalTensor))
        if inline > _PROTOBUF_LIMIT:
            raise UnsupportedModelError(f"cannot save {output_path}: {inline} bytes of tensors must stay inline "
                                        "(node attributes, strings), more than a protobuf file can hold")
        with _swapped(replacements):
            proto = ir.serde.serialize_model(model)
        del replacements
        blob = proto.SerializeToString(deterministic=True)
        del proto
        fd, model_tmp = _open_temp(folder, output_path.name)
        temps.append(model_tmp)
        with os.fdopen(fd, "wb") as f:
            _write_bytes(f, blob)
            f.flush()
            os.fsync(f.fileno())
        del blob
        with _signals_deferred():
            _commit(temps, [data_path, output_path] if external else [output_path])
        temps.clear()
        _fsync_folder(folder)
    except BaseException:
        for temp in temps:
            with contextlib.suppress(OSError):
                os.remove(temp)
        raise
    logger.info("saved %s%s", output_path, f" with external data {data_name}" if external else "")


def _commit(temps: list[Path], destinations: list[Path]) -> None:
    """Rename each temporary over its destination, the model last; once one is renamed, finish the rest."""
    done = 0
    try:
        for temp, destination in zip(temps, destinations, strict=True):
            os.replace(temp, destination)
            done += 1
    except BaseException:
        if done:  # the data file is already in place: complete the commit so the pair stays consistent
            for temp, destination in list(zip(temps, destinations, strict=True))[done:]:
                os.replace(temp, destination)
        raise


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime and the checker
# ---------------------------------------------------------------------------------------------------------------
_SHARED_LOCATION = "qcompiler-shared-weight"
_SHARE_MIN_BYTES = 1024


def _shareable(tensor: Any) -> bool:
    """A tensor ORT can take as an OrtValue over our own buffer (plain numpy dtype, not tiny)."""
    if tensor.dtype in (ir.DataType.STRING, ir.DataType.BFLOAT16):
        return False
    try:
        np.dtype(tensor.dtype.numpy())
    except Exception:  # float8/int4 and friends have no plain numpy dtype
        return False
    return _tensor_nbytes(tensor) >= _SHARE_MIN_BYTES


def ort_session(model: ir.Model, *, extra_outputs: Iterable[ir.Value] = (), intra_op_threads: int | None = None,
                optimization_level: Any = None) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` for an in-memory IR model, sharing its weights.

    The session runs a clone of the model (the model itself is not modified) whose protobuf carries no weight
    bytes: every main-graph initializer of at least 1 KiB with a plain numpy dtype is handed to ORT with
    ``SessionOptions.add_external_initializers`` as an ``OrtValue`` over the same buffer (memory-mapped for external
    data), so nothing is copied or written to disk and models over 2 GB work too. Smaller or exotic external tensors
    are read into the clone.

    Args:
        model: the model (not modified).
        extra_outputs: values of the main graph to expose as additional session outputs (by their names), e.g. the
            activations calibration observes.
        intra_op_threads: ORT's intra-op thread count (None: ORT's default).
        optimization_level: an ``onnxruntime.GraphOptimizationLevel`` (None: ORT's default).
    """
    import onnxruntime as ort

    clone = model.clone()
    by_name = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        by_name.update((out.name, out) for out in node.outputs)
    present = {v.name for v in clone.graph.outputs}
    for value in extra_outputs:
        if value.name is None or value.name not in by_name:
            raise ValueError(f"cannot expose value {value!r} as an output: it has no name in the main graph")
        if value.name not in present:
            exposed = by_name[value.name]
            if exposed.dtype is None:
                exposed.dtype = value.dtype or ir.DataType.FLOAT
            clone.graph.outputs.append(exposed)
            present.add(value.name)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # intermediate models may hold unused initializers: ORT would warn about each
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if optimization_level is not None:
        options.graph_optimization_level = optimization_level
    from qcompiler.runtime import custom_ops

    if custom_ops.DOMAIN in clone.opset_imports:  # int3 / fused FP8 nodes: register our ops (as Session does)
        custom_ops.register(options)
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for value in clone.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not _shareable(tensor):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        value.const_value = ir.ExternalTensor(_SHARED_LOCATION, 0, array.nbytes, tensor.dtype,
                                              shape=ir.Shape(array.shape), name=value.name)
        names.append(value.name)
        arrays.append(array)
    ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if names:
        options.add_external_initializers(names, ort_values)
    rest = [(setter, t, _in_memory(t)) for t, setter, _ in _tensor_slots(clone)
            if isinstance(t, ir.ExternalTensor) and t.location != _SHARED_LOCATION]
    with _swapped(rest):
        blob = ir.serde.serialize_model(clone).SerializeToString()
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    session._qcompiler_shared_weights = (arrays, ort_values)  # ORT reads these buffers for the session's life
    logger.debug("ORT session: %d shared weights, %d protobuf bytes", len(names), len(blob))
    return session


def check_model(model: ir.Model, *, full_check: bool = False) -> None:
    """Run the ONNX checker on the model without copying its weights.

    Main-graph initializers that are memory-mapped or over 1 KiB are replaced by graph inputs of the same type in the checked copy (the
    checker needs their names and types, not their values); other mapped tensors are read through their maps.

    Raises:
        onnx.checker.ValidationError: the checker's finding.
    """
    replacements: list[tuple[_Setter, Any, Any]] = []
    for tensor, setter, main_initializer in _tensor_slots(model, main_graph_only=True):
        big = isinstance(tensor, ir.ExternalTensor) or _tensor_nbytes(tensor) > 1024
        if main_initializer and big and tensor.dtype != ir.DataType.STRING:
            stub = ir.ExternalTensor(_STRIPPED_LOCATION, 0, _tensor_nbytes(tensor), tensor.dtype,
                                     shape=ir.Shape(tensor.shape.numpy()), name=tensor.name)
            replacements.append((setter, tensor, stub))
        elif isinstance(tensor, ir.ExternalTensor):
            replacements.append((setter, tensor, _in_memory(tensor)))
    with _swapped(replacements):
        proto = ir.serde.serialize_model(model)
    graph = proto.graph
    input_names = {v.name for v in graph.input}
    kept = []
    for init in graph.initializer:
        if any(e.key == "location" and e.value == _STRIPPED_LOCATION for e in init.external_data):
            if init.name not in input_names:
                graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(proto, full_check=full_check)
