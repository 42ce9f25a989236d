"""Open files that a model, a recipe or a command line names, the way a hostile input cannot subvert.

Every open here is non-blocking (a FIFO or a device named as a model, data file or calibration file fails at once
instead of hanging the process), and what was opened is checked on the open descriptor with ``fstat``, not on the
path, so a file swapped between a check and the open cannot slip through: only a regular file passes.

:func:`open_regular` opens a file the user named (symlinks followed: users link their models). :func:`open_beneath`
opens a path *relative to a folder* one component at a time with ``openat`` and ``O_NOFOLLOW``: no symlink on the
way, no ``..``, no absolute path, and the file itself must have a single link (a hard link would let a model read
any file of the same filesystem). That is how external-data files are opened, both by the compiler and by the
runtime, which is why this module imports nothing but the standard library.

Limits: POSIX only (``openat`` through ``dir_fd``; on Windows the component walk falls back to a path open that
follows links, and the descriptor checks still apply). A location is split on ``/`` only: ``\\`` is a plain
character on POSIX, which is why :func:`location_problem` refuses it instead of guessing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

__all__ = ["FileIdentity", "SafeOpenError", "location_problem", "open_beneath", "open_regular", "opened_beneath",
           "opened_regular", "read_regular"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_HAS_DIR_FD = os.open in os.supports_dir_fd


class SafeOpenError(OSError):
    """The path cannot be opened safely; ``str(exc)`` says why in words meant for a user."""

    def __str__(self) -> str:
        return str(self.strerror)


class FileIdentity(tuple):
    """(device, inode, size) of an opened file: what a later open must find again."""

    __slots__ = ()

    def __new__(cls, st: os.stat_result) -> FileIdentity:
        return super().__new__(cls, (st.st_dev, st.st_ino, st.st_size))

    @property
    def size(self) -> int:
        return self[2]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


def _clear_nonblock(fd: int) -> None:
    """Regular files ignore O_NONBLOCK, but clear it so later reads behave like ordinary ones everywhere."""
    with contextlib.suppress(AttributeError, OSError):
        os.set_blocking(fd, True)


def _checked(fd: int, what: str, single_link: bool) -> tuple[int, os.stat_result]:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
            raise SafeOpenError(code, f"{what} is {_kind(st.st_mode)}, not a regular file")
        if single_link and st.st_nlink != 1:
            raise SafeOpenError(errno.EMLINK, f"{what} is a hard-linked file ({st.st_nlink} links)")
        _clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _checked_links(fd: int, st: os.stat_result, what: str) -> tuple[int, os.stat_result]:
    if st.st_nlink != 1:
        os.close(fd)
        raise SafeOpenError(errno.EMLINK, f"{what} is a hard-linked file ({st.st_nlink} links)")
    return fd, st


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "does not exist"
    if exc.errno == errno.ELOOP:
        return "is a symlink"
    if exc.errno == errno.ENOTDIR:
        return "goes through something that is not a folder"
    if exc.errno == errno.EACCES:
        return "cannot be read (permission denied)"
    return f"cannot be opened ({exc.strerror or exc})"


def open_regular(path: str | os.PathLike[str], *, what: str | None = None) -> tuple[int, os.stat_result]:
    """Open a user-named file read-only without blocking; return (fd, fstat) of a regular file.

    Symlinks are followed (the user named this path). Raises :class:`SafeOpenError` for a FIFO, device, socket or
    folder, and for a missing or unreadable file, with a message that starts with ``what`` (default: the path).
    """
    what = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except IsADirectoryError:
        raise SafeOpenError(errno.EISDIR, f"{what} is a folder, not a file") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO without a writer on some systems
            raise SafeOpenError(errno.ENXIO, f"{what} is not a regular file") from None
        raise SafeOpenError(exc.errno or errno.EIO, f"{what} {_describe(exc)}") from None
    return _checked(fd, what, single_link=False)


def read_regular(path: str | os.PathLike[str], *, limit: int, what: str | None = None) -> bytes:
    """The whole content of a user-named regular file (see :func:`open_regular`), at most ``limit`` bytes.

    Raises:
        SafeOpenError: as :func:`open_regular`; ``errno.EFBIG`` when the file holds more than ``limit`` bytes;
            ``errno.EAGAIN`` when what was read is not the size the descriptor reported (the file changed).
    """
    what = what or str(path)
    fd, st = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as file:
        if st.st_size > limit:
            raise SafeOpenError(errno.EFBIG, f"{what} is {st.st_size} bytes, more than the {limit} allowed")
        try:
            data = file.read(st.st_size + 1)  # one byte more than fstat said: a file that grew is noticed
        except OSError as exc:
            raise SafeOpenError(exc.errno or errno.EIO, f"{what} cannot be read ({exc.strerror or exc})") from None
    if len(data) != st.st_size:
        raise SafeOpenError(errno.EAGAIN, f"{what} changed while it was being read")
    return data


def location_problem(location: str) -> str | None:
    """Why a relative location (an ONNX external-data ``location``) is unacceptable on its own, or None."""
    if not location:
        return "has an empty location"
    if "\x00" in location:
        return "has a location with a NUL character"
    if location.startswith("/") or os.path.isabs(location) or (len(location) > 1 and location[1] == ":"):
        return f"has an absolute location {location!r}"
    if "\\" in location:
        return (f"has a location {location!r} with a backslash (ONNX locations separate folders with '/'; on "
                "this system '\\' would be part of a file name, elsewhere a separator)")
    parts = location.split("/")
    if ".." in parts:
        return f"has a location {location!r} that leaves the model's folder ('..')"
    if not [p for p in parts if p not in ("", ".")]:
        return f"has a location {location!r} that is not a file"
    return None


def open_beneath(folder: str | os.PathLike[str], location: str, *, what: str | None = None) -> tuple[int,
                                                                                                     os.stat_result]:
    """Open ``folder/location`` read-only, refusing symlinks on the way, ``..``, FIFOs, devices and hard links.

    Each component is opened relative to the previous one with ``O_NOFOLLOW`` (folders with ``O_DIRECTORY``), so
    nothing outside ``folder`` can be reached, whatever is swapped in meanwhile. Returns (fd, fstat) of a regular
    file with exactly one link. Raises :class:`SafeOpenError` with a message starting with ``what``.
    """
    what = what or repr(location)
    problem = location_problem(location)
    if problem:
        raise SafeOpenError(errno.EINVAL, f"{what} {problem}")
    parts = [p for p in location.split("/") if p not in ("", ".")]
    if not _HAS_DIR_FD:  # pragma: no cover - Windows
        path = os.path.join(os.fspath(folder), *parts)
        if os.path.islink(path):
            raise SafeOpenError(errno.ELOOP, f"{what} is a symlinked file")
        fd, st = open_regular(path, what=what)
        return _checked_links(fd, st, what)
    try:
        dir_fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise SafeOpenError(exc.errno or errno.EIO, f"the model's folder {os.fspath(folder)!r} "
                                                    f"{_describe(exc)}") from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                next_fd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                sub = "/".join(parts[: i + 1])
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    try:
                        mode = os.lstat(part, dir_fd=dir_fd).st_mode
                    except OSError:
                        mode = 0
                    reason = "a symlinked folder" if stat.S_ISLNK(mode) else "not a folder"
                    raise SafeOpenError(exc.errno, f"{what} goes through {sub!r}, which is {reason}") from None
                raise SafeOpenError(exc.errno or errno.EIO, f"{what} goes through {sub!r}, which "
                                                            f"{_describe(exc)}") from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's O_NOFOLLOW on a link
                raise SafeOpenError(errno.ELOOP, f"{what} is a symlinked file") from None
            if exc.errno == errno.EISDIR:
                raise SafeOpenError(errno.EISDIR, f"{what} is a folder, not a file") from None
            if exc.errno == errno.ENXIO:
                raise SafeOpenError(errno.ENXIO, f"{what} is not a regular file") from None
            raise SafeOpenError(exc.errno or errno.EIO, f"{what} {_describe(exc)}") from None
    finally:
        os.close(dir_fd)
    return _checked(fd, what, single_link=True)


@contextlib.contextmanager
def opened_regular(path: str | os.PathLike[str], mode: str = "rb", *, what: str | None = None) -> Iterator:
    """:func:`open_regular` as a context manager yielding a file object (``mode`` "rb" or "r")."""
    fd, _ = open_regular(path, what=what)
    with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as file:
        yield file


@contextlib.contextmanager
def opened_beneath(folder: str | os.PathLike[str], location: str, *, what: str | None = None) -> Iterator:
    """:func:`open_beneath` as a context manager yielding a binary file object."""
    fd, _ = open_beneath(folder, location, what=what)
    with os.fdopen(fd, "rb") as file:
        yield file
