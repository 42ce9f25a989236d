"""Run a compiled model file with ONNX Runtime: a thin, checked wrapper around ``onnxruntime.InferenceSession``.

This module imports only the standard library, numpy and onnxruntime, so that an application can run qcompiler's
output without the compiler's dependencies (onnx, onnx_ir, networkx, torch). ``Session(path, device="cuda")``
runs the same file on qcompiler's GPU executor instead (:mod:`qcompiler.runtime.cuda`, which imports torch and
onnx when, and only when, it is asked for), behind the same inputs, outputs, feed checks and numpy results.

The file is read once and checked before ONNX Runtime sees it (:mod:`._model_file`): every external-data reference,
wherever it sits, must name a regular, singly linked file beneath the model's folder reached without symlinks, and
ORT gets those very bytes (the model as a buffer, the data as in-memory files), so it opens nothing by path. Its
opset imports and metadata are read (:mod:`._onnx_scan`, without parsing the weights). A model that imports qcompiler's own domain (``ai.qcompiler``: the int3 and fused FP8 matmuls of
:mod:`qcompiler.runtime.custom_ops`) is checked against this runtime's operator set (its version, the op names,
their input counts) and its ops are registered through onnxruntime-extensions (with ORT's spinning workers off:
they would steal the cores from the ops' BLAS threads); every refusal is one line.

:meth:`Session.run` takes a dict of numpy arrays keyed by input name and returns a dict keyed by output name (in the
model's output order). Feeds are checked before ORT sees them: unknown or missing names, wrong
element types and wrong ranks or fixed dimensions raise :class:`InvalidFeedError` with one clear line. Feeds are
never cast silently. Limits: tensor inputs only (no sequence, map or optional inputs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompiler.runtime import custom_ops
from qcompiler.runtime._model_file import ModelFileError, open_model_file
from qcompiler.runtime._onnx_scan import ModelScan, scan_blob

__all__ = ["AUTO_PROVIDERS", "Session", "TensorInfo", "SessionError", "InvalidFeedError"]

#: what ``providers="auto"`` tries before the CPU, in order: the GPU providers whose kernels cover the contrib ops
#: the recipes write (MatMulNBits, GatherBlockQuantized, QDQ); ORT falls back to the CPU node by node otherwise
AUTO_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")

logger = logging.getLogger(__name__)

# ORT's type strings to numpy dtypes (types numpy cannot hold, e.g. bfloat16, map to None).
_ORT_TYPES: dict[str, np.dtype | None] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


class SessionError(RuntimeError):
    """The model cannot be loaded or run."""


class InvalidFeedError(SessionError):
    """The inputs given to :meth:`Session.run` do not match the model's inputs."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One model input or output.

    Attributes:
        name: the tensor's name.
        shape: the dimensions: an int when fixed, a str (symbolic name) or None when dynamic.
        type: ORT's type string, e.g. ``tensor(float)``.
        dtype: the numpy dtype, or None when numpy has none (e.g. ``tensor(bfloat16)``) or it is not a tensor.
    """

    name: str
    shape: tuple[int | str | None, ...]
    type: str
    dtype: np.dtype | None


def _tensor_info(name: str, shape: tuple[int | str | None, ...], type_: str) -> TensorInfo:
    return TensorInfo(name, shape, type_, _ORT_TYPES.get(type_))


def _info(arg: Any) -> TensorInfo:
    return _tensor_info(arg.name, tuple(arg.shape) if arg.shape is not None else (), arg.type)


class Session:
    """An ONNX Runtime session over a model file.

    Args:
        path: the ``.onnx`` file (external data is read from its folder).
        providers: ORT execution providers, in order of preference (default: CPU only), or ``"auto"``: those of
            :data:`AUTO_PROVIDERS` this onnxruntime build has, in that order, CPU last (a model with qcompiler's
            custom ops stays on the CPU: its kernels are numpy).
        intra_op_threads: threads used inside one operator (None: ORT's default). Our custom ops run numpy, whose
            BLAS threads follow ``OPENBLAS_NUM_THREADS`` (and the like) instead.
        inter_op_threads: threads used across operators (None: ORT's default).
        device: ``"cpu"`` (ONNX Runtime), ``"cuda"`` / ``"cuda:N"`` (qcompiler's GPU executor: our Triton kernels
            for the quantized ops, PyTorch for the rest, CUDA graphs; needs torch and triton, imported only then),
            or ``"torch-cpu"`` (the same executor on the CPU with torch ops: checks a model's GPU path on a machine
            without a GPU).
        cuda_graphs: on CUDA, replay each input signature from a CUDA graph after its first run.

    Raises:
        SessionError: the file is missing or not a regular file, an external-data reference is refused (outside the
            folder, through a symlink, a hard link, a FIFO, out of bounds), it uses ``ai.qcompiler`` ops this
            runtime cannot run (a newer opset, an unknown op, onnxruntime-extensions not installed), a provider is
            not available, or ORT cannot load it.
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | str | None = None, *,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None, device: str = "cpu",
                 cuda_graphs: bool = True) -> None:
        self.path = Path(path)
        try:
            self._file = open_model_file(self.path)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        scan = self._scan()
        self._opsets = dict(scan.opsets) if scan is not None else {}
        self._custom_ops = self._check_custom_ops(scan) if scan is not None else ()
        self.device = device
        self._gpu: Any = None
        if device != "cpu":
            if providers is not None:
                raise SessionError(f"providers are ONNX Runtime's: they go with device='cpu', not {device!r}")
            self._start_gpu(device, cuda_graphs)
            self._file = None  # the executor holds its weights
            return
        available = ort.get_available_providers()
        if providers == "auto":
            wanted = [p for p in AUTO_PROVIDERS if p in available and not self._custom_ops] + ["CPUExecutionProvider"]
        elif isinstance(providers, str):
            raise SessionError(f"providers must be a list of ONNX Runtime execution providers or 'auto', got "
                               f"{providers!r}")
        else:
            wanted = list(providers) if providers is not None else ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise SessionError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                               f"(available: {', '.join(available)})")
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
        if self._custom_ops:
            try:
                custom_ops.register(options)
            except ImportError as exc:
                raise SessionError(f"{self.path}: the model uses qcompiler's custom ops "
                                   f"({', '.join(self._custom_ops)}); they run through onnxruntime-extensions, which "
                                   "is not installed: pip install onnxruntime-extensions==0.15.2") from exc
        try:  # the checked bytes and files, never the path: ORT opens nothing by itself (see _model_file)
            with self._file.ort_options(options) as checked_options:
                self._session = ort.InferenceSession(self._file.ort_blob(), checked_options, providers=wanted)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        except Exception as exc:
            message = " ".join(str(exc).split())
            raise SessionError(f"{self.path}: onnxruntime cannot load the model: {message[:500]}") from exc
        self._file = None  # ORT copied what it needs
        self._inputs = [_info(a) for a in self._session.get_inputs()]
        self._outputs = [_info(a) for a in self._session.get_outputs()]
        logger.debug("session on %s with %s", self.path, self._session.get_providers())

    def _start_gpu(self, device: str, cuda_graphs: bool) -> None:
        """The GPU executor (imported only here: torch and onnx are never loaded for a CPU session)."""
        if not (device in ("torch-cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise SessionError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'torch-cpu', got {device!r}")
        if self._custom_ops:
            raise SessionError(f"{self.path}: qcompiler's CPU custom ops ({', '.join(self._custom_ops)}) have no GPU "
                               "kernels; run this model with device='cpu'")
        try:
            import torch

            from qcompiler.runtime.cuda.executor import UnsupportedOpError
            from qcompiler.runtime.cuda.session import GpuSession
        except ImportError as exc:
            raise SessionError(f"device={device!r} needs torch (and triton for the CUDA kernels): {exc}") from exc
        if device != "torch-cpu" and not torch.cuda.is_available():
            raise SessionError(f"device={device!r}: torch sees no CUDA device")
        try:
            self._gpu = GpuSession(self._file, "cpu" if device == "torch-cpu" else device, cuda_graphs=cuda_graphs)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        except (UnsupportedOpError, ValueError) as exc:
            raise SessionError(f"{self.path}: the GPU executor cannot run this model: {exc}") from exc
        self._session = None
        self._inputs = [_tensor_info(*self._gpu.describe(spec)) for spec in self._gpu.inputs]
        self._outputs = [_tensor_info(*self._gpu.describe(spec)) for spec in self._gpu.outputs]
        logger.debug("GPU executor on %s for %s", device, self.path)

    def _scan(self) -> ModelScan | None:
        """The file's opsets, metadata and ``ai.qcompiler`` nodes, or None when it is not readable protobuf (ORT
        then reports why it cannot load it)."""
        try:
            return scan_blob(self._file.blob, custom_ops.DOMAIN)
        except ValueError as exc:
            logger.debug("%s: not scanned (%s)", self.path, exc)
            return None

    def _check_custom_ops(self, scan: ModelScan) -> tuple[str, ...]:
        version = scan.opsets.get(custom_ops.DOMAIN)
        if version is None:
            return ()
        try:
            return custom_ops.check_nodes(version, scan.nodes)
        except custom_ops.CustomOpError as exc:
            written_by = scan.metadata.get("qcompiler.version")
            by = f" (written by qcompiler {written_by})" if written_by else ""
            raise SessionError(f"{self.path}{by}: {exc}") from exc

    @property
    def opsets(self) -> dict[str, int]:
        """The model's opset imports: domain -> version (the default domain is ``""``)."""
        return dict(self._opsets)

    @property
    def custom_ops(self) -> tuple[str, ...]:
        """The ``ai.qcompiler`` ops the model uses (registered for this session), sorted; empty for most models."""
        return self._custom_ops

    @property
    def inputs(self) -> list[TensorInfo]:
        """The model's inputs (initializers excluded), in order."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        """The model's outputs, in order."""
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (for the GPU executor: its name and device)."""
        if self._gpu is not None:
            return [f"qcompiler.GraphExecutor({self._gpu.executor.device})"]
        return list(self._session.get_providers())

    @property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (e.g. ``qcompiler.version``, ``qcompiler.recipe``)."""
        if self._gpu is not None:
            return self._gpu.metadata
        return dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The underlying ``onnxruntime.InferenceSession`` (SessionError on the GPU executor, which has none)."""
        if self._session is None:
            raise SessionError(f"a device={self.device!r} session runs no onnxruntime.InferenceSession")
        return self._session

    def run_torch(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """GPU executor only: run on torch tensors and get the device tensors back (no host copies; with CUDA
        graphs they are the graph's buffers, valid until the next run). Feeds are not checked here."""
        if self._gpu is None:
            raise SessionError("run_torch is for device='cuda' sessions; use run() on the CPU")
        return self._gpu.run_torch(feeds)

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        expected = {i.name: i for i in self._inputs}
        unknown = [name for name in feeds if name not in expected]
        if unknown:
            raise InvalidFeedError(f"unknown input name(s) {', '.join(map(repr, unknown))}; the model's inputs are "
                                   f"{', '.join(map(repr, expected))}")
        absent = [name for name in expected if name not in feeds]
        if absent:
            raise InvalidFeedError(f"missing input(s) {', '.join(map(repr, absent))}; the model's inputs are "
                                   f"{', '.join(map(repr, expected))}")
        checked: dict[str, Any] = {}
        for name, value in feeds.items():
            info = expected[name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if info.dtype is not None and array.dtype != info.dtype and not (
                    info.dtype == np.dtype(object) and array.dtype.kind in "OU"):
                raise InvalidFeedError(f"input '{name}' must be {info.dtype} ({info.type}), got {array.dtype}")
            if info.shape:
                if array.ndim != len(info.shape):
                    raise InvalidFeedError(f"input '{name}' must have rank {len(info.shape)} (shape "
                                           f"{list(info.shape)}), got shape {list(array.shape)}")
                for axis, (want, got) in enumerate(zip(info.shape, array.shape, strict=True)):
                    if isinstance(want, int) and want >= 0 and want != got:
                        raise InvalidFeedError(f"input '{name}' must have {want} at axis {axis} (shape "
                                               f"{list(info.shape)}), got shape {list(array.shape)}")
            checked[name] = array
        return checked

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: one array per model input, keyed by input name.
            output_names: the outputs to compute (default: all of them).

        Returns:
            The outputs keyed by name, in the order asked for (or the model's order).

        Raises:
            InvalidFeedError: wrong input names, element types or shapes, or an unknown output name.
            SessionError: ONNX Runtime, or one of our custom ops, failed while running.
        """
        checked = self._check_feeds(feeds)
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        known = {o.name for o in self._outputs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InvalidFeedError(f"unknown output name(s) {', '.join(map(repr, unknown))}; the model's outputs "
                                   f"are {', '.join(repr(o.name) for o in self._outputs)}")
        if self._gpu is not None:
            try:
                return self._gpu.run(checked, names)
            except (RuntimeError, ValueError) as exc:
                message = " ".join(str(exc).split())
                raise SessionError(f"{self.path}: the GPU executor failed: {message[:500]}") from exc
        mark = custom_ops.failure_count() if self._custom_ops else 0
        try:
            results = self._session.run(names, checked)
        except Exception as exc:
            self._raise_custom_op_failure(mark)
            message = " ".join(str(exc).split())
            raise SessionError(f"{self.path}: onnxruntime failed: {message[:500]}") from exc
        if self._custom_ops:
            self._raise_custom_op_failure(mark)
        return dict(zip(names, results, strict=True))

    def _raise_custom_op_failure(self, mark: int) -> None:
        """Raise the first failure of one of our custom ops since ``mark`` (they cannot raise into ORT)."""
        failed = custom_ops.failures_since(mark)
        if failed:
            raise SessionError(f"{self.path}: custom op failed: {failed[0][:500]}")

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, device={self.device!r}, providers={self.providers})"
