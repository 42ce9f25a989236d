"""A model file read once and checked, for the readers that hand it on (ONNX Runtime, the GPU executor).

:func:`open_model_file` reads the ``.onnx`` bytes from a non-blocking, fstat-checked descriptor, finds every
external-data reference in them (:mod:`._external_data`) and checks the files they name. Readers then use *these*
bytes and *these* files: :meth:`ModelFile.external_files` maps each checked file from a descriptor that is verified
to be the same inode, so nothing is opened by path after the check (a file swapped in meanwhile is refused, not
read), and ONNX Runtime gets the data as in-memory files (:meth:`ModelFile.ort_options`) with its own
external-data folder pointed at an empty private folder: ORT never resolves a location itself, neither against
the model's folder nor against the working directory. ORT takes in-memory files only for main-graph initializers
and Constant nodes, so the data of tensors elsewhere (subgraphs, functions, sparse tensors) is read in first
(:meth:`ModelFile.ort_blob`).

Standard library only (the runtime must not need onnx).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qcompiler.runtime._external_data import (
    CheckedFiles,
    ExternalDataError,
    ExternalRef,
    check_external_refs,
    find_external_refs,
    inline_external,
    read_ref,
)
from qcompiler.runtime._safe_files import SafeOpenError, read_regular

__all__ = ["ModelFile", "ModelFileError", "open_model_file"]

_PROTOBUF_LIMIT = 2**31 - 1
_ORT_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class ModelFileError(ValueError):
    """The model file cannot be read or its external data is refused; ``str(exc)`` is one line."""


@dataclasses.dataclass
class ModelFile:
    """The bytes of a model file and its checked external-data files.

    Attributes:
        path: the file that was read.
        blob: its bytes.
        refs: every tensor in it that names external data.
        files: the checked files those tensors name (location -> identity).
    """

    path: Path
    blob: bytes
    refs: list[ExternalRef]
    files: CheckedFiles

    @contextlib.contextmanager
    def external_files(self) -> Iterator[dict[str, Any]]:
        """Map each checked external-data file (location -> read-only buffer) for the duration of the block."""
        maps: dict[str, Any] = {}
        try:
            for location in self.files.identities:
                fd = self.files.open(location)
                try:
                    size = os.fstat(fd).st_size
                    maps[location] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
                finally:
                    os.close(fd)
            yield maps
        finally:
            for buffer in maps.values():
                if isinstance(buffer, mmap.mmap):
                    buffer.close()

    def ort_blob(self) -> bytes:
        """:attr:`blob` with the data of every nested reference (subgraphs, functions, sparse tensors: where ONNX
        Runtime does not look in in-memory files) read in from the checked files; main-graph ones stay external.

        Raises:
            ModelFileError: the result would exceed protobuf's 2 GiB, or a checked file changed.
        """
        nested = [ref for ref in self.refs if ref.nested]
        try:
            blob = inline_external(self.blob, nested, lambda ref: read_ref(self.files, ref))
        except ExternalDataError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None
        if len(blob) > _PROTOBUF_LIMIT:
            raise ModelFileError(f"{self.path}: the external data of subgraphs and functions does not fit in one "
                                 "protobuf once read in (2 GiB)")
        return blob

    @contextlib.contextmanager
    def ort_options(self, options: Any) -> Iterator[Any]:
        """``options`` (an ``onnxruntime.SessionOptions``) set up to create a session from :meth:`ort_blob`: the
        checked files given as in-memory files, and ORT's own external-data folder an empty private one.

        Create the session inside the block: ORT copies what it needs while the session is created."""
        with tempfile.TemporaryDirectory(prefix="qcompiler-no-data-") as empty, self.external_files() as maps:
            options.add_session_config_entry(_ORT_FOLDER_KEY, empty)
            if maps:
                names = list(maps)
                buffers = [maps[n] if len(maps[n]) else b"\0" for n in names]
                options.add_external_initializers_from_files_in_memory(names, buffers, [len(maps[n]) for n in names])
            yield options


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read and check the model at ``path`` (symlinks to the model file itself are followed).

    Raises:
        ModelFileError: the file is missing, not a regular file, empty, too big for protobuf, not well-formed
            protobuf, or one of its external-data references is refused (one line, naming the tensor).
    """
    path = Path(path)
    try:
        blob = read_regular(path, limit=_PROTOBUF_LIMIT)
    except SafeOpenError as exc:
        if exc.errno == errno.ENOENT:
            raise ModelFileError(f"{path}: no such model file") from None
        raise ModelFileError(str(exc)) from None
    if not blob:
        raise ModelFileError(f"{path} is empty, not an ONNX model")
    try:
        refs = find_external_refs(blob)
        files = check_external_refs(refs, path.parent.absolute())
    except ExternalDataError as exc:
        raise ModelFileError(f"{path}: {exc}; refusing to load") from None
    except ValueError as exc:
        raise ModelFileError(f"{path}: not an ONNX model ({exc})") from None
    return ModelFile(path, blob, refs, files)
