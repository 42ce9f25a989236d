"""The ONNX Runtime backend of :class:`qcompiler.runtime.Session` (``device="cpu"``, the default).

ORT gets the checked bytes and the checked external-data files of a :class:`~._model_file.ModelFile` (the model
as a buffer, the data as in-memory files, its own external-data folder an empty private one), never the path, so
it opens nothing by itself. qcompiler's ``ai.qcompiler`` ops are registered through onnxruntime-extensions when the
model uses them (already checked against this runtime's op set by ``Session``); those ops run numpy inside ORT and
cannot raise into it, so a failure is read back from :mod:`.custom_ops` after each run.

Standard library, numpy and onnxruntime only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompiler.runtime import custom_ops
from qcompiler.runtime._model_file import ModelFile, ModelFileError
from qcompiler.runtime.backend import SessionError, TensorInfo, tensor_info

__all__ = ["AUTO_PROVIDERS", "OrtBackend"]

#: what ``providers="auto"`` tries before the CPU, in order: the GPU providers whose kernels cover the contrib ops
#: the recipes write (MatMulNBits, GatherBlockQuantized, QDQ); ORT falls back to the CPU node by node otherwise
AUTO_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")

logger = logging.getLogger(__name__)


def _info(arg: Any) -> TensorInfo:
    return tensor_info(arg.name, tuple(arg.shape) if arg.shape is not None else (), arg.type)


def _wanted_providers(providers: Sequence[str] | str | None, custom: tuple[str, ...]) -> list[str]:
    """The providers asked for, checked against this onnxruntime build (``"auto"``: see :data:`AUTO_PROVIDERS`)."""
    available = ort.get_available_providers()
    if providers == "auto":
        wanted = [p for p in AUTO_PROVIDERS if p in available and not custom] + ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        raise SessionError(f"providers must be a list of ONNX Runtime execution providers or 'auto', got "
                           f"{providers!r}")
    else:
        wanted = list(providers) if providers is not None else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise SessionError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                           f"(available: {', '.join(available)})")
    return wanted


class OrtBackend:
    """A checked model file in an ``onnxruntime.InferenceSession``.

    Args:
        model: the file, read and checked (its bytes and external files are what ORT gets).
        providers: ORT execution providers in order of preference, ``"auto"`` or None (CPU only).
        intra_op_threads: threads inside one operator (None: ORT's default).
        inter_op_threads: threads across operators (None: ORT's default).
        custom: the ``ai.qcompiler`` ops the model uses (already checked), registered for this session.
        quiet_slots: keep ORT's session log to errors: a model with LoRA slots would log one warning per slot input
            ("initializer appears in graph inputs"), which is what the slots are meant to be.

    Raises:
        SessionError: a provider is not available, onnxruntime-extensions is missing for custom ops, a checked
            file changed, or ORT cannot load the model.
    """

    def __init__(self, model: ModelFile, providers: Sequence[str] | str | None = None, *,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 custom: tuple[str, ...] = (), quiet_slots: bool = False) -> None:
        self.path: Path = model.path
        self._custom = custom
        wanted = _wanted_providers(providers, custom)
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
        if quiet_slots:
            options.log_severity_level = 3
        if custom:
            try:
                custom_ops.register(options)
            except ImportError as exc:
                raise SessionError(f"{self.path}: the model uses qcompiler's custom ops ({', '.join(custom)}); they "
                                   "run through onnxruntime-extensions, which is not installed: pip install "
                                   "onnxruntime-extensions==0.15.2") from exc
        try:  # the checked bytes and files, never the path: ORT opens nothing by itself (see _model_file)
            with model.ort_options(options) as checked_options:
                self.session = ort.InferenceSession(model.ort_blob(), checked_options, providers=wanted)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        except Exception as exc:
            message = " ".join(str(exc).split())
            raise SessionError(f"{self.path}: onnxruntime cannot load the model: {message[:500]}") from exc
        self._inputs = [_info(a) for a in self.session.get_inputs()]
        self._outputs = [_info(a) for a in self.session.get_outputs()]
        self._overridable = {a.name: _info(a) for a in self.session.get_overridable_initializers()}
        logger.debug("session on %s with %s", self.path, self.session.get_providers())

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def overridable(self) -> dict[str, TensorInfo]:
        """The initializers a feed may override (graph inputs with a default: the LoRA slots), by name."""
        return dict(self._overridable)

    def bind_adapter(self, params: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """A LoRA adapter's parameters as ``OrtValue`` objects, made once and fed on every run that chooses it."""
        return {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in params.items()}

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        mark = custom_ops.failure_count() if self._custom else 0
        try:
            results = self.session.run(list(names), dict(feeds))
        except Exception as exc:
            self._raise_custom_op_failure(mark)
            message = " ".join(str(exc).split())
            raise SessionError(f"{self.path}: onnxruntime failed: {message[:500]}") from exc
        if self._custom:
            self._raise_custom_op_failure(mark)
        return dict(zip(names, results, strict=True))

    def run_torch(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        raise SessionError("run_torch is for device='cuda' sessions; use run() on the CPU")

    def _raise_custom_op_failure(self, mark: int) -> None:
        """Raise the first failure of one of our custom ops since ``mark`` (they cannot raise into ORT)."""
        failed = custom_ops.failures_since(mark)
        if failed:
            raise SessionError(f"{self.path}: custom op failed: {failed[0][:500]}")
