"""The qcompiler runtime: run compiled models with ONNX Runtime.

Imports only the standard library, numpy and onnxruntime (never onnx, onnx_ir, networkx or torch), so that an
application can embed it without the compiler. The Triton GPU kernels for the low-bit layouts
live in ``qcompiler.runtime.cuda`` (torch and triton are imported there only, when it is imported).
"""

from __future__ import annotations

from qcompiler.runtime.lora import AdapterError, read_adapter, write_adapter
from qcompiler.runtime.session import InvalidFeedError, Session, SessionError, TensorInfo

__all__ = ["Session", "TensorInfo", "SessionError", "InvalidFeedError", "AdapterError", "read_adapter",
           "write_adapter"]
