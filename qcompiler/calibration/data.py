"""Calibration data: reading, checking and batching the sample inputs that calibration feeds to the model.

Accepted forms of ``path``:

- an ``.npz`` whose keys are the model's graph input names and whose arrays all share the first axis, which
  indexes samples (the first axis *is* the model's batch axis: an input of shape ``[B, 3, 224, 224]`` takes arrays of
  shape ``[N, 3, 224, 224]``);
- a folder of such ``.npz`` files (or ``.npy`` files for a one-input model), read in sorted name order and
  concatenated lazily;
- a single ``.npy`` when the model has exactly one input;
- from Python (``compile_model(calib=...)``), a mapping ``{input name: numpy array}`` laid out like an ``.npz``: the
  arrays are checked exactly like a file's (names, dtypes, shapes, NaN/Inf, sample counts) and then only read,
  through read-only views (the caller's arrays are never written to or copied whole). A mapping that holds only
  ``input_ids`` for a decoder is completed like a token-id file (:mod:`qcompiler.calibration.text`).

Files are opened and read by :mod:`qcompiler.calibration._numpy_files`: a non-blocking open checked with ``fstat``
(a FIFO, device or socket is refused, never waited on), headers before data (an array declaring more than its file
holds, or a file declaring more than half the physical memory, is refused before anything is allocated), never a
pickle. A file the user names is opened as named (symlinks followed); the ``.npz``/``.npy`` files *inside* a
calibration folder are opened like a model's external data: no symlink, no FIFO or device, a single link (name
such a file directly to use it). A file is reopened for each pass over the data and must still be the very file
(device, inode, size) that was checked. ``.npy`` files are memory-mapped, ``.npz`` members are read one key of
one file at a time, so memory stays bounded by one file's arrays plus one batch. Checks, all done up front: input names
(missing and unknown ones listed), dtypes (exactly the input's element type, no silent casts), shapes (rank and every
static dimension but the batch axis; symbolic dimensions are free), NaN/Inf (naming the input and the sample index),
at least one sample. A model whose batch dimension is the integer 1 is fed one sample at a time; one whose batch
dimension is a fixed ``B > 1`` is fed batches of exactly ``B`` (a partial last batch is dropped with a warning).
Every problem is a one-line :class:`~qcompiler.errors.CalibrationError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.calibration._numpy_files import NumpyFile, open_numpy
from qcompiler.errors import CalibrationError
from qcompiler.runtime._safe_files import FileIdentity

__all__ = ["CalibrationData", "load_calibration_data"]

logger = logging.getLogger(__name__)

_SCAN_ROWS = 1 << 22  # elements per NaN/Inf scan step


@dataclasses.dataclass(frozen=True)
class _InputInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: unknown rank; None entries: symbolic dims


@dataclasses.dataclass(frozen=True)
class _Source:
    path: Path
    kind: str  # "npz", "npy" or "memory" (a mapping given from Python)
    num_samples: int
    in_folder: bool = False  # opened beneath its folder (an entry of a calibration folder)
    identity: FileIdentity | None = None  # what was checked; a reopened file must be the same
    arrays: Mapping[str, np.ndarray] | None = None  # kind "memory": read-only views of the caller's arrays


def _model_inputs(model: ir.Model) -> list[_InputInfo]:
    infos = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise CalibrationError(f"graph input '{value.name}' has no element type: cannot check calibration data")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except Exception as exc:
            raise CalibrationError(f"graph input '{value.name}' has type {value.dtype}, which calibration data "
                                   "cannot hold") from exc
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else None for d in value.shape)
        infos.append(_InputInfo(value.name, dtype, shape))
    if not infos:
        raise CalibrationError("the model has no graph inputs to calibrate")
    return infos


def _open(path: Path, in_folder: bool, expect: FileIdentity | None = None) -> contextlib.AbstractContextManager[
        NumpyFile]:
    """Open one calibration file: as named, or (an entry of a calibration folder) beneath its folder."""
    if in_folder:
        return open_numpy(path.name, folder=path.parent, label=f"calibration file {path}", expect=expect)
    return open_numpy(path, label=f"calibration file {path}", expect=expect)


def _check_array(arr: np.ndarray, info: _InputInfo, source: str, first_index: int) -> int:
    """Check one input's array from one file (``source``: its name, for messages); return its number of samples."""
    where = f"calibration data for input '{info.name}' ({source})"
    if arr.dtype.hasobject:
        raise CalibrationError(f"{where} holds Python objects; only numeric arrays are accepted")
    if arr.dtype != info.dtype:
        raise CalibrationError(f"{where} has dtype {arr.dtype}, expected {info.dtype} (the input's type; "
                               "convert the data, nothing is cast silently)")
    if arr.ndim == 0:
        raise CalibrationError(f"{where} is a scalar; the first axis must index samples")
    if info.shape is not None:
        if len(info.shape) == 0:
            if arr.ndim != 1:
                raise CalibrationError(f"{where} has shape {arr.shape}; the input is a scalar, so expected [N]")
        else:
            if arr.ndim != len(info.shape):
                raise CalibrationError(f"{where} has shape {list(arr.shape)} (rank {arr.ndim}), expected rank "
                                       f"{len(info.shape)} like the input {_format_shape(info.shape)} with samples "
                                       "along the first axis")
            for axis, (want, got) in enumerate(zip(info.shape[1:], arr.shape[1:], strict=True), start=1):
                if want is not None and want != got:
                    raise CalibrationError(f"{where} has shape {list(arr.shape)}, but the input's dimension {axis} "
                                           f"is {want} (input shape {_format_shape(info.shape)})")
    n = int(arr.shape[0])
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)))
        step = max(1, _SCAN_ROWS // row)
        for start in range(0, n, step):
            part = np.asarray(arr[start:start + step]).reshape(min(step, n - start), -1)
            finite = np.isfinite(part).all(axis=1)
            if not finite.all():
                local = int(np.argmin(finite))
                kind = "NaN" if np.isnan(part[local]).any() else "Inf"
                raise CalibrationError(f"{where}: sample {first_index + start + local} contains {kind}")
    return n


def _format_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class CalibrationData:
    """Checked calibration samples, read lazily file by file.

    Attributes:
        input_names: the model's graph inputs that the data feeds, in graph order.
        num_samples: the number of samples over all files.
    """

    def __init__(self, sources: list[_Source], inputs: list[_InputInfo]) -> None:
        self._sources = sources
        self._inputs = inputs
        self.input_names: tuple[str, ...] = tuple(i.name for i in inputs)
        self.num_samples: int = sum(s.num_samples for s in sources)
        self.fixed_batch: int | None = self._fixed_batch()

    def _fixed_batch(self) -> int | None:
        fixed = set()
        for info in self._inputs:
            if info.shape is not None and len(info.shape) == 0:
                fixed.add(1)
            elif info.shape and info.shape[0] is not None:
                fixed.add(info.shape[0])
        if len(fixed) > 1:
            raise CalibrationError(f"the model's inputs have different fixed batch sizes {sorted(fixed)}")
        return fixed.pop() if fixed else None

    def __repr__(self) -> str:
        return f"CalibrationData(inputs={list(self.input_names)}, num_samples={self.num_samples})"

    def _read_source(self, source: _Source) -> dict[str, np.ndarray]:
        if source.arrays is not None:
            return {name: source.arrays[name] for name in self.input_names}
        with _open(source.path, source.in_folder, source.identity) as file:
            if source.kind == "npy":
                return {self.input_names[0]: file.read(None, mmap=True)}
            return {name: file.read(name) for name in self.input_names}

    def iter_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds ``{input name: array}`` of ``batch_size`` samples along the first axis.

        A model with a fixed batch dimension gets batches of exactly that size whatever ``batch_size`` says (a
        scalar input or a batch dimension of 1: one sample at a time).

        Args:
            batch_size: samples per batch (the last batch may be smaller when the batch axis is free).
            max_samples: stop after this many samples (None: all).
        """
        if batch_size < 1:
            raise CalibrationError(f"batch size must be positive, got {batch_size}")
        size = self.fixed_batch or batch_size
        limit = self.num_samples if max_samples is None else min(max_samples, self.num_samples)
        scalar = {i.name for i in self._inputs if i.shape is not None and len(i.shape) == 0}
        pending: list[dict[str, np.ndarray]] = []
        pending_n = 0
        emitted = 0

        def flush(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            feed = {}
            for name in self.input_names:
                arrays = [p[name] for p in parts]
                joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                feed[name] = np.ascontiguousarray(joined[0] if name in scalar else joined)
            return feed

        for source in self._sources:
            if emitted + pending_n >= limit:
                break
            arrays = self._read_source(source)
            start = 0
            while start < source.num_samples and emitted + pending_n < limit:
                take = min(size - pending_n, source.num_samples - start, limit - emitted - pending_n)
                pending.append({k: v[start:start + take] for k, v in arrays.items()})
                pending_n += take
                start += take
                if pending_n == size:
                    yield flush(pending)
                    emitted += pending_n
                    pending, pending_n = [], 0
            del arrays
        if pending_n:
            if self.fixed_batch is not None and self.fixed_batch > 1:
                logger.warning("dropping the last %d calibration samples: the model's batch size is fixed at %d",
                               pending_n, self.fixed_batch)
            else:
                yield flush(pending)


def _list_files(path: Path) -> list[tuple[Path, bool]]:
    """The calibration files to read, each with whether it is an entry of a calibration folder."""
    if path.is_dir():
        try:
            names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1] in (".npz", ".npy"))
        except OSError as exc:
            raise CalibrationError(f"calibration folder {path} cannot be listed ({exc.strerror or exc})") from None
        if not names:
            raise CalibrationError(f"calibration folder {path} holds no .npz or .npy files")
        return [(path / n, True) for n in names]
    if not path.exists() and not path.is_symlink():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.suffix not in (".npz", ".npy"):
        raise CalibrationError(f"calibration data must be an .npz, an .npy or a folder of them, got {path}")
    return [(path, False)]


def load_calibration_data(path: str | os.PathLike[str] | Mapping[str, np.ndarray],
                          model: ir.Model) -> CalibrationData:
    """Open and check calibration data for ``model``: a path, or a mapping ``{input name: array}`` (see the module
    docstring for the accepted forms).

    Raises:
        CalibrationError: anything wrong with the data, in one line.
    """
    if isinstance(path, Mapping):
        return _from_mapping(path, model)
    if not isinstance(path, (str, os.PathLike)):
        raise CalibrationError(f"calibration data must be a path (an .npz, an .npy or a folder of them) or a mapping "
                               f"{{input name: numpy array}}, got {type(path).__name__}")
    inputs = _model_inputs(model)
    sources: list[_Source] = []
    offset = 0
    for file_path, in_folder in _list_files(Path(path)):
        with _open(file_path, in_folder) as file:
            counts = _check_file(file, file_path, inputs, offset)
            kind, identity = file.kind, file.identity
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise CalibrationError(f"calibration file {file_path.name}: the inputs have different numbers of samples "
                                   f"({detail})")
        n = next(iter(counts.values()))
        sources.append(_Source(file_path, kind, n, in_folder, identity))
        offset += n
    return _checked(CalibrationData(sources, inputs), str(path))


def _checked(data: CalibrationData, label: str) -> CalibrationData:
    """``data`` once it holds at least one sample and at least one fixed batch (``label`` names it in messages)."""
    if data.num_samples == 0:
        raise CalibrationError(f"calibration data {label} holds zero samples")
    if data.fixed_batch is not None and data.fixed_batch > data.num_samples:
        raise CalibrationError(f"calibration data {label} holds {data.num_samples} samples, fewer than the model's "
                               f"fixed batch size {data.fixed_batch}")
    logger.info("calibration data %s: %d samples for %s", label, data.num_samples, ", ".join(data.input_names))
    return data


_MAPPING = "calib mapping"


def _from_mapping(arrays: Mapping[Any, Any], model: ir.Model) -> CalibrationData:
    """Check a mapping ``{input name: array}`` like an ``.npz`` (see the module docstring)."""
    inputs = _model_inputs(model)
    names = [i.name for i in inputs]
    bad_keys = [k for k in arrays if not isinstance(k, str)]
    if bad_keys:
        raise CalibrationError(f"{_MAPPING}: key {bad_keys[0]!r} is not an input name (a string); the model's "
                               f"inputs: {', '.join(names)}")
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise CalibrationError(f"calibration data for input '{key}' ({_MAPPING}) is a {type(value).__name__}, "
                                   "not a numpy array (convert it with numpy.asarray and the input's dtype)")
    views: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        view = value.view()
        view.flags.writeable = False  # passes read batches of it: none may write into the caller's array
        views[key] = view
    views = _complete_token_ids(views, model, names)
    missing = [n for n in names if n not in views]
    unknown = sorted(k for k in views if k not in names)
    if missing or unknown:
        parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown name(s) {', '.join(unknown)}"] if unknown else [])
        raise CalibrationError(f"{_MAPPING}: {'; '.join(parts)} (the model's inputs: {', '.join(names)})")
    counts = {info.name: _check_array(views[info.name], info, _MAPPING, 0) for info in inputs}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise CalibrationError(f"{_MAPPING}: the inputs have different numbers of samples ({detail})")
    n = next(iter(counts.values()))
    source = _Source(Path(_MAPPING), "memory", n, arrays={name: views[name] for name in names})
    return _checked(CalibrationData([source], inputs), _MAPPING)


def _complete_token_ids(arrays: dict[str, np.ndarray], model: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
    """Token ids alone (``input_ids`` ``[N, S]`` of integers) for a decoder with more inputs: cast to the input's
    type and completed with a prefill's mask, positions and empty KV cache, as a token-id file is; else as given."""
    ids = arrays.get("input_ids")
    if list(arrays) != ["input_ids"] or "input_ids" not in names or len(names) == 1 or ids is None or \
            ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        return arrays
    from qcompiler.calibration.text import complete_decoder_inputs

    value = next(v for v in model.graph.inputs if v.name == "input_ids")
    dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.int64)
    return complete_decoder_inputs(model, {"input_ids": ids.astype(dtype)})


def _check_file(file: NumpyFile, path: Path, inputs: list[_InputInfo], offset: int) -> dict[str, int]:
    """Check one opened file against the model's inputs; return the number of samples per input."""
    names = [i.name for i in inputs]
    if file.kind == "npy":
        if len(inputs) != 1:
            raise CalibrationError(f"calibration file {path} is an .npy, but the model has {len(inputs)} inputs "
                                   f"({', '.join(names)}): use an .npz keyed by input name")
        return {names[0]: _check_array(file.read(None, mmap=True), inputs[0], path.name, offset)}
    keys = file.keys()
    missing = [n for n in names if n not in keys]
    unknown = sorted(k for k in keys if k not in names)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown name(s) {', '.join(unknown)}")
        raise CalibrationError(f"calibration file {path.name}: {'; '.join(parts)} "
                               f"(the model's inputs: {', '.join(names)})")
    counts = {}
    for info in inputs:
        arr = file.read(info.name)
        counts[info.name] = _check_array(arr, info, path.name, offset)
        del arr
    return counts
