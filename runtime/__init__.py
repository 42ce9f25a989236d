"""The qcompiler runtime: run compiled models with ONNX Runtime.

Imports only the standard library, numpy and onnxruntime (never onnx, onnx_ir, networkx or torch), so that an
application can embed it without the compiler. GPU kernels, when they exist, live in ``qcompiler.runtime.cuda`` and
are imported only when asked for.
"""

from __future__ import annotations

from qcompiler.runtime.session import InvalidFeedError, Session, SessionError, TensorInfo

__all__ = ["Session", "TensorInfo", "SessionError", "InvalidFeedError"]
