"""Facts about int8 layers that the int8 algorithms (GPTQ, mixed precision) and the int8 lowering share, so that
none of them imports another: the weight range a layer gets (a depthwise Conv keeps ``[-127, 127]``: ONNX Runtime's
depthwise kernel cannot saturate) and whether its bias keeps it float (a ``+-inf`` logits mask fits no int32 grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.passes._finite import require_finite

__all__ = ["layer_qmax", "mask_bias_reason"]


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _is_depthwise(node: ir.Node, weight: np.ndarray) -> bool:
    """A Conv with one input and one output channel per group (ORT's integer depthwise kernel)."""
    if node.op_type != "Conv" or weight.ndim < 3:
        return False
    group = int(_attr(node, "group", 1))
    return group > 1 and weight.shape[1] == 1 and weight.shape[0] == group


def mask_bias_reason(node: ir.Node) -> str | None:
    """Why a static int8 layer must stay float because of its bias, or None: a constant bias holding ``+-inf`` (a
    logits mask folded into a Gemm) fits no int32 grid, and ONNX Runtime's fused QGemm quantizes even a float bias
    (measured: relative error 0.01 -> 0.47). A bias holding NaN raises :class:`~qcompiler.errors.InvalidModelError`.
    """
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    tensor = None if bias is None else bias.const_value
    if tensor is None or not tensor.dtype.is_floating_point():
        return None
    array = tensor.numpy()
    if np.all(np.isfinite(array)):
        return None
    require_finite(array, bias.name, node.name, what="bias", nan_only=True)
    return "bias holds +-Inf (a mask): the layer stays float (no int32 grid holds it)"


def layer_qmax(node: ir.Node, weight: np.ndarray, qmax: int) -> int:
    """The weight range this lowering gives ``node``: ``qmax``, or 127 for a depthwise Conv (see above)."""
    return 127 if _is_depthwise(node, weight) else qmax
