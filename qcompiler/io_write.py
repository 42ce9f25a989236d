"""Writing model files, their external data, dumps and reports, so that no input is destroyed and no output mixed.

What holds:

- **Refused before compiling** (:func:`check_output_path`, :func:`check_dump_folder`): an output that is the input
  model or one of its external-data files (same path, symlink or hard link), an existing folder, device, FIFO or
  socket, a file in a missing folder, a name longer than the file system allows, a folder that cannot be written
  (a file is created and removed there to find out), an input data file named like one of the output's data files,
  and a dump folder that holds the input model or its data.
- **Temporaries, then renames.** Each file is written to a temporary ``.qcompile-<8 hex of the target's name>.<12
  random hex>.tmp`` in the target folder (short whatever the target's length), held under ``flock`` while its writer
  lives, fsynced, and renamed into place; any failure or interrupt removes it.
- **Model and data commit as one unit.** The external-data file is named from its content, ``<output name>.<16 hex of
  its sha256>.data`` (the stem is shortened, with a tag of the full name, when the name would not fit NAME_MAX or
  is not a safe ONNX location), and only the model file references it. The data is renamed first and the model
  last, so the last rename decides which pair is live: a crash between the two leaves the previous pair intact and
  one unreferenced data file. Commit and cleanup run under an ``flock`` of the output folder, so concurrent saves to
  one folder commit one after the other; after its commit a save removes the target's unreferenced data files and
  the temporaries of earlier crashed runs (a temporary whose lock can be taken has no live writer), never one of
  the input's files or a file the model still reads. SIGINT and SIGTERM are held during the commit.
- **Deterministic.** The same model saved twice gives byte-identical files with the same names.
- **One-line errors.** A full disk or quota, a read-only or unwritable folder, a name too long, a folder where a
  file must go raise :class:`~qcompiler.errors.OutputError` (exit 2) naming the file; no temporary is left.

Limits: POSIX locking (``fcntl.flock``; without it, or when the folder cannot be opened for reading, saves still
commit atomically but stale files are not cleaned up); a data file belongs to the model file of its name: renaming
a model by hand and saving again to its old name removes the data the renamed model needs. The data file's hash is
computed by reading the file back once after it is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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

import onnx_ir as ir

from qcompiler._serialize import model_to_bytes
from qcompiler.errors import InputError, OutputError, UnsupportedModelError, UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["check_output_path", "check_dump_folder", "save_model", "write_bytes_atomic", "data_file_name"]

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".qcompile-"
_TEMP_RE = re.compile(r"\.qcompile-([0-9a-f]{8})\.[0-9a-f]{12}\.tmp")
_HASH_HEX = 16
_DATA_SUFFIX_BYTES = len(f".{'0' * _HASH_HEX}.data")
_DEFAULT_NAME_MAX = 255
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _io() -> Any:
    """qcompiler.io, imported late: it re-exports this module's functions (and tests patch its constants)."""
    from qcompiler import io

    return io


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------
def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX


def _target_id(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:8]


def _truncate_utf8(text: str, nbytes: int) -> str:
    data = text.encode("utf-8")[:max(nbytes, 0)]
    return data.decode("utf-8", "ignore")  # drops a character cut in half


def _data_stem(name: str, name_max: int) -> str:
    """The part of the data file's name before ``.<hash>.data``: the output name, made a safe UTF-8 location."""
    stem = os.fsencode(name).decode("utf-8", "replace").replace("\ufffd", "_")
    stem = stem.replace("\\", "_").replace(":", "_")  # a separator elsewhere, or a drive letter: refused at load
    room = name_max - _DATA_SUFFIX_BYTES
    if stem != name or len(stem.encode("utf-8")) > room:
        tag = "~" + _target_id(name)
        stem = _truncate_utf8(stem, room - len(tag)) + tag
    return stem


def data_file_name(output_name: str, digest: str, name_max: int = _DEFAULT_NAME_MAX) -> str:
    """The external-data file name of output ``output_name`` whose content has sha256 ``digest`` (hex)."""
    return f"{_data_stem(output_name, name_max)}.{digest[:_HASH_HEX]}.data"


def _data_pattern(output_name: str, name_max: int) -> re.Pattern[str]:
    return re.compile(re.escape(_data_stem(output_name, name_max)) + rf"\.[0-9a-f]{{{_HASH_HEX}}}\.data")


