"""Reading and writing model files: the one place in qcompiler that touches the file system for models.

Loading reads the ``.onnx`` file once from a non-blocking, fstat-checked descriptor (a FIFO or device is refused,
never waited on), finds every external-data reference in its bytes wherever the tensor sits (graph and subgraph
initializers, sparse tensors, node attributes, functions and their attribute defaults, training info: one walk,
:mod:`qcompiler.runtime._external_data`, shared with the runtime's Session) and checks each referenced file
*before* any tensor data is read; then :mod:`qcompiler.load_checks` refuses a malformed model and makes sparse
initializers dense, and onnx-ir deserializes the proto. External tensors stay lazy: they are memory-mapped only
when a pass reads them, so loading a multi-GB model costs only the size of its graph, and they reopen their file
only through the check's record (:class:`_CheckedExternalTensor`): the same inode, beneath the model's folder,
without symlinks, or a one-line refusal. A model given in memory (the API's ``onnx.ModelProto`` or
``onnx_ir.Model``) is serialized and loaded through the same checks (:func:`load_model_bytes`); a tensor of it that
names external data is refused, as there is no folder to check the file beneath.

An external-data reference is refused (:class:`~qcompiler.errors.UnsafeModelError`) when its location is empty,
absolute, contains ``..``, a NUL or a ``\\``, goes through a symlinked file or folder, names a missing file,
something that is not a regular file (FIFO, device, socket, folder), or a file with more than one hard link; and
when its fields are malformed: a key other than ``location``/``offset``/``length``/``checksum`` (the ONNX spec's
keys; ``basepath`` is refused on purpose), a repeated key, an offset or length that is not a non-negative decimal
integer, a length that differs from the tensor's size, or data that runs past the end of the file.

Saving (:mod:`qcompiler.io_write`, re-exported here) refuses before compiling an output that is the input model or
one of its data files, a folder, a device, a name too long or an unwritable folder; writes locked temporaries in
the target folder, fsyncs them and renames them into place, so an interrupted save (any exception, Ctrl-C or
SIGTERM included) leaves no partial output and no temporary file, and an existing output stays untouched. When the
tensors would make the protobuf exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes, initializers of at least
:data:`EXTERNAL_MIN_TENSOR_BYTES` go to one external-data file ``<output name>.<16 hex of its sha256>.data``
beside the model, streamed tensor by tensor (a kernel copy for memory-mapped inputs): only the model references
that name and is renamed last, so model and data commit as one unit, and concurrent saves to one folder commit one
after the other (``flock``), each removing the target's stale data files and dead temporaries. The output is
deterministic: the same model saved twice gives byte-identical files.

Limits: only the binary protobuf format is read and written; a single ``.onnx`` file cannot exceed protobuf's 2 GiB;
tensors held in node attributes (``Constant``) are always written inline.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler._serialize import model_to_bytes
from qcompiler.errors import InputError, PassFailedError, UnsafeModelError
from qcompiler.io_write import (  # noqa: F401 (re-exported; io_write imports this module lazily)
    _fsync_folder,
    _open_temp,
    _same_file,
    check_dump_folder,
    check_output_path,
    save_model,
)
from qcompiler.load_checks import check_and_normalize
from qcompiler.runtime._external_data import (
    VALID_KEYS,
    CheckedFiles,
    ExternalDataError,
    check_external_refs,
    find_external_refs,
)
from qcompiler.runtime._safe_files import SafeOpenError, location_problem, read_regular

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_MIN_TENSOR_BYTES",
    "VALID_EXTERNAL_DATA_KEYS",
    "load_model",
    "load_model_bytes",
    "read_proto",
    "check_output_path",
    "check_dump_folder",
    "save_model",
    "model_bytes",
    "external_data_files",
    "to_proto",
    "to_bytes",
    "ort_session",
    "check_model",
    "check_output",
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
VALID_EXTERNAL_DATA_KEYS = VALID_KEYS

_PROTOBUF_LIMIT = 2**31 - 1
_LARGE_TENSOR_BYTES = 1 << 20  # tensors at least this big start at a 64 KiB boundary in the data file
_LARGE_ALIGNMENT = 1 << 16
_SMALL_ALIGNMENT = 64
_STRIPPED_LOCATION = "__qcompiler_stripped__"
_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def _read_blob(path: Path) -> bytes:
    """The bytes of a user-named model file, read from a non-blocking, fstat-checked descriptor."""
    try:
        blob = read_regular(path, limit=_PROTOBUF_LIMIT)
    except SafeOpenError as exc:
        if exc.errno == errno.ENOENT:
            raise InputError(f"{path}: no such file") from None
        if exc.errno == errno.EISDIR:
            raise InputError(f"{path}: is a folder, not an ONNX model file") from None
        if exc.errno == errno.EFBIG:
            raise InputError(f"{path}: is more than a protobuf file can hold (2 GiB); large models must keep their "
                             "weights in external data") from None
        raise InputError(str(exc)) from None
    if not blob:
        raise InputError(f"{path}: is empty, not an ONNX model")
    return blob


def _parse(blob: bytes, path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(blob)
    except Exception:  # google.protobuf.message.DecodeError and friends
        raise InputError(f"{path}: not an ONNX model (the protobuf cannot be parsed: corrupt or truncated)") from None
    missing = [name for name, ok in (("ir_version", proto.ir_version > 0), ("graph", proto.HasField("graph")),
                                     ("opset_import", len(proto.opset_import) > 0)) if not ok]
    if missing:
        raise InputError(f"{path}: not a complete ONNX model (no {', '.join(missing)}; truncated or another format)")
    return proto


def read_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ``.onnx`` file into a ``ModelProto`` without loading external data, with one-line errors.

    Raises:
        InputError: the file is missing, a folder, a FIFO or device, empty, too large, not ONNX or truncated.
    """
    path = Path(path)
    return _parse(_read_blob(path), path)


