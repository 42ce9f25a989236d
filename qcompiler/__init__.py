"""qcompiler: a quantization compiler for ONNX models.

The public entry point is :func:`compile_model`; the ``qcompile`` command wraps it. This package's ``__init__`` is
kept import-light (standard library only) because ``qcompiler.runtime`` lives under it and must not pull in the
compiler's dependencies (onnx, onnx_ir, networkx, torch).
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
        from qcompiler import api

        return getattr(api, name)
    if name == "QCompileError":
        from qcompiler.errors import QCompileError

        return QCompileError
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")