# ---------------------------------------------------------------------------------------------------------------
# Errors, locks, temporaries
# ---------------------------------------------------------------------------------------------------------------
def _output_error(exc: OSError, what: str, path: Path) -> OutputError:
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        why = "no space left on the device (or the disk quota or file size limit is reached)"
    elif code == errno.EROFS:
        why = f"the folder {path.parent} is on a read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"permission denied writing in {path.parent}"
    elif code == errno.ENAMETOOLONG:
        why = "the file name or path is too long for this file system"
    elif code == errno.EISDIR:
        why = "a folder is in the way of a file it must write"
    elif code == errno.ENOTDIR:
        why = "part of the path is not a folder"
    else:
        why = exc.strerror or str(exc)
    return OutputError(f"cannot write {what} {path}: {why}; nothing was written")


@contextlib.contextmanager
def _write_errors(what: str, path: Path) -> Iterator[None]:
    """Turn an OSError of the writing into a one-line OutputError (a SafeOpenError is the reader's: left alone)."""
    try:
        yield
    except OSError as exc:
        if type(exc).__name__ == "SafeOpenError":
            raise
        raise _output_error(exc, what, path) from None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive flock on the folder; yields False (no lock) where that cannot be had."""
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.debug("cannot lock %s (%s): no cleanup of stale files", folder, exc)
            if fd >= 0:
                os.close(fd)
            fd = -1
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create an empty temporary for target ``name`` in ``folder``, locked (flock) until its fd is closed.

    It is created under the folder lock, so a cleanup (which runs under that lock) never finds it unlocked.
    """
    with _folder_lock(Path(folder)):
        for _ in range(100):
            path = Path(folder) / f"{_TEMP_PREFIX}{_target_id(name)}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
            except FileExistsError:
                continue
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, path
    raise OSError(errno.EEXIST, f"cannot create a temporary file in {folder}")


def _discard(temps: Iterable[tuple[int, Path]]) -> None:
    """Remove temporaries (signals held, so a second Ctrl-C cannot leave one behind) and release their locks."""
    with _signals_deferred():
        for fd, path in temps:
            with contextlib.suppress(OSError):
                os.remove(path)
            with contextlib.suppress(OSError):
                os.close(fd)


class _Temporaries(list):
    """The temporaries ``(fd, path)`` of one write; ``committed`` once they are renamed into place."""

    committed = False


@contextlib.contextmanager
def _temporaries() -> Iterator[_Temporaries]:
    """Temporaries of one write: removed on any failure before the commit, their descriptors (and locks) released
    at the end whatever happens."""
    temps = _Temporaries()
    try:
        yield temps
    except BaseException:
        if not temps.committed:
            _discard(temps)
            temps.clear()
        raise
    finally:
        for fd, _ in temps:
            with contextlib.suppress(OSError):
                os.close(fd)