def _checked_refs(blob: bytes, path: Path) -> CheckedFiles:
    """Every external-data reference of the model bytes, checked against the files beneath the model's folder."""
    try:
        return check_external_refs(find_external_refs(blob), path.parent.absolute())
    except ExternalDataError as exc:
        raise UnsafeModelError(f"{path}: {exc}; refusing to load") from None
    except ValueError:
        raise InputError(f"{path}: not an ONNX model (the protobuf cannot be parsed: corrupt or truncated)") from None


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into the IR, external tensors left lazy (memory-mapped on first use).

    Every external-data reference is found in the file's bytes and checked before any tensor data is touched
    (:mod:`qcompiler.runtime._external_data`); the model's structure is checked and its sparse initializers made
    dense (:mod:`qcompiler.load_checks`); every external tensor of the IR then reads through the checked files only
    (:class:`_CheckedExternalTensor`).

    Raises:
        InputError: the file cannot be read as an ONNX model, or the model is malformed.
        UnsafeModelError: an external-data reference is unsafe or malformed.
    """
    path = Path(path)
    blob = _read_blob(path)
    proto = _parse(blob, path)
    files = _checked_refs(blob, path)
    del blob
    check_and_normalize(proto, path, files)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the model ({type(exc).__name__}: {_one_line(exc)})") from None
    del proto
    _pin_external_tensors(model, files, path)
    logger.debug("loaded %s (%d nodes in the main graph)", path, len(model.graph))
    return model


def load_model_bytes(blob: bytes, source: str = "the in-memory model") -> ir.Model:
    """Load a serialized model held in memory (what the API makes of an ``onnx.ModelProto`` or ``onnx_ir.Model``)
    with the checks :func:`load_model` makes; ``source`` names it in messages. The IR is a new object: nothing in
    it shares memory with what ``blob`` was made from.

    A tensor that keeps its data in an external file is refused: bytes in memory have no folder that the file
    could be checked beneath (load the data into the model first, or give the model's file path instead).

    Raises:
        InputError: not an ONNX model, too large for one protobuf, or a malformed model.
        UnsafeModelError: a tensor names external data.
    """
    path = Path(source)
    if not blob:
        raise InputError(f"{source}: is empty, not an ONNX model")
    if len(blob) > _PROTOBUF_LIMIT:
        raise InputError(f"{source}: is {len(blob)} bytes serialized, more than one protobuf can hold (2 GiB); save "
                         "it with external data and give its file path")
    proto = _parse(blob, path)
    try:
        refs = find_external_refs(blob)
    except ExternalDataError as exc:
        raise UnsafeModelError(f"{source}: {exc}; refusing to load") from None
    except ValueError:
        raise InputError(f"{source}: not an ONNX model (the protobuf cannot be parsed)") from None
    if refs:
        ref = refs[0]
        raise UnsafeModelError(
            f"{source}: tensor {ref.name!r} ({ref.where}) keeps its data in the external file {ref.location!r}; "
            f"an in-memory model must hold all its tensors ({len(refs)} external): give the model's file path "
            "instead (its data files are then checked), or load the data into the model first "
            "(onnx.load(path) loads it; onnx_ir.load(path) then onnx_ir.external_data.load_to_model(model))")
    files = check_external_refs([], "")
    check_and_normalize(proto, path, files)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InputError(f"{source}: cannot read the model ({type(exc).__name__}: {_one_line(exc)})") from None
    logger.debug("loaded %s (%d nodes in the main graph)", source, len(model.graph))
    return model


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class _CheckedExternalTensor(ir.ExternalTensor):
    """An external tensor whose file is reopened only through :meth:`CheckedFiles.open`: the same inode that was
    checked at load, reached beneath the model's folder without symlinks, never a FIFO (see :mod:`._safe_files`).
    """

    __slots__ = ("_checked_files",)

    def __init__(self, tensor: ir.ExternalTensor, files: CheckedFiles) -> None:
        super().__init__(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                         name=tensor.name, doc_string=tensor.doc_string,
                         metadata_props=dict(tensor.metadata_props) or None, base_dir=files.folder)
        self._checked_files = files

    def _open_checked(self) -> int:
        try:
            return self._checked_files.open(os.fspath(self.location))
        except ExternalDataError as exc:
            raise UnsafeModelError(f"{exc}; refusing to read tensor {self.name!r}") from None

    def _load(self) -> None:
        if self.size == 0:
            self._array = np.empty(self.shape.numpy(), dtype=self.dtype.numpy())
            return
        fd = self._open_checked()
        try:
            self.raw = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._array = _decode_raw(self.raw, self.offset or 0, self.dtype, self.shape.numpy())

    def tofile(self, file: Any) -> None:
        offset, remaining = self.offset or 0, self.length if self.length is not None else self.nbytes
        fd = self._open_checked()
        try:
            while remaining > 0:
                chunk = os.pread(fd, min(remaining, 1 << 24), offset)
                if not chunk:
                    raise UnsafeModelError(f"external data file {self.location!r} ended early while reading "
                                           f"tensor {self.name!r}")
                file.write(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)


def _decode_raw(raw: Any, offset: int, dtype: ir.DataType, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a tensor stored little-endian at ``offset`` in ``raw`` (sub-byte types unpacked as onnx-ir
    does for its own external tensors)."""
    from onnx_ir import _type_casting

    if dtype.bitwidth < 8:
        count = (math.prod(shape) * dtype.bitwidth + 7) // 8
        packed = np.frombuffer(raw, dtype=np.uint8, offset=offset, count=count)
        unpack = {4: _type_casting.unpack_4bitx2, 2: _type_casting.unpack_2bitx4, 6: _type_casting.unpack_6bit}
        return unpack[dtype.bitwidth](packed, shape).view(dtype.numpy())
    array = np.frombuffer(raw, dtype=np.dtype(dtype.numpy()).newbyteorder("<"), offset=offset,
                          count=math.prod(shape))
    return array.reshape(shape)


def _pin_external_tensors(model: ir.Model, files: CheckedFiles, path: Path) -> None:
    """Make every external tensor of the IR read through the checked files; refuse one the check never saw."""
    for tensor, setter, _ in _tensor_slots(model):
        if not isinstance(tensor, ir.ExternalTensor) or isinstance(tensor, _CheckedExternalTensor):
            continue
        if os.fspath(tensor.location) not in files.identities:
            raise UnsafeModelError(f"{path}: external data of tensor {tensor.name!r} names "
                                   f"{os.fspath(tensor.location)!r}, which was not checked; refusing to load")
        setter(_CheckedExternalTensor(tensor, files))


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The distinct external-data files a model file references that exist in its folder (no safety checks).

    Remembered per file identity (device, inode, size, modification time): a compile asks about its input several
    times (output checks, dump folder, save, sizes), and a 2 GB inline model should be read for it once."""
    path = Path(path)
    try:
        st = os.stat(path)
        identity: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None
    seen: dict[str, Path] = {}
    for location in _referenced_locations(path, identity):
        candidate = path.parent / location
        if candidate.is_file():
            seen.setdefault(os.path.realpath(candidate), candidate)
    return list(seen.values())


@functools.lru_cache(maxsize=8)
def _referenced_locations(path: Path, identity: tuple[int, ...] | None) -> tuple[str, ...]:
    """The acceptable external-data locations the model file names (``identity`` keys the cache)."""
    blob = _read_blob(path)
    if b"location" not in blob:  # the key of every reference, stored verbatim: no file named (a C-speed scan)
        return ()
    try:
        refs = find_external_refs(blob)
    except ValueError:
        return ()
    return tuple(dict.fromkeys(ref.location for ref in refs if not location_problem(ref.location)))


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus the external-data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_data_files(path))


# ---------------------------------------------------------------------------------------------------------------
# Tensors inside an IR model
# ---------------------------------------------------------------------------------------------------------------
_Setter = Callable[[Any], None]


def _attr_slots(node: ir.Node | ir.Function, slots: list[tuple[Any, _Setter, bool]]) -> list[ir.Graph]:
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

    Covers initializers of the main graph and subgraphs, tensor attributes of every node, functions included, and
    the tensor defaults of functions' attributes.
    """
    slots: list[tuple[Any, _Setter, bool]] = []
    pending: list[Any] = [model.graph, *model.functions.values()]
    for function in model.functions.values():  # attribute defaults (FunctionProto.attribute_proto)
        pending.extend(_attr_slots(function, slots))
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


def to_bytes(model: ir.Model) -> bytes:
    """The self-contained ONNX bytes of the model (external tensors read in): what an inline save writes."""
    replacements = [(setter, t, _in_memory(t)) for t, setter, _ in _tensor_slots(model)
                    if isinstance(t, ir.ExternalTensor)]
    with _swapped(replacements):
        return model_to_bytes(model)


# ---------------------------------------------------------------------------------------------------------------
# Writing: qcompiler/io_write.py (check_output_path, save_model and the temporaries are re-exported above)
# ---------------------------------------------------------------------------------------------------------------


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
                optimization_level: Any = None, optimized_model_path: str | None = None) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` for an in-memory IR model, sharing its weights.

    The session runs a clone of the model (the model itself is not modified) whose protobuf carries no weight
    bytes and no external-data reference but those handed over (checked on the bytes; ORT's external-data folder is
    an empty private one, so nothing is ever resolved against the working directory): every main-graph initializer of at least 1 KiB with a plain numpy dtype is handed to ORT with
    ``SessionOptions.add_external_initializers`` as an ``OrtValue`` over the same buffer (memory-mapped for external
    data), so nothing is copied or written to disk and models over 2 GB work too. Smaller or exotic external tensors
    are read into the clone.

    Args:
        model: the model (not modified).
        extra_outputs: values of the main graph to expose as additional session outputs (by their names), e.g. the
            activations calibration observes.
        intra_op_threads: ORT's intra-op thread count (None: ORT's default).
        optimization_level: an ``onnxruntime.GraphOptimizationLevel`` (None: ORT's default).
        optimized_model_path: where ORT writes the graph it optimised (what it really runs), or None.
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
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    from qcompiler.runtime import custom_ops

    if custom_ops.DOMAIN in clone.opset_imports:  # int3 / fused FP8 nodes: register our ops (as Session does)
        custom_ops.register(options)
    for name, value in list(clone.graph.initializers.items()):
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            del clone.graph.initializers[name]  # ORT drops it, then fails to find it among the handed-over ones
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
    shared = set(names)
    stray = [ref for ref in find_external_refs(blob) if ref.location != _SHARED_LOCATION or ref.name not in shared]
    if stray:  # ORT would open it relative to the working directory
        raise RuntimeError(f"internal: tensor {stray[0].name!r} ({stray[0].where}) would reach ONNX Runtime as an "
                           "external-data reference")
    with tempfile.TemporaryDirectory(prefix="qcompiler-no-data-") as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
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
    def strip(proto: onnx.ModelProto) -> None:
        graph = proto.graph
        input_names = {v.name for v in graph.input}
        kept = []
        for init in graph.initializer:
            if any(e.key == "location" and e.value == _STRIPPED_LOCATION for e in init.external_data):
                if init.name not in input_names:
                    graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                                          list(init.dims)))
            else:
                kept.append(init)
        del graph.initializer[:]
        graph.initializer.extend(kept)

    with _swapped(replacements):  # bytes made chunk by chunk: no whole-model proto next to the IR
        blob = model_to_bytes(model, edit=strip)
    onnx.checker.check_model(blob)
    if full_check:  # what full_check adds (strict, type-checked inference on a copy), once the first copy is gone
        _strict_inference(blob)


def _strict_inference(blob: bytes) -> None:
    """ONNX's ``check_model(full_check=True)`` second half: strict shape inference with type checks, data
    propagation off. Run apart from the structural check, C++ holds one parsed copy of the model at a time instead of
    two (about half the memory on a 1,000,000-node graph); the inferred model is dropped unparsed."""
    infer = getattr(getattr(onnx.shape_inference, "C", None), "infer_shapes", None)
    if infer is None:  # pragma: no cover - another onnx layout: the public call (it also parses the result)
        onnx.shape_inference.infer_shapes(blob, check_type=True, strict_mode=True, data_prop=False)
    else:
        infer(blob, True, True, False)


def check_output(model: ir.Model) -> None:
    """Refuse to write a compiled model that fails the ONNX checker with full checking (weights stripped).

    The input passed the same check at load (:mod:`qcompiler.load_checks`), so a failure here is qcompiler's bug.

    Raises:
        PassFailedError: the checker's finding, in one line (exit code 1: nothing is written).
    """
    try:
        check_model(model, full_check=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise PassFailedError("the compiled model fails the ONNX checker, so it is not written (a qcompiler bug): "
                              f"{' '.join(lines[:2])[:300]}") from exc
