"""Run a compiled model file: a thin, checked wrapper around an engine (ONNX Runtime by default).

This module imports only the standard library, numpy and onnxruntime, so that an application can run qcompiler's
output without the compiler's dependencies (onnx, onnx_ir, networkx, torch). ``Session(path, device="cuda")``
runs the same file on qcompiler's GPU executor instead (:mod:`qcompiler.runtime.cuda`, which imports torch and
onnx when, and only when, it is asked for), behind the same inputs, outputs, feed checks and numpy results. The
engines are :class:`~qcompiler.runtime.backend.Backend` objects: ``Session`` picks one at construction and
delegates to it; what is the same for every engine (the file checks, the feed checks, the call forms) stays here.

The file is read once and checked before any engine sees it (:mod:`._model_file`): every external-data reference,
wherever it sits, must name a regular, singly linked file beneath the model's folder reached without symlinks, and
ORT gets those very bytes (the model as a buffer, the data as in-memory files), so it opens nothing by path. Its
opset imports and metadata are read (:mod:`._onnx_scan`, without parsing the weights). A model that imports qcompiler's own domain (``ai.qcompiler``: the int3 and fused FP8 matmuls of
:mod:`qcompiler.runtime.custom_ops`) is checked against this runtime's operator set (its version, the op names,
their input counts) and its ops are registered through onnxruntime-extensions (with ORT's spinning workers off:
they would steal the cores from the ops' BLAS threads); every refusal is one line.

:meth:`Session.run` takes a dict of numpy arrays keyed by input name and returns a dict keyed by output name (in the
order asked, or the model's output order); ONNX Runtime's call ``run(output_names, input_feed)`` (names or None
first, the feeds second, or ``input_feed=`` by keyword) is accepted too and returns a list like ORT's, so code
ported from ``onnxruntime.InferenceSession`` runs unchanged. Feeds are checked before the engine sees them: unknown
or missing names, wrong element types and wrong ranks or fixed dimensions raise :class:`InvalidFeedError` with one
clear line. Feeds are never cast silently. Limits: tensor inputs only (no sequence, map or optional inputs); ORT's
``run_options`` argument is not taken.

LoRA adapters (:mod:`.lora`): a model exported with LoRA slots (``qcompiler.lora`` metadata, form "slots") takes
``adapters={"name": "file.onnx_adapter", ...}`` (or :meth:`Session.load_adapter` later); each file is read, checked
against the model (base hash, layer names, shapes) and handed to the engine once, and ``run(feeds, adapter="name")``
feeds its parameters as the slots' inputs for that run only (``adapter=None``: the base alone, the slots' zero
defaults). Switching adapters never reloads the base.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import onnxruntime as ort

from qcompiler.runtime import custom_ops
from qcompiler.runtime._model_file import ModelFile, ModelFileError, open_model_file
from qcompiler.runtime._onnx_scan import ModelScan, scan_blob
from qcompiler.runtime._ort_backend import AUTO_PROVIDERS, OrtBackend
from qcompiler.runtime.backend import Backend, InvalidFeedError, SessionError, TensorInfo
from qcompiler.runtime.lora import AdapterError, check_adapter, check_slot_inputs, lora_slots, read_adapter

__all__ = ["AUTO_PROVIDERS", "Session", "TensorInfo", "SessionError", "InvalidFeedError"]

logger = logging.getLogger(__name__)

_CALL_FORMS = "Session.run takes run(feeds, output_names=None) or ONNX Runtime's run(output_names, input_feed)"


def _names_or_none(value: Any) -> bool:
    """Whether ``value`` can be a list of output names (None for all of them)."""
    return value is None or (isinstance(value, Sequence) and not isinstance(value, (str, bytes)))


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _call_form(first: Any, second: Any, input_feed: Any) -> tuple[Mapping[str, Any], Sequence[str] | None, bool]:
    """(feeds, output names, whether the call was ONNX Runtime's order) of a :meth:`Session.run` call.

    Our order has the feeds (a mapping) first; ORT's has the names (a list or None) first and the feeds second or
    as ``input_feed=``. Anything else (two mappings, no mapping, a str as the names) is refused: guessing could run
    the model on the wrong arguments."""
    for value in (first, second):
        if isinstance(value, (str, bytes)):
            raise InvalidFeedError(f"output names must be a list of names, not the {type(value).__name__} "
                                   f"{value!r}; {_CALL_FORMS}")
    if input_feed is not None:  # ORT's keyword: the names are the one other argument given, if any
        given = [value for value in (first, second) if value is not None]
        if isinstance(input_feed, Mapping) and len(given) <= 1 and all(map(_names_or_none, given)):
            return input_feed, given[0] if given else None, True
        raise InvalidFeedError(f"{_CALL_FORMS}; got run({_kind(first)}, {_kind(second)}, input_feed={_kind(input_feed)})")
    if isinstance(first, Mapping) and _names_or_none(second):
        return first, second, False
    if isinstance(second, Mapping) and _names_or_none(first):
        return second, first, True
    raise InvalidFeedError(f"{_CALL_FORMS}; got run({_kind(first)}, {_kind(second)})")


class Session:
    """A compiled model, checked and loaded into an engine (ONNX Runtime unless ``device`` says otherwise).

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
        adapters: LoRA adapter files by the name ``run(..., adapter=name)`` chooses them with (see
            :meth:`load_adapter`).

    Raises:
        SessionError: the file is missing or not a regular file, an external-data reference is refused (outside the
            folder, through a symlink, a hard link, a FIFO, out of bounds), it uses ``ai.qcompiler`` ops this
            runtime cannot run (a newer opset, an unknown op, onnxruntime-extensions not installed), a provider is
            not available, or ORT cannot load it.
        AdapterError: an adapter is refused (see :meth:`load_adapter`).
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | str | None = None, *,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None, device: str = "cpu",
                 cuda_graphs: bool = True, adapters: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        self.path = Path(path)
        try:
            model = open_model_file(self.path)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        scan = self._scan(model)
        self._opsets = dict(scan.opsets) if scan is not None else {}
        self._custom_ops = self._check_custom_ops(scan) if scan is not None else ()
        self.device = device
        self._lora_metadata = dict(scan.metadata) if scan is not None else {}
        self._adapters: dict[str, Mapping[str, Any]] = {}
        if device == "cpu":
            self._backend: Backend = OrtBackend(model, providers, intra_op_threads=intra_op_threads,
                                                inter_op_threads=inter_op_threads, custom=self._custom_ops,
                                                quiet_slots=self._has_slots())
        else:
            if providers is not None:
                raise SessionError(f"providers are ONNX Runtime's: they go with device='cpu', not {device!r}")
            self._backend = self._gpu_backend(model, device, cuda_graphs)
        self._inputs = tuple(self._backend.inputs)
        self._outputs = tuple(self._backend.outputs)
        for name, adapter_path in (adapters or {}).items():
            self.load_adapter(name, adapter_path)

    def _has_slots(self) -> bool:
        """Whether the model has LoRA slots (ORT warns once per slot input otherwise: the log is kept to errors)."""
        try:
            lora = lora_slots(self._lora_metadata)
        except AdapterError:
            return False
        return lora is not None and lora.form == "slots"

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Read a LoRA adapter file once, check it against the model and hand it to the engine under ``name``.

        Raises:
            AdapterError: the name is taken or empty, the file is refused (missing, a folder or FIFO, not an ONNX
                Runtime adapter, no base identity, NaN/Inf or malformed parameters), the model has no LoRA slots,
                or the adapter is for another base, names layers the model has no slot for, or has other K/N.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter's name must be a non-empty str, got {name!r}")
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded in this session")
        where = f"the model {self.path}"
        lora = lora_slots(self._lora_metadata, where)
        adapter = read_adapter(path)
        check_adapter(adapter, lora, where)
        overridable = getattr(self._backend, "overridable", None)
        bind = getattr(self._backend, "bind_adapter", None)
        if overridable is None or bind is None:
            raise AdapterError(f"the {self.device!r} engine of this session takes no LoRA adapters")
        check_slot_inputs(lora, overridable, where)
        self._adapters[name] = bind(adapter.params)
        logger.debug("adapter %r from %s: %d layers", name, adapter.path, len(adapter.layers))

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded LoRA adapters (what ``run(..., adapter=name)`` takes)."""
        return list(self._adapters)

    def _gpu_backend(self, model: ModelFile, device: str, cuda_graphs: bool) -> Backend:
        """The GPU executor (imported only here: torch and onnx are never loaded for a CPU session)."""
        if not (device in ("torch-cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise SessionError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'torch-cpu', got {device!r}")
        if self._custom_ops:
            raise SessionError(f"{self.path}: qcompiler's CPU custom ops ({', '.join(self._custom_ops)}) have no GPU "
                               "kernels; run this model with device='cpu'")
        try:
            import torch

            from qcompiler.runtime.cuda.session import GpuSession
        except ImportError as exc:
            raise SessionError(f"device={device!r} needs torch (and triton for the CUDA kernels): {exc}") from exc
        if device != "torch-cpu" and not torch.cuda.is_available():
            raise SessionError(f"device={device!r}: torch sees no CUDA device")
        backend = GpuSession(model, "cpu" if device == "torch-cpu" else device, cuda_graphs=cuda_graphs)
        logger.debug("GPU executor on %s for %s", device, self.path)
        return backend

    def _scan(self, model: ModelFile) -> ModelScan | None:
        """The file's opsets, metadata and ``ai.qcompiler`` nodes, or None when it is not readable protobuf (the
        engine then reports why it cannot load it)."""
        try:
            return scan_blob(model.blob, custom_ops.DOMAIN)
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
        return self._backend.providers

    @property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (e.g. ``qcompiler.version``, ``qcompiler.recipe``)."""
        return self._backend.metadata

    @property
    def backend(self) -> Backend:
        """The engine this session delegates to (:class:`~qcompiler.runtime.backend.Backend`)."""
        return self._backend

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The underlying ``onnxruntime.InferenceSession`` (SessionError for another engine, which has none)."""
        if not isinstance(self._backend, OrtBackend):
            raise SessionError(f"a device={self.device!r} session runs no onnxruntime.InferenceSession")
        return self._backend.session

    def run_torch(self, feeds: Mapping[str, Any], *, adapter: str | None = None) -> dict[str, Any]:
        """GPU executor only: run on torch tensors and get the device tensors back (no host copies; with CUDA
        graphs they are the graph's buffers, valid until the next run). Feeds are not checked here; ``adapter``
        as in :meth:`run`."""
        return self._backend.run_torch(feeds if adapter is None else {**feeds, **self._adapter_feeds(adapter)})

    def _adapter_feeds(self, adapter: str | None) -> Mapping[str, Any]:
        """The engine's bound parameters of a loaded adapter (nothing for None)."""
        if adapter is None:
            return {}
        if adapter not in self._adapters:
            raise InvalidFeedError(f"unknown adapter {adapter!r}; this session's adapters are "
                                   f"{', '.join(map(repr, self._adapters)) or 'none'}")
        return self._adapters[adapter]

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

    @overload
    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None, *,
            adapter: str | None = None) -> dict[str, np.ndarray]: ...

    @overload
    def run(self, feeds: Sequence[str] | None, output_names: Mapping[str, Any], *,
            adapter: str | None = None) -> list[np.ndarray]: ...

    @overload
    def run(self, feeds: Sequence[str] | None = None, output_names: Sequence[str] | None = None, *,
            input_feed: Mapping[str, Any], adapter: str | None = None) -> list[np.ndarray]: ...

    def run(self, feeds: Any = None, output_names: Any = None, *, input_feed: Mapping[str, Any] | None = None,
            adapter: str | None = None) -> dict[str, np.ndarray] | list[np.ndarray]:
        """Run the model once: ``run(feeds, output_names=None)``, or ONNX Runtime's ``run(output_names,
        input_feed)``.

        Args:
            feeds: one array per model input, keyed by input name. In ORT's order: the output names (or None).
            output_names: the outputs to compute (default: all of them). In ORT's order: the feeds.
            input_feed: the feeds by ORT's keyword (then the names come first, or as ``output_names=``).
            adapter: the name of a loaded LoRA adapter to apply in this run (None: the base model alone).

        Returns:
            Called with the feeds first: the outputs keyed by name, in the order asked for (or the model's order).
            Called in ORT's order: a list of the outputs in that order, as ``InferenceSession.run`` returns.

        Raises:
            InvalidFeedError: a call that is neither form (two mappings, no mapping, a str as the names), wrong
                input names, element types or shapes, an unknown output name or adapter name.
            SessionError: the engine (ONNX Runtime, one of our custom ops, the GPU executor) failed while running.
        """
        feeds, names, ort_order = _call_form(feeds, output_names, input_feed)
        checked = self._check_feeds(feeds)
        wanted = [o.name for o in self._outputs] if names is None else list(names)
        known = {o.name for o in self._outputs}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidFeedError(f"unknown output name(s) {', '.join(map(repr, unknown))}; the model's outputs "
                                   f"are {', '.join(repr(o.name) for o in self._outputs)}")
        checked.update(self._adapter_feeds(adapter))
        results = self._backend.run(checked, wanted)
        return [results[n] for n in wanted] if ort_order else results

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, device={self.device!r}, providers={self.providers})"
