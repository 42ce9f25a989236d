"""Finiteness guards: NaN or Inf must never reach a quantized weight or a quantization parameter of the output.

A NaN or an Inf in a weight poisons everything rounded from it: a block's ``max |w|`` becomes Inf or NaN, so its
scale does, and every code of the block is garbage (``rint(NaN)`` cast to an integer is platform-defined). Two
checks share one scanner:

- :func:`require_finite` is called by every pass at the point where it reads a weight (or an int32 bias) that will be
  quantized: the weight-only algorithms and lowering, GPTQ, SmoothQuant, the int8 lowerings. It raises
  :class:`~qcompiler.errors.InvalidModelError` (exit code 2) naming the tensor, the node and the first bad index.
  Constants that stay float (an attention mask holding ``-inf``, a bias added in float) are never checked; a bias
  of static int8 holding ``+-inf`` (a logits mask folded into a Gemm) is kept in float by the lowering, so only
  NaN is refused there.
- :func:`check_quantization_parameters` is the final invariant of ``finalize``: every constant scale, zero point,
  absmax and float8 code read by a quantized op (QuantizeLinear/DequantizeLinear, the QLinear* ops, the
  ``com.microsoft`` contrib ops, ``ai.qcompiler``'s MatMulIntN/MatMulFp8, the weight scales that multiply a
  ``DynamicQuantizeLinear`` scale and the row scales of an int8 embedding table) is finite, or the model is not written.

Memory: a tensor is scanned in slices along its first axis of at most :data:`CHUNK_ELEMENTS` elements (a strided
view such as ``W.T`` is never copied whole), and one tensor at a time; float8 slices are widened to float32.
Integer tensors are finite by construction and are not read.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.errors import InvalidModelError

__all__ = ["CHUNK_ELEMENTS", "check_quantization_parameters", "first_nonfinite", "require_finite"]

logger = logging.getLogger(__name__)

#: elements scanned at once (16 MB of float32 scratch at most)
CHUNK_ELEMENTS = 1 << 22
_FLOAT8 = frozenset(np.dtype(t) for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2,
                                          ml_dtypes.float8_e5m2fnuz))


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype in _FLOAT8 or dtype == np.dtype(ml_dtypes.bfloat16)


def _describe(part: np.ndarray, flat_index: int) -> str:
    value = float(part.reshape(-1)[flat_index])
    return "NaN" if np.isnan(value) else "+Inf" if value > 0 else "-Inf"


def first_nonfinite(array: np.ndarray, *, nan_only: bool = False) -> tuple[tuple[int, ...], str] | None:
    """The index and kind ("NaN", "+Inf", "-Inf") of the first non-finite element of ``array`` (of the first NaN
    with ``nan_only``), or None.

    Scans slices of at most :data:`CHUNK_ELEMENTS` elements along the first axis (a memory map is read once)."""
    a = np.asarray(array)
    if a.size == 0 or not _is_float(a.dtype):
        return None
    good = (lambda part: ~np.isnan(part)) if nan_only else np.isfinite
    if a.ndim == 0:
        return None if good(a) else ((), _describe(a.reshape(1), 0))
    row = max(a[0].size, 1) if a.shape[0] else 1
    step = max(1, CHUNK_ELEMENTS // row)
    for start in range(0, a.shape[0], step):
        part = a[start:start + step]
        if part.dtype in _FLOAT8:
            part = part.astype(np.float32)
        finite = good(part)
        if finite.all():
            continue
        flat = int(np.argmin(finite.reshape(-1)))
        index = np.unravel_index(flat, part.shape)
        return (start + int(index[0]), *(int(i) for i in index[1:])), _describe(part, flat)
    return None


def require_finite(array: np.ndarray, tensor: str | None, node: str | None = None, *,
                   what: str = "weight", nan_only: bool = False) -> np.ndarray:
    """Return ``array`` if every element is finite, else raise :class:`InvalidModelError` naming it.

    Args:
        array: the float values a pass is about to quantize (any float dtype; a memory map or a strided view).
        tensor: the tensor's name in the model.
        node: the name of the node that reads it.
        what: how to call the tensor in the message ("weight", "bias", "embedding table"...).
        nan_only: refuse NaN only (a bias holding ``-inf`` is a mask, which the int8 lowering keeps in float).
    """
    found = first_nonfinite(array, nan_only=nan_only)
    if found is None:
        return array
    index, kind = found
    where = f" of node {node!r}" if node else ""
    at = f" at index [{', '.join(str(i) for i in index)}]" if index else ""
    raise InvalidModelError(f"{what} {tensor or '(unnamed)'!r}{where} holds {kind}{at}: a tensor that is quantized "
                            "must be finite (fix or retrain the model, or exclude the node with --exclude-node)")


# -- the final invariant ----------------------------------------------------------------------------------------------
_STANDARD = frozenset({"", "ai.onnx"})
_CONTRIB = frozenset({"com.microsoft"})
_BOTH = _STANDARD | _CONTRIB
_OURS = frozenset({"ai.qcompiler"})
_UNARY_QLINEAR = {1: "scale", 2: "zero point", 3: "scale", 4: "zero point"}
_BINARY_QLINEAR = {1: "scale", 2: "zero point", 4: "scale", 5: "zero point", 6: "scale", 7: "zero point"}

#: op type -> (domains, {input index: role}) of the quantization parameters each op reads
_PARAMETERS: dict[str, tuple[frozenset[str], dict[int, str]]] = {
    "QuantizeLinear": (_BOTH, {1: "scale", 2: "zero point"}),
    "DequantizeLinear": (_BOTH, {0: "code", 1: "scale", 2: "zero point"}),
    "QLinearConv": (_STANDARD, _BINARY_QLINEAR),
    "QLinearMatMul": (_STANDARD, _BINARY_QLINEAR),
    "QLinearAdd": (_CONTRIB, _BINARY_QLINEAR),
    "QLinearMul": (_CONTRIB, _BINARY_QLINEAR),
    "QGemm": (_CONTRIB, {1: "scale", 2: "zero point", 4: "scale", 5: "zero point", 7: "scale", 8: "zero point"}),
    "QLinearSigmoid": (_CONTRIB, _UNARY_QLINEAR),
    "QLinearLeakyRelu": (_CONTRIB, _UNARY_QLINEAR),
    "QLinearSoftmax": (_CONTRIB, _UNARY_QLINEAR),
    "QLinearAveragePool": (_CONTRIB, _UNARY_QLINEAR),
    "QLinearGlobalAveragePool": (_CONTRIB, _UNARY_QLINEAR),
    "DynamicQuantizeMatMul": (_CONTRIB, {2: "scale", 3: "zero point"}),
    "MatMulIntegerToFloat": (_CONTRIB, {2: "scale", 3: "scale", 4: "zero point", 5: "zero point"}),
    "MatMulNBits": (_CONTRIB, {2: "scale", 3: "zero point"}),
    "MatMulBnb4": (_CONTRIB, {2: "absmax"}),
    "GatherBlockQuantized": (_CONTRIB, {2: "scale", 3: "zero point"}),
    "MatMulIntN": (_OURS, {2: "scale", 3: "zero point"}),
    "MatMulFp8": (_OURS, {1: "fp8 code", 2: "scale"}),
}


def _is_row_scale_gather(node: ir.Node) -> bool:
    """The per-row scales of an int8 embedding table, ``Mul(Cast(Gather(E_q, ids)), Gather(s, ids))`` with
    ``E_q`` int8 (:mod:`qcompiler.passes.lower._int8_embedding`): this node is ``Gather(s, ids)``."""
    for user, _ in node.outputs[0].uses():
        if user.op_type != "Mul" or user.domain not in _STANDARD:
            continue
        for operand in user.inputs:
            cast = operand.producer() if operand is not None else None
            take = cast.inputs[0].producer() if cast is not None and cast.op_type == "Cast" and cast.inputs and \
                cast.inputs[0] is not None else None
            codes = take.inputs[0] if take is not None and take.op_type == "Gather" and len(take.inputs) == 2 else None
            stored = None if codes is None else _constant(codes)
            if stored is not None and stored.dtype == ir.DataType.INT8 and take.inputs[1] is node.inputs[1]:
                return True
    return False


def _roles(node: ir.Node) -> dict[int, str]:
    """The quantization-parameter inputs of ``node`` by index (empty for other ops)."""
    if node.op_type == "Gather" and node.domain in _STANDARD and len(node.inputs) == 2 and _is_row_scale_gather(node):
        return {0: "scale"}
    if node.op_type == "QLinearConcat" and node.domain in _CONTRIB:  # Y_scale, Y_zp, then (X, scale, zp) triples
        roles = {0: "scale", 1: "zero point"}
        roles.update({i: "scale" if (i - 2) % 3 == 1 else "zero point"
                      for i in range(2, len(node.inputs)) if (i - 2) % 3})
        return roles
    if node.op_type == "Mul" and node.domain in _STANDARD:  # w_s in Mul(x_s, w_s) of the dynamic int8 pattern
        sources = [v.producer() if v is not None else None for v in node.inputs]
        if any(p is not None and p.op_type == "DynamicQuantizeLinear" and node.inputs[i] is p.outputs[1]
               for i, p in enumerate(sources)):
            return {i: "scale" for i, p in enumerate(sources) if p is None}
        return {}
    found = _PARAMETERS.get(node.op_type)
    if found is None or node.domain not in found[0]:
        return {}
    return found[1]


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None:
        return value.const_value
    return ir.convenience.get_const_tensor(value)


def check_quantization_parameters(model: ir.Model) -> int:
    """Raise :class:`InvalidModelError` if a constant quantization parameter of ``model`` holds NaN or Inf.

    Walks every graph (subgraphs included) and function, one tensor at a time; each tensor is read once however
    many nodes share it (integer ones are not read). Returns the number of float tensors checked."""
    seen: set[int] = set()
    scanned = 0
    graphs: list[ir.Graph | ir.Function] = [*model.graphs(), *model.functions.values()]
    for graph in graphs:
        for node in graph:
            for index, role in _roles(node).items():
                value = node.inputs[index] if index < len(node.inputs) else None
                tensor = None if value is None else _constant(value)
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if role != "fp8 code" and not tensor.dtype.is_floating_point():
                    continue  # integer scales do not exist; integer zero points and codes are finite
                array = tensor.numpy()
                scanned += 1
                if role == "fp8 code":
                    array = array.view(ml_dtypes.float8_e4m3fn)
                found = first_nonfinite(array)
                if found is None:
                    continue
                index_text = f" at index [{', '.join(str(i) for i in found[0])}]" if found[0] else ""
                raise InvalidModelError(
                    f"{role} {value.name or '(unnamed)'!r} (input {index} of {node.op_type} node "
                    f"{node.name or '(unnamed)'!r}) holds {found[1]}{index_text}: refusing to write a model with a "
                    "non-finite quantization parameter (check the weights and the calibration data)")
    logger.debug("finite quantization parameters: %d float tensors checked", scanned)
    return scanned
