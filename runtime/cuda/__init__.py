"""qcompiler's GPU path: Triton weight-only matmuls over the packed layouts, and a graph executor on PyTorch.

Importing this package imports nothing heavy; its names load on first use. The kernels
(:mod:`qcompiler.runtime.cuda.kernels`) import torch and triton; the executor
(:mod:`qcompiler.runtime.cuda.executor`) imports torch and onnx, and triton only when it runs on a CUDA device (so it
also runs, with torch's own ops for the quantized layers, on a CPU without triton: that is how CI tests it).
Nothing else in ``qcompiler.runtime`` imports this package; :class:`qcompiler.runtime.Session` does when asked for
``device="cuda"``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GraphExecutor",
    "KernelConfig",
    "default_config",
    "dequantize_bnb4",
    "dequantize_nbits",
    "matmul_bnb4",
    "matmul_nbits",
    "to_device",
]

_HOMES = {"GraphExecutor": "executor"} | {name: "kernels" for name in __all__ if name != "GraphExecutor"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
