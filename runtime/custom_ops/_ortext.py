"""Run the ``ai.qcompiler`` ops in ONNX Runtime as onnxruntime-extensions Python ops (PyOps).

Each op of :data:`~qcompiler.runtime.custom_ops.schemas.SCHEMAS` is declared once per process with
``onnx_op(op_type="ai.qcompiler::<name>", ...)``: the ``domain::`` prefix makes the extension's library register
it under our domain, so compiled files need no rewriting at load. ``register(options)`` then adds the library to a
``SessionOptions``. Tested with onnxruntime-extensions 0.15.2.

Two work-arounds, both for cost, not correctness:

- ``import onnxruntime_extensions`` imports onnx when it can, and through it the package's converters, which pull in
  transformers and torch (3.4 s here). The runtime must stay import-light, so the package is imported with ``onnx``
  hidden (``sys.modules["onnx"] = None`` for the duration of that import): it then loads as it does where onnx is
  not installed (its documented library-only mode). Its offline helpers (``gen_processing_models``...) are then
  stubs in this process; its submodules still import normally.
- The package hands each PyOp's result to ONNX Runtime as ``rv.flatten().tolist()``, a Python float per element
  (13.7 ms for a 128 x 1536 output here); its C++ side casts that result to a numpy array anyway. Registration
  installs an invocation hook that dispatches exactly like the package's (same op table, same attribute casts)
  but returns the contiguous array itself (0.14 ms). String outputs still go as lists.

And one for safety: an exception raised by a PyOp terminates the process in 0.15.2 (its C++ side lets the
``pybind11::error_already_set`` escape the kernel: "terminate called after throwing..."). The hook therefore catches
it, logs it, records it (:func:`failures_since`) and gives ONNX Runtime empty outputs instead;
:meth:`qcompiler.runtime.Session.run` turns a recorded failure into a one-line ``SessionError``. A plain
``InferenceSession`` with :func:`register` gets the log line and empty outputs (or the error of the op that reads
them), not a crash.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np

from qcompiler.runtime.custom_ops.schemas import DOMAIN, SCHEMAS

__all__ = ["PIP_INSTALL", "TESTED_VERSION", "ExtensionsMissingError", "failure_count", "failures_since", "register",
           "use_array_results"]

logger = logging.getLogger(__name__)

TESTED_VERSION = "0.15.2"
#: what to run when the package is missing
PIP_INSTALL = f"pip install onnxruntime-extensions=={TESTED_VERSION}"
_ABSENT = object()
_declared = False
#: (count of kernel failures so far, the last messages): PyOps run under the GIL, so plain updates are safe
_failures: list[str] = []
_failure_total = 0
_KEPT_FAILURES = 64


class ExtensionsMissingError(ImportError):
    """onnxruntime-extensions cannot be imported."""


def _extensions() -> Any:
    """The onnxruntime_extensions module, imported without onnx (see the module docstring)."""
    module = sys.modules.get("onnxruntime_extensions")
    if module is not None:
        return module
    saved = sys.modules.get("onnx", _ABSENT)
    sys.modules["onnx"] = None  # type: ignore[assignment] - makes `import onnx` raise ImportError meanwhile
    try:
        import onnxruntime_extensions as module
    except ImportError as exc:
        raise ExtensionsMissingError(f"onnxruntime-extensions is not installed ({exc}): {PIP_INSTALL}") from exc
    finally:
        if saved is _ABSENT:
            sys.modules.pop("onnx", None)
        else:
            sys.modules["onnx"] = saved
    if getattr(module, "__version__", None) != TESTED_VERSION:
        logger.warning("onnxruntime-extensions %s: qcompiler's custom ops are tested with %s",
                       getattr(module, "__version__", "?"), TESTED_VERSION)
    return module


def _invoke_with_arrays(op_id: int, feed: list[np.ndarray], attributes: dict[str, str]) -> tuple[Any, ...]:
    """The package's PyOp dispatch, returning each result as one contiguous array instead of a list."""
    opdef = sys.modules["onnxruntime_extensions"].Opdef
    op = opdef._odlist.get(op_id)
    if op is None:
        raise RuntimeError(f"no Python op with id {op_id} (declared with @onnx_op?)")
    try:
        result = op.body(*feed, **op.cast_attributes(attributes))
    except Exception as exc:  # noqa: BLE001 - raising here would terminate the process (module docstring)
        name, text = op.op_type.split("::")[-1], str(exc) or type(exc).__name__
        _record_failure(text if text.startswith(name) else f"{name}: {text}")
        return (op_id, *[part for _ in op._nativedef.output_types for part in ((0,), np.zeros(0, np.float32))])
    parts: list[Any] = []
    for value in result if isinstance(result, tuple) else (result,):
        array = np.asarray(value)
        parts += [array.shape, array.reshape(-1).tolist() if array.dtype == object else
                  np.ascontiguousarray(array).reshape(-1)]
    return (op_id, *parts)


def _record_failure(message: str) -> None:
    global _failure_total
    logger.error("custom op failed (its outputs are left empty): %s", message)
    _failures.append(" ".join(message.split()))
    del _failures[:-_KEPT_FAILURES]
    _failure_total += 1


def failure_count() -> int:
    """How many PyOp calls have failed in this process so far."""
    return _failure_total


def failures_since(count: int) -> list[str]:
    """The messages of the failures after the first ``count`` (at most the last 64)."""
    return _failures[len(_failures) - min(_failure_total - count, len(_failures)):] if _failure_total > count else []


def use_array_results(enabled: bool = True) -> None:
    """Hand PyOp results to ONNX Runtime as arrays (our hook, the default once registered) or as the package's
    lists (its own hook; for measuring the difference). Process-wide, like the package's hook."""
    ext = _extensions()
    ext.PyCustomOpDef.install_hooker(_invoke_with_arrays if enabled else ext._ocos._on_pyop_invocation)


def _declare(ext: Any) -> None:
    types = {"float32": ext.PyCustomOpDef.dt_float, "uint8": ext.PyCustomOpDef.dt_uint8}
    for schema in SCHEMAS.values():
        kernel = schema.kernel

        def body(*inputs: np.ndarray, _kernel: Any = kernel, **attributes: int) -> np.ndarray:
            return _kernel(*inputs, **attributes)

        ext.onnx_op(op_type=f"{DOMAIN}::{schema.name}", inputs=[types[t] for _, t in schema.inputs],
                    outputs=[ext.PyCustomOpDef.dt_float],
                    attrs={a: ext.PyCustomOpDef.dt_int64 for a in schema.attributes})(body)


def register(options: Any) -> None:
    """Make the ``ai.qcompiler`` ops available to sessions built with ``options`` (an ``ort.SessionOptions``),
    and turn off ORT's spinning idle workers there: they take the cores from numpy's BLAS threads inside our ops
    (SmolLM2 int3, 2 threads: 362 ms per 8-token forward with spinning, 144 ms without).

    Raises:
        ExtensionsMissingError: onnxruntime-extensions is not installed.
    """
    global _declared
    ext = _extensions()
    if not _declared:
        _declare(ext)
        use_array_results(True)
        _declared = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(ext.get_library_path())
