"""qcompiler: a quantization compiler for ONNX models.

The public entry point is :func:`compile_model` (``qcompiler.compile_model``); the ``qcompile`` command and
``python -m qcompiler`` wrap it::

    import qcompiler
    result = qcompiler.compile_model("model.onnx", recipe="int8", calib={"x": samples})  # or an onnx.ModelProto
    result.save("model.q.onnx")        # result.model (onnx_ir.Model), result.report, result.metadata

It takes a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified), calibration data as a path or a
mapping ``{input name: numpy array}``, and extra ``qcompiler.pass_manager.QPass`` objects (``passes=[...]``); every
mistake raises a :class:`QCompileError` subclass (``qcompiler.errors``) with a one-line message.
``qcompiler.runtime.Session`` runs the compiled model with ONNX Runtime.

This package's ``__init__`` is kept import-light (standard library only; ``compile_model`` is imported on first use)
because ``qcompiler.runtime`` lives under it and must not pull in the compiler's dependencies (onnx, onnx_ir,
networkx, torch).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("qcompiler")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["compile_model", "CompileResult", "QCompileError", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: importing qcompiler.runtime must not import the compiler
    if name in ("compile_model", "CompileResult"):
        from qcompiler._deps import require_compiler

        require_compiler(f"qcompiler.{name}")  # a runtime-only install: say what to install, not "No module onnx"
        from qcompiler import api

        return getattr(api, name)
    if name == "QCompileError":
        from qcompiler.errors import QCompileError

        return QCompileError
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")


def __dir__() -> list[str]:  # dir() and help() list the lazy names too (help() then imports compile_model)
    names = (set(globals()) - {"__getattr__", "__dir__"}) | set(__all__)  # the hooks are no API of the package
    from qcompiler._deps import missing_compiler_dependencies

    if missing_compiler_dependencies():  # a runtime-only install: help() must not fail on compile_model
        names -= {"compile_model", "CompileResult"}
    return sorted(names)