def _cleanup_stale(folder: Path, name: str, *, keep: str | None, protected: _Protected, data: bool = True) -> None:
    """Remove the target's unreferenced data files and its temporaries without a live writer (folder lock held)."""
    pattern = _data_pattern(name, _name_max(folder)) if data else None
    tid = _target_id(name)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.name == keep:
                continue
            temp = _TEMP_RE.fullmatch(entry.name)
            if temp is not None and temp.group(1) == tid:
                fd = os.open(entry.path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
                    os.remove(entry.path)
                    logger.info("removed %s, a temporary of an earlier interrupted save", entry.path)
                finally:
                    os.close(fd)
            elif pattern is not None and pattern.fullmatch(entry.name) and Path(entry.path) not in protected:
                os.remove(entry.path)
                logger.info("removed %s, data of an earlier save no model references", entry.path)
        except OSError:
            continue


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is renamed into place, so the commit is not cut in half.

    Python runs signal handlers in the main thread whichever thread the kernel picked (ONNX Runtime's threads have
    the signals unblocked), so a thread mask cannot hold them: the handlers are swapped for one that records the
    signal, and the previous handler gets it once the block ends (the default action re-raised as is).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(pending):
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(signum)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------
class _Protected:
    """Files a save must never replace or remove: the input model, its data files, files the model still reads."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.ids: set[tuple[int, int]] = set()
        self.real: set[str] = set()
        for path in paths:
            self.real.add(os.path.realpath(path))
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self.ids.add((st.st_dev, st.st_ino))

    def __contains__(self, path: object) -> bool:
        assert isinstance(path, Path)
        if os.path.realpath(path) in self.real:
            return True
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.ids


def _input_data_files(input_path: Path) -> list[Path]:
    if not input_path.is_file():
        return []
    try:
        return [Path(p) for p in _io().external_data_files(input_path)]
    except (InputError, OSError):
        return []  # load_model reports what is wrong with the input


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_destination(path: Path, what: str = "output") -> None:
    """The target is a plain file or nothing, its folder exists, and its name fits the file system."""
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise UsageError(f"{what} folder {folder} is not a folder")
        raise UsageError(f"{what} folder {folder} does not exist")
    try:
        st = os.stat(path)
    except OSError:
        st = None  # missing, or a dangling symlink (the rename replaces the link)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is an existing folder; give a file path")
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise UsageError(f"{what} {path} is {kind}, not a regular file; give a file path")
    limit = _name_max(folder)
    if len(os.fsencode(path.name)) > limit:
        raise OutputError(f"{what} {path}: the file name is {len(os.fsencode(path.name))} bytes, more than this "
                          f"file system allows ({limit}); choose a shorter name")


def _probe_writable(folder: Path, what: str, path: Path) -> None:
    """Create and remove a temporary in ``folder``: a read-only, full or forbidden folder fails here, early."""
    with _write_errors(what, path):
        fd, temp = _open_temp(folder, path.name)
        _discard([(fd, temp)])


def check_output_path(input_path: str | os.PathLike[str] | None, output_path: str | os.PathLike[str], *,
                      what: str = "output", data_file: bool = True) -> None:
    """Refuse an output path that would overwrite the input model or its external data, or cannot be written.

    Args:
        input_path: the input model (None: a model given in memory; only the destination is checked).
        output_path: the file to be written.
        what: how messages name the file (``output``, ``--report``...).
        data_file: the file is a model that may get external-data files beside it.

    Raises:
        UsageError: output is the input (same path, symlink or hard link) or one of its data files, an existing
            folder, device, FIFO or socket, in a missing folder; or an input data file is named like the output's.
        OutputError: the name is too long, or the folder cannot be written (read-only, full, permission denied).
    """
    if input_path is None:
        _check_destination(Path(output_path), what)
        _probe_writable(Path(output_path).parent, what, Path(output_path))
        return
    input_path, output_path = Path(input_path), Path(output_path)
    _check_destination(output_path, what)
    if os.path.realpath(input_path) == os.path.realpath(output_path) or (
            output_path.exists() and input_path.exists() and _same_file(input_path, output_path)):
        raise UsageError(f"{what} {output_path} is the input model; choose another output path")
    inputs_data = _input_data_files(input_path)
    for data in inputs_data:
        if os.path.realpath(data) == os.path.realpath(output_path) or (
                output_path.exists() and _same_file(data, output_path)):
            raise UsageError(f"{what} {output_path} would overwrite {data}, the input's external data file; "
                             "choose another output path")
    if data_file:
        pattern = _data_pattern(output_path.name, _name_max(output_path.parent))
        out_dir = os.path.realpath(output_path.parent)
        for data in inputs_data:
            if os.path.realpath(data.parent) == out_dir and pattern.fullmatch(data.name):
                raise UsageError(f"{what} {output_path}: the input's external data file {data} is named like the "
                                 "output's data files, which a save replaces or removes; choose another output path")
    _probe_writable(output_path.parent, what, output_path)


def check_dump_folder(input_path: str | os.PathLike[str] | None, folder: str | os.PathLike[str]) -> None:
    """Refuse a ``--dump-dir`` that is not a folder, holds the input model or its data, or cannot be written.

    Raises:
        UsageError: the path is an existing non-folder, or the input model or one of its data files is inside it.
        OutputError: the folder (or, when missing, its nearest existing parent) cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--dump-dir {folder} exists and is not a folder")
    input_path = Path(input_path) if input_path is not None else None  # None: a model given in memory
    inputs = [input_path, *_input_data_files(input_path)] if input_path is not None and input_path.is_file() else []
    real_folder = os.path.realpath(folder)
    for path in inputs:
        real = os.path.realpath(path)
        if os.path.commonpath([real_folder, real]) == real_folder:
            raise UsageError(f"--dump-dir {folder} holds {path}, the input model or its data; choose another folder")
    if folder.is_dir():
        protected = _Protected(inputs)
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if Path(entry.path) in protected:
                    raise UsageError(f"--dump-dir {folder} holds {entry.path}, a link to the input model or its "
                                     "data; choose another folder")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--dump-dir {folder}: {existing} is not a folder")
    _probe_writable(existing, "--dump-dir", folder)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _write_tensor(f: Any, tensor: Any) -> None:
    """Write one tensor's raw little-endian bytes at the file's current position (a kernel copy when mapped)."""
    tensor.tofile(f)


def _write_bytes(f: Any, blob: bytes) -> None:
    """Write the serialized model (or a report)."""
    f.write(blob)


def _align(offset: int, nbytes: int) -> int:
    io = _io()
    step = io._LARGE_ALIGNMENT if nbytes >= io._LARGE_TENSOR_BYTES else io._SMALL_ALIGNMENT
    return (offset + step - 1) // step * step


def _write_external_data(f: Any, slots: list[tuple[Any, Callable[[Any], None], bool]]
                         ) -> tuple[list[tuple[Callable[[Any], None], Any, int, int]], list[tuple[Any, Any, Any]]]:
    """Stream the big initializers into ``f``.

    Returns:
        (setter, tensor, offset, nbytes) of each tensor written, and the in-memory replacements of the external
        tensors that stay inline.
    """
    io = _io()
    placed: list[tuple[Callable[[Any], None], Any, int, int]] = []
    inline: list[tuple[Any, Any, Any]] = []
    offset = 0
    for tensor, setter, is_initializer in slots:
        nbytes = io._tensor_nbytes(tensor)
        if is_initializer and tensor.dtype != ir.DataType.STRING and nbytes >= io.EXTERNAL_MIN_TENSOR_BYTES:
            offset = _align(offset, nbytes)
            f.seek(offset)
            _write_tensor(f, tensor)
            placed.append((setter, tensor, offset, nbytes))
            offset += nbytes
        elif isinstance(tensor, ir.ExternalTensor):
            inline.append((setter, tensor, io._in_memory(tensor)))
    f.flush()
    end = f.seek(0, os.SEEK_END)
    if end != offset:
        raise OSError(errno.EIO, f"the external data file has {end} bytes, expected {offset}")
    return placed, inline


def _digest_fd(fd: int) -> str:
    """sha256 (hex) of the whole file behind ``fd``, read back in 1 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    offset = 0
    while True:
        n = os.preadv(fd, [buffer], offset) if hasattr(os, "preadv") else _pread_into(fd, buffer, offset)
        if n == 0:
            return digest.hexdigest()
        digest.update(view[:n])
        offset += n


def _pread_into(fd: int, buffer: bytearray, offset: int) -> int:  # pragma: no cover - systems without preadv
    chunk = os.pread(fd, len(buffer), offset)
    buffer[:len(chunk)] = chunk
    return len(chunk)


def _write_temp(fd: int, writer: Callable[[Any], Any]) -> Any:
    """Run ``writer`` on a buffered file over ``fd`` (left open: it holds the lock), then flush and fsync."""
    with os.fdopen(fd, "wb", closefd=False) as f:
        result = writer(f)
        f.flush()
        os.fsync(f.fileno())
    return result


def _commit(temps: list[Path], destinations: list[Path]) -> None:
    """Rename each temporary over its destination, the model last; once one is renamed, finish the rest."""
    done = 0
    try:
        for temp, destination in zip(temps, destinations, strict=True):
            os.replace(temp, destination)
            done += 1
    except BaseException:
        if done:  # the data file is in place: complete the commit so the model that references it goes live too
            for temp, destination in list(zip(temps, destinations, strict=True))[done:]:
                os.replace(temp, destination)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` through a locked temporary and a rename (reports, plots).

    Raises:
        UsageError: the path is a folder, a device, FIFO or socket, or in a missing folder.
        OutputError: the file cannot be written (full disk, read-only folder, permission, name too long).
    """
    path = Path(path).absolute()
    _check_destination(path, what)
    folder = path.parent
    with _temporaries() as temps, _write_errors(what, path):
        temps.append(_open_temp(folder, path.name))
        _write_temp(temps[0][0], lambda f: _write_bytes(f, data))
        with _folder_lock(folder) as locked, _signals_deferred():
            os.replace(temps[0][1], path)
            temps.committed = True
            if locked:
                _cleanup_stale(folder, path.name, keep=None, protected=_Protected([]), data=False)
            _fsync_folder(folder)


def save_model(model: ir.Model, output_path: str | os.PathLike[str], *,
               input_path: str | os.PathLike[str] | None = None) -> None:
    """Write the model atomically; external data ``<name>.<hash>.data`` when it is too large for one protobuf, or
    when the input model kept its weights in external data and the output's tensors exceed 64 MiB.

    The model object is left unchanged. Nothing is written in place: locked temporaries in the target folder are
    renamed over the destination once complete (data first, model last), and removed on any failure or interrupt.

    Raises:
        UsageError: the output is unsuitable (see :func:`check_output_path`) or would overwrite a file the model
            still reads its weights from.
        OutputError: the output cannot be written (full disk, read-only folder, permission, name too long).
        UnsupportedModelError: the part of the model that must stay inline exceeds the protobuf limit.
    """
    _save(model, Path(output_path), input_path=Path(input_path) if input_path is not None else None)


def _save(model: ir.Model, output_path: Path, *, input_path: Path | None = None,
          external: bool | None = None) -> None:
    io = _io()
    if input_path is not None:
        check_output_path(input_path, output_path)
    else:
        _check_destination(output_path)
    output_path = output_path.absolute()
    folder = output_path.parent
    slots = io._tensor_slots(model)
    read_files = [Path(t.path) for t, _, _ in slots if isinstance(t, ir.ExternalTensor)]
    for tensor, _, _ in slots:
        if isinstance(tensor, ir.ExternalTensor) and os.path.exists(tensor.path) and output_path.exists() \
                and _same_file(Path(tensor.path), output_path):
            raise UsageError(f"output {output_path} would overwrite {output_path}, which the model still reads "
                             f"tensor '{tensor.name}' from; choose another output path")
    inputs = [input_path, *_input_data_files(input_path)] if input_path is not None else []
    protected = _Protected([*inputs, *read_files])
    total = sum(io._tensor_nbytes(t) for t, _, _ in slots)
    if external is None:
        external = total > io.EXTERNAL_DATA_THRESHOLD or (
            total > io.EXTERNAL_LIKE_INPUT_BYTES and input_path is not None and input_path.is_file()
            and bool(_input_data_files(input_path)))
    data_name: str | None = None
    with _temporaries() as temps, _write_errors("output", output_path):
        if external:
            temps.append(_open_temp(folder, output_path.name))
            placed, replacements = _write_temp(temps[0][0], lambda f: _write_external_data(f, slots))
            data_name = data_file_name(output_path.name, _digest_fd(temps[0][0]), _name_max(folder))
            replacements += [(setter, old, ir.ExternalTensor(
                data_name, offset, nbytes, old.dtype, shape=ir.Shape(old.shape.numpy()), name=old.name,
                doc_string=old.doc_string, metadata_props=dict(old.metadata_props) or None, base_dir=str(folder)))
                for setter, old, offset, nbytes in placed]
            del placed
        else:
            replacements = [(setter, t, io._in_memory(t)) for t, setter, _ in slots
                            if isinstance(t, ir.ExternalTensor)]
        inline = total - sum(io._tensor_nbytes(old) for _, old, new in replacements
                             if isinstance(new, ir.ExternalTensor))
        if inline > io._PROTOBUF_LIMIT:
            raise UnsupportedModelError(f"cannot save {output_path}: {inline} bytes of tensors must stay inline "
                                        "(node attributes, strings), more than a protobuf file can hold")
        with io._swapped(replacements):
            blob = model_to_bytes(model)  # chunk by chunk: no whole-model proto next to the IR
        del replacements
        temps.append(_open_temp(folder, output_path.name))
        _write_temp(temps[-1][0], lambda f: _write_bytes(f, blob))
        blob = b""
        destinations = [output_path]
        if data_name is not None:
            data_path = folder / data_name
            if data_path in protected:
                raise UsageError(f"output {output_path}: its data file {data_path} is the input's or one the "
                                 "model reads; choose another output path")
            destinations.insert(0, data_path)
        with _folder_lock(folder) as locked, _signals_deferred():
            _commit([path for _, path in temps], destinations)
            temps.committed = True
            if locked:
                _cleanup_stale(folder, output_path.name, keep=data_name, protected=protected)
            _fsync_folder(folder)
    logger.info("saved %s%s", output_path, f" with external data {data_name}" if data_name else "")
