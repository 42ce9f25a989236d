"""Calibration arrays (``.npy``, ``.npz``) read from a checked descriptor, headers first, within a memory budget.

``np.load`` trusts what a file declares: an ``.npz`` member whose header says 2**40 elements makes numpy allocate
them before reading a byte (a zip bomb of a few hundred bytes), and a path is reopened by name after any check.
Here a file is opened once, without blocking, and ``fstat``'d (:mod:`qcompiler.runtime._safe_files`: a FIFO,
device, socket or folder is refused at once), everything is parsed from that descriptor, and every array's header
(``.npy`` format 1.0 or 2.0, at most 10,000 bytes, parsed by numpy's own reader) is read before any data. An array
is read only when:

- its dtype holds no Python objects (nothing is ever unpickled);
- its shape has no negative dimension, and ``declared = prod(shape) * itemsize`` (exact integers, no overflow)
  fits in what holds it: the ``.npy`` file's size after its header, or the zip entry's uncompressed size
  (``file_size``) after the member's header;
- the declared bytes of all the arrays of one file together are at most :data:`MEMORY_BUDGET` (half the physical
  memory): a reader holds one file's arrays at a time.

An ``.npz`` member that is not an ``.npy`` array, a duplicated member name, format 3.0 (structured field names,
which no model input has) and an encrypted or unsupported zip are refused too. Every refusal is a one-line
:class:`~qcompiler.errors.CalibrationError` naming the file. Limits: the zip's CRC is checked only as far as
``zipfile`` checks it (at the end of a member read to its end); the budget is per file, not per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterator
from typing import IO

import numpy as np
import numpy.lib.format as npformat

from qcompiler.errors import CalibrationError
from qcompiler.runtime._safe_files import FileIdentity, SafeOpenError, open_beneath, open_regular

__all__ = ["MEMORY_BUDGET", "ArrayInfo", "NumpyFile", "open_numpy"]

logger = logging.getLogger(__name__)

_MAX_HEADER = 10_000  # numpy's own limit for a safe header parse
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf (Windows)
        return 16 << 30


#: Most bytes the arrays of one calibration file may declare (half the physical memory). Tests may lower it.
MEMORY_BUDGET: int = _physical_memory() // 2


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """What an array's header declares.

    Attributes:
        key: the ``.npz`` key (member name without ``.npy``), or None for an ``.npy`` file.
        dtype: its element type.
        shape: its shape.
        fortran_order: whether its data is stored column-major.
        nbytes: ``prod(shape) * itemsize``.
        offset: where its data starts (in the ``.npy`` file, or in the zip member).
    """

    key: str | None
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    nbytes: int
    offset: int


def _read_header(stream: IO[bytes], label: str, room: int) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, header bytes) of the ``.npy`` at the stream's start; ``room``: bytes after it."""
    try:
        version = npformat.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(stream, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(stream, max_header_size=_MAX_HEADER)
        else:
            raise CalibrationError(f"{label} uses .npy format {version[0]}.{version[1]} (structured field names), "
                                   "which calibration data never needs; save it with numpy.savez")
    except CalibrationError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, TypeError) as exc:
        raise CalibrationError(f"{label} is not a valid .npy array ({' '.join(str(exc).split())[:160]})") from None
    header = stream.tell()
    if dtype.hasobject:
        raise CalibrationError(f"{label} holds pickled or object data, which is never loaded (save plain numeric "
                               "arrays with numpy.savez)")
    if any(d < 0 for d in shape):
        raise CalibrationError(f"{label} declares a negative dimension {list(shape)}")
    declared = math.prod(shape) * dtype.itemsize
    if declared > room - header:
        raise CalibrationError(f"{label} declares shape {list(shape)} of {dtype} ({declared} bytes) but holds only "
                               f"{max(room - header, 0)} bytes of data; refusing to read it")
    return dtype, tuple(shape), bool(fortran), header


