"""On-disk cache of raw calibration statistics, so re-lowering with other options skips the ONNX Runtime run.

What is stored: for each observed value, the raw running statistics from which every calibrator computes its range:
the exact MinMax state (:meth:`~qcompiler.calibration.observers.MinMaxObserver.to_arrays`) and the full histogram
state (:meth:`~qcompiler.calibration.histogram.Histogram.to_arrays`: counts, width exponent, first cell, count,
zeros, min/max, flags). A range is chosen only afterwards, so a cached run serves ``minmax``, ``percentile`` (any
percentile), ``entropy`` and ``mse`` alike, for any activation dtype, and the range of a cache hit is bit-identical
to a fresh run's: the restored observer holds exactly the state the fresh observer would have built.

The key is the SHA-256 of a small JSON manifest of SHA-256 digests:

- ``graph``: the deterministic serialization of the whole model (graph topology, op types, attributes, value names
  and types, opset imports, functions) with every initializer replaced by a stub of the same name, type and shape,
  so no weight byte is serialized;
- ``weights``: every initializer's bytes, tensor by tensor in graph order (external data is streamed from its file
  in bounded chunks, in-memory arrays are hashed in chunks of rows without a copy of the whole tensor);
- ``data``: the calibration batches exactly as they are fed (input names, dtypes, shapes and bytes of every batch),
  plus ``batch_size`` and ``max_samples``: the file paths are not used, their content is;
- ``observed``: the names of the observed values, in order; plus ``bins`` (histogram size), the cache ``format``
  version and the ``onnxruntime`` version (which computes the activations).

Not in the key, on purpose: the calibrator, the percentile, the activation dtype and symmetric flag (only the range
estimation depends on them); the thread count.

A cache file is ``calib-<key>.npz`` in the cache folder, written atomically (a temporary file in that folder, then
``os.replace``) and read back through :mod:`qcompiler.calibration._numpy_files` (opened beneath the folder without
following a symlink, never a FIFO or device, one link; array headers checked before any allocation; no pickle). A file that is unreadable, truncated, holds another key, other
names or an inconsistent state is ignored with a logged warning and recomputed (then overwritten); a file that
cannot be written is a warning too. Nothing here ever raises on a cache problem except an unusable cache folder.

Limits: tensors held in node attributes (``Constant``) are hashed through the serialized graph (inline, not
streamed); the key also changes with anything else in the graph (node names, doc strings), which only costs a miss.
Entries are never evicted; delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.calibration._numpy_files import open_numpy
from qcompiler.calibration.histogram import DEFAULT_BINS, Histogram
from qcompiler.calibration.observers import (
    HistogramObserver,
    MinMaxObserver,
    Observer,
    fold_batches,
    make_observer,
)
from qcompiler.errors import CalibrationError

__all__ = [
    "FORMAT_VERSION",
    "CalibrationStatistics",
    "collect_statistics",
    "cache_key",
    "cache_path",
    "open_cache_dir",
    "load_statistics",
    "save_statistics",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the stored layout or the meaning of a statistic changes (old files then simply miss).
FORMAT_VERSION = 1
_CHUNK_BYTES = 1 << 24  # bytes hashed per step
_STUB_LOCATION = "__qcompiler_fingerprint__"
_STATE_KEYS = ("minmax.floats", "minmax.ints", "hist.counts", "hist.ints", "hist.floats")


class CalibrationStatistics:
    """The raw statistics of one observed value: the exact MinMax state and a histogram, enough for any calibrator.

    Args:
        bins: histogram bins (as the histogram observers use).
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        self.minmax = MinMaxObserver()
        self.histogram = Histogram(bins)

    def update(self, array: np.ndarray) -> None:
        """Fold one batch into both statistics (the array is not kept)."""
        self.minmax.update(array)
        self.histogram.update(array)

    def observer(self, spec: Any) -> Observer:
        """A new observer as ``spec`` (an :class:`~qcompiler.qspec.ObserverSpec`) describes it, holding these
        statistics, as if it had seen the batches itself.

        Raises:
            ValueError: an unknown kind, or one that is neither MinMax nor histogram-based.
        """
        kind = spec.kind
        if kind == MinMaxObserver.name:
            return MinMaxObserver.from_arrays(self.minmax.to_arrays())
        observer = make_observer(kind, percentile=spec.percentile, bins=self.histogram.bins)
        if not isinstance(observer, HistogramObserver):
            raise ValueError(f"observer {kind!r} cannot be served from cached statistics")
        observer.histogram = Histogram.from_arrays(self.histogram.to_arrays())
        return observer

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays by key (see :data:`_STATE_KEYS`)."""
        arrays = {f"minmax.{k}": v for k, v in self.minmax.to_arrays().items()}
        arrays.update((f"hist.{k}", v) for k, v in self.histogram.to_arrays().items())
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CalibrationStatistics:
        """Rebuild from :meth:`to_arrays`; raises ValueError for an inconsistent state."""
        stats = cls.__new__(cls)
        stats.minmax = MinMaxObserver.from_arrays({k[7:]: v for k, v in arrays.items() if k.startswith("minmax.")})
        stats.histogram = Histogram.from_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("hist.")})
        return stats


def collect_statistics(session: Any, output_names: Sequence[str], batches: Iterable[dict[str, np.ndarray]],
                       on_batch: Callable[[int], None] | None = None,
                       bins: int = DEFAULT_BINS) -> dict[str, CalibrationStatistics]:
    """Feed every batch to the observer session and fold each output into its :class:`CalibrationStatistics`.

    The same loop as :func:`qcompiler.passes.observe.run_observers` (:func:`fold_batches`), with statistics that
    serve every calibrator.
    """
    stats = {name: CalibrationStatistics(bins) for name in dict.fromkeys(output_names)}
    fold_batches(session, stats, batches, on_batch)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------------------------
class _HashWriter:
    """A write-only file object that feeds a hash (what ``ExternalTensor.tofile`` streams into)."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self.written = 0

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.written += len(chunk)
        return len(chunk)


