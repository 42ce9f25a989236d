"""Fused fake-quantization kernels: the arithmetic of :mod:`.numerics` run through ``torch.compile`` on the GPU.

Why: eagerly, one layer's fake quantization is a dozen small kernels (casts, block reductions, division, rounding,
dequantization), each dispatched from Python. A 135M-parameter decoder has about 200 such layers, so a training
step spends more time launching them than computing (2.66x the float step on an H100). ``torch.compile`` fuses each
layer's arithmetic into a few Triton kernels.

Exactness: the compiled functions are the eager ones, traced; Triton's float64 division and ``nearbyint`` (round
half to even) are IEEE-exact, block maxima/minima do not depend on order, and the float32 dequantization
``(q - z) * s`` has no multiply-add to contract, so the codes and weights are bit-identical to the eager path
(``tests/test_qat_kernels.py`` checks it where a GPU is present). Ternary's float64 absmean sum is the one
reduction whose order the compiler may change; it already differs between numpy and torch (see :mod:`.numerics`).
The learned (LSQ) scales' gradients are float32 sums whose order may change too: equal to the last bit or so.
A compile that fails (no working C++ compiler or Triton) leaves that kernel eager, with one warning.

Mode: ``"auto"`` (default) compiles on CUDA devices only (on the CPU the C++ compile costs more than it saves);
``"always"`` compiles everywhere, ``"never"`` keeps everything eager. Set it with :func:`set_mode` or the
``QCOMPILER_QAT_COMPILE`` environment variable.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MODES", "kernel", "mode", "set_mode"]

_log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
_state: dict[str, Any] = {"mode": os.environ.get("QCOMPILER_QAT_COMPILE", "auto").strip().lower() or "auto"}
_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}

#: one compiled graph per (function, spec, input shapes): a model has a handful of each, more than dynamo's default
#: of 8 recompilations per function
_RECOMPILE_LIMIT = 256


def mode() -> str:
    """The current mode (``"auto"``, ``"always"`` or ``"never"``)."""
    value = _state["mode"]
    if value not in MODES:
        raise ValueError(f"QCOMPILER_QAT_COMPILE must be one of {', '.join(MODES)}, not {value!r}")
    return value


def set_mode(value: str) -> None:
    """Choose when fake quantization is compiled (see the module docstring)."""
    if value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {value!r}")
    _state["mode"] = value


def _wanted(device: torch.device) -> bool:
    current = mode()
    if current == "never" or torch.compiler.is_compiling():
        return False
    return current == "always" or device.type == "cuda"


def kernel(function: Callable[..., Any], *constants: Any, device: torch.device) -> Callable[..., Any]:
    """``function(*tensors, *constants)`` as a callable of the tensors alone: compiled (and cached per function and
    constants) when the mode wants it on ``device``, the eager function otherwise. ``constants`` must be hashable
    (a frozen :class:`~qcompiler.formats.WeightSpec`, strings, numbers, booleans)."""
    if not _wanted(device):
        return lambda *tensors: function(*tensors, *constants)
    key = (function, *constants)
    compiled = _compiled.get(key)
    if compiled is None:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)

        def bound(*tensors: torch.Tensor) -> Any:
            return function(*tensors, *constants)

        # a code object of its own: dynamo keeps its compiled graphs (and checks their guards) per code object, so
        # one shared closure would make every call walk the graphs of every format and shape
        name = f"{function.__name__}_{len(_compiled)}"
        bound = types.FunctionType(bound.__code__.replace(co_name=name, co_qualname=name), bound.__globals__, name,
                                   None, bound.__closure__)
        compiled = _FallingBack(torch.compile(bound, dynamic=False), bound, function.__name__)
        _compiled[key] = compiled
        _log.debug("compiling %s for %s", function.__name__, constants)
    return compiled


class _FallingBack:
    """A compiled function that turns eager for good when compiling fails (no working C++ compiler or Triton):
    slower, never wrong."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], name: str) -> None:
        self.compiled, self.eager, self.name = compiled, eager, name

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if self.compiled is None:
            return self.eager(*tensors)
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError

        try:
            return self.compiled(*tensors)
        except (InductorError, TorchDynamoException) as error:
            _log.warning("fake quantization runs eagerly: compiling %s failed (%s)", self.name,
                         str(error).splitlines()[0] if str(error) else type(error).__name__)
            self.compiled = None
            return self.eager(*tensors)