class NumpyFile:
    """An ``.npy`` or ``.npz`` opened from a checked descriptor, every array header read and checked.

    Use :func:`open_numpy`. Attributes: ``kind`` ("npy" or "npz"), ``label`` (for messages), ``identity`` (device,
    inode, size of what was opened), ``arrays`` (key -> :class:`ArrayInfo`; the key of an ``.npy`` is None).
    """

    def __init__(self, file: IO[bytes], label: str, identity: FileIdentity, budget: int) -> None:
        self._file = file
        self._zip: zipfile.ZipFile | None = None
        self.label = label
        self.identity = identity
        self.arrays: dict[str | None, ArrayInfo] = {}
        magic = file.read(4)
        file.seek(0)
        if magic in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
            self.kind = "npz"
            self._scan_zip()
        else:
            self.kind = "npy"
            dtype, shape, fortran, header = _read_header(file, label, identity.size)
            self.arrays[None] = ArrayInfo(None, dtype, shape, fortran, math.prod(shape) * dtype.itemsize, header)
        total = sum(a.nbytes for a in self.arrays.values())
        if total > budget:
            raise CalibrationError(f"{label} declares {total} bytes of arrays, more than the memory budget of "
                                   f"{budget} bytes (half the physical memory); split it into several files")

    def _scan_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise CalibrationError(f"{self.label} is not a readable .npz archive ({exc})") from None
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CalibrationError(f"{self.label} is a malformed .npz: a member name occurs twice")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise CalibrationError(f"{self.label}: member {info.filename!r} is not an .npy array")
            key = info.filename[:-4]
            label = f"{self.label} member {key!r}"
            try:
                with self._zip.open(info) as stream:
                    dtype, shape, fortran, header = _read_header(stream, label, info.file_size)
            except (NotImplementedError, RuntimeError, zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CalibrationError(f"{label} cannot be read ({' '.join(str(exc).split())[:160]})") from None
            self.arrays[key] = ArrayInfo(key, dtype, shape, fortran, math.prod(shape) * dtype.itemsize, header)

    def keys(self) -> list[str]:
        """The keys of an ``.npz`` in archive order (an ``.npy`` has none)."""
        return [k for k in self.arrays if k is not None]

    def read(self, key: str | None = None, *, mmap: bool = False) -> np.ndarray:
        """The array ``key`` (None for an ``.npy``); ``mmap``: map an ``.npy`` read-only instead of reading it."""
        info = self.arrays.get(key)
        if info is None:
            raise CalibrationError(f"{self.label} has no array {key!r}")
        try:
            if self.kind == "npy":
                if mmap and info.nbytes > 0:
                    return np.memmap(self._file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape,
                                     order="F" if info.fortran_order else "C")
                self._file.seek(0)
                return npformat.read_array(self._file, allow_pickle=False, max_header_size=_MAX_HEADER)
            assert self._zip is not None
            with self._zip.open(f"{key}.npy") as stream:
                return npformat.read_array(stream, allow_pickle=False, max_header_size=_MAX_HEADER)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            where = self.label if key is None else f"{self.label} member {key!r}"
            raise CalibrationError(f"cannot read {where}: {' '.join(str(exc).split())[:200]}") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._file.close()


@contextlib.contextmanager
def open_numpy(path: str | os.PathLike[str], *, label: str | None = None, folder: str | os.PathLike[str] | None = None,
               expect: FileIdentity | None = None, budget: int | None = None) -> Iterator[NumpyFile]:
    """Open a calibration ``.npy``/``.npz`` safely and check its headers (see the module docstring).

    Args:
        path: the file a user named; or, with ``folder``, a name inside that folder, opened without following a
            symlink and refused when hard-linked (like a model's external data).
        label: how messages name the file (default: the path).
        expect: the identity the file had when first checked: a file replaced since is refused.
        budget: the per-file memory budget (default :data:`MEMORY_BUDGET`).

    Raises:
        CalibrationError: in one line, for anything that makes the file unusable.
    """
    label = label or f"calibration file {os.fspath(path)}"
    try:
        if folder is not None:
            fd, st = open_beneath(folder, os.fspath(path), what=label)
        else:
            fd, st = open_regular(path, what=label)
    except SafeOpenError as exc:
        raise CalibrationError(str(exc)) from None
    file = os.fdopen(fd, "rb")
    try:
        identity = FileIdentity(st)
        if expect is not None and identity != expect:
            raise CalibrationError(f"{label} changed after it was checked")
        numpy_file = NumpyFile(file, label, identity, MEMORY_BUDGET if budget is None else budget)
    except BaseException:
        file.close()
        raise
    try:
        yield numpy_file
    finally:
        numpy_file.close()