def _field(digest: Any, text: str) -> None:
    """A length-prefixed text field (so that consecutive fields cannot run into each other)."""
    blob = text.encode("utf-8")
    digest.update(len(blob).to_bytes(8, "little"))
    digest.update(blob)


def _hash_array(digest: Any, array: np.ndarray) -> int:
    """Feed the array's little-endian bytes in blocks of rows of at most about 16 MiB; return the byte count."""
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.ndim == 0:
        a = a.reshape(1)
    row_bytes = max(1, a.nbytes // max(1, a.shape[0]))
    rows = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, a.shape[0], rows):
        digest.update(np.ascontiguousarray(a[start:start + rows]).view(np.uint8))
    return int(a.nbytes)


def _hash_tensor(digest: Any, tensor: Any) -> int:
    """Feed the tensor's serialized bytes (what ``tobytes()`` returns) without holding a big copy of them."""
    if isinstance(tensor, ir.ExternalTensor):
        writer = _HashWriter(digest)
        tensor.tofile(writer)  # bounded chunks read from the file; no memory map
        return writer.written
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, np.ndarray) and raw.dtype.itemsize * 8 == tensor.dtype.bitwidth:
        return _hash_array(digest, raw)
    blob = tensor.tobytes()  # packed sub-byte types, protobuf-backed and other tensors: already in memory
    digest.update(blob)
    return len(blob)


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph under it, in a deterministic order."""
    yield graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH and attr.value is not None:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS and attr.value is not None:
                yield from attr.value


def _graph_digest(model: ir.Model) -> str:
    """SHA-256 of the model serialized with every initializer stubbed (a clone is stubbed; the model is untouched)."""
    clone = model.clone()
    for graph in _graphs(clone.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                value.const_value = ir.ExternalTensor(_STUB_LOCATION, 0, int(tensor.nbytes), tensor.dtype,
                                                      shape=ir.Shape(tensor.shape.numpy()), name=value.name or "")
    blob = ir.serde.serialize_model(clone).SerializeToString(deterministic=True)
    return hashlib.sha256(blob).hexdigest()


def _weights_digest(model: ir.Model) -> str:
    """SHA-256 over every initializer's name, type, shape and bytes, tensor by tensor."""
    digest = hashlib.sha256()
    for graph in _graphs(model.graph):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                _field(digest, json.dumps([name, None]))
                continue
            _field(digest, json.dumps([name, tensor.dtype.name, list(tensor.shape.numpy())]))
            written = _hash_tensor(digest, tensor)
            _field(digest, str(written))
    return digest.hexdigest()


def data_digest(data: Any, batch_size: int, max_samples: int | None) -> str:
    """SHA-256 over the batches that calibration feeds (names, dtypes, shapes, bytes) and how they are cut.

    Also the provenance hash that ``compile_model`` writes into the output's metadata."""
    digest = hashlib.sha256()
    _field(digest, json.dumps({"inputs": list(data.input_names), "batch_size": batch_size,
                               "max_samples": max_samples}))
    for feed in data.iter_batches(batch_size, max_samples):
        for name in sorted(feed):
            array = feed[name]
            _field(digest, json.dumps([name, array.dtype.str, list(array.shape)]))
            _hash_array(digest, array)
    return digest.hexdigest()


