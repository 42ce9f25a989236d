"""qcompiler's own ONNX ops (domain ``ai.qcompiler``), for what ONNX Runtime's CPU kernels lack.

:mod:`.schemas` defines the ops and the check a model's use of them must pass, :mod:`.kernels` their numpy
reference kernels, and :func:`register` runs them in ONNX Runtime through onnxruntime-extensions' Python ops
(imported only then; ``pip install onnxruntime-extensions==0.15.2`` or ``qcompiler[custom-ops]``).
:class:`qcompiler.runtime.Session` registers them by itself when a model imports the domain.
"""

from __future__ import annotations

import sys
from typing import Any

from qcompiler.runtime.custom_ops.kernels import matmul_fp8, matmul_intn
from qcompiler.runtime.custom_ops.schemas import DOMAIN, OPSET_VERSION, SCHEMAS, CustomOpError, OpSchema, check_nodes

__all__ = ["DOMAIN", "OPSET_VERSION", "SCHEMAS", "CustomOpError", "OpSchema", "check_nodes", "failure_count",
           "failures_since", "matmul_fp8", "matmul_intn", "register"]


def register(options: Any) -> None:
    """Register the ops with an ``onnxruntime.SessionOptions`` (see :mod:`._ortext`; also turns off ORT's spinning
    workers, which starve the ops' BLAS threads).

    Raises:
        ImportError: onnxruntime-extensions is not installed (the message names the pip command).
    """
    from qcompiler.runtime.custom_ops._ortext import register as _register

    _register(options)


def failure_count() -> int:
    """How many calls of the registered ops have failed in this process (0 before :func:`register`)."""
    module = sys.modules.get("qcompiler.runtime.custom_ops._ortext")
    return 0 if module is None else module.failure_count()


def failures_since(count: int) -> list[str]:
    """The messages of the failures after the first ``count`` (a failing op logs, and leaves its outputs empty:
    an exception would terminate the process, see :mod:`._ortext`)."""
    module = sys.modules.get("qcompiler.runtime.custom_ops._ortext")
    return [] if module is None else module.failures_since(count)