def cache_key(model: ir.Model, names: Sequence[str], data: Any, *, batch_size: int, max_samples: int | None,
              bins: int = DEFAULT_BINS) -> tuple[str, dict[str, Any]]:
    """The cache key of observing ``names`` in ``model`` over ``data`` (see the module docstring).

    Args:
        model: the model as calibration sees it (not modified).
        names: the observed value names, in order.
        data: a :class:`~qcompiler.calibration.data.CalibrationData`.
        batch_size: samples per ONNX Runtime call.
        max_samples: the sample limit (None: all).
        bins: histogram bins.

    Returns:
        the hex key and the manifest it is the SHA-256 of.
    """
    import onnxruntime

    manifest = {
        "format": FORMAT_VERSION,
        "graph": _graph_digest(model),
        "weights": _weights_digest(model),
        "data": data_digest(data, batch_size, max_samples),
        "observed": hashlib.sha256(json.dumps(list(names)).encode("utf-8")).hexdigest(),
        "bins": bins,
        "onnxruntime": onnxruntime.__version__,
    }
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()
    return key, manifest


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def open_cache_dir(folder: str | os.PathLike[str]) -> Path:
    """The cache folder, created when missing.

    Raises:
        CalibrationError: it exists and is not a folder, or cannot be created.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"calibration cache folder {path}: cannot create it ({exc.strerror or exc})") from exc
    return path


def cache_path(folder: str | os.PathLike[str], key: str) -> Path:
    """Where the statistics of ``key`` live in ``folder``."""
    return Path(folder) / f"calib-{key}.npz"


def load_statistics(folder: str | os.PathLike[str], key: str,
                    names: Sequence[str]) -> dict[str, CalibrationStatistics] | None:
    """The cached statistics of ``key``, or None (missing, or unusable: then a warning says why)."""
    path = cache_path(folder, key)
    if not os.path.lexists(path):
        return None
    try:
        # beneath the folder: no symlink, no FIFO or device, one link; headers checked before reading (bounded)
        with open_numpy(path.name, folder=folder, label=f"calibration cache {path}") as archive:
            if archive.kind != "npz":
                raise ValueError("not an .npz archive")
            arrays = {k: archive.read(k) for k in archive.keys()}
        if arrays["format"].tolist() != [FORMAT_VERSION]:
            raise ValueError(f"format {arrays['format'].tolist()}, expected [{FORMAT_VERSION}]")
        if str(arrays["key"][()]) != key:
            raise ValueError("it holds another key")
        if arrays["names"].tolist() != list(names):
            raise ValueError("it holds other observed values")
        stats = {name: CalibrationStatistics.from_arrays({k: arrays[f"v{i}.{k}"] for k in _STATE_KEYS})
                 for i, name in enumerate(names)}
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, the statistics are recomputed
        logger.warning("calibration cache %s is unusable (%s: %s); recomputing it", path, type(exc).__name__,
                       " ".join(str(exc).split())[:200])
        return None
    logger.info("calibration cache hit: %s", path)
    return stats


def save_statistics(folder: str | os.PathLike[str], key: str, names: Sequence[str],
                    stats: dict[str, CalibrationStatistics], manifest: dict[str, Any] | None = None) -> Path | None:
    """Write the statistics of ``key`` atomically (temporary file in ``folder``, then rename).

    Returns:
        the file, or None when it could not be written (a warning says why; calibration goes on).
    """
    folder = Path(folder)
    path = cache_path(folder, key)
    arrays: dict[str, np.ndarray] = {
        "format": np.array([FORMAT_VERSION], dtype=np.int64),
        "key": np.array(key),
        "names": np.array(list(names), dtype=np.str_),
        "manifest": np.array(json.dumps(manifest or {}, sort_keys=True)),
    }
    for i, name in enumerate(names):
        arrays.update((f"v{i}.{k}", v) for k, v in stats[name].to_arrays().items())
    temp: Path | None = None
    try:
        fd, temp = io._open_temp(folder, path.name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        temp = None
        io._fsync_folder(folder)
    except OSError as exc:
        logger.warning("cannot write the calibration cache %s (%s); calibration goes on without it", path, exc)
        return None
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.remove(temp)
    logger.info("calibration cache written: %s", path)
    return path
