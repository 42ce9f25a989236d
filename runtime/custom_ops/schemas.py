"""The ``ai.qcompiler`` operator set: what each op takes, and the check a model's use of it must pass.

Opset version 1 has two ops, both weight-only matmuls that ONNX Runtime's CPU kernels cannot express:

- ``MatMulIntN(A, B, scales, zero_points, bias) -> Y``, attributes ``K``, ``N``, ``bits`` (1-8), ``block_size``
  (a multiple of 8): MatMulNBits' arrangement with a generic bit packing (:mod:`qcompiler.runtime.packing`), for
  3 bits above all (MatMulNBits runs only 2, 4 and 8 on CPU in ORT 1.32).
- ``MatMulFp8(A, B, scale, bias) -> Y``, attributes ``K``, ``N``: FP8 E4M3FN weights as the bytes of ``W^T``,
  ``uint8 [N, K]``, with one float32 scale per output column, dequantized inside the op (ORT has DequantizeLinear +
  MatMul only).

Every input is required: onnxruntime-extensions' Python ops have no optional inputs (ORT refuses an empty input
name for them), so an absent ``zero_points`` or ``bias`` is an empty tensor (shape ``[0]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from qcompiler.runtime.custom_ops.kernels import matmul_fp8, matmul_intn

__all__ = ["DOMAIN", "OPSET_VERSION", "SCHEMAS", "CustomOpError", "OpSchema", "check_nodes"]

#: the op domain of qcompiler's own ops
DOMAIN = "ai.qcompiler"
#: the newest version of the domain this runtime runs
OPSET_VERSION = 1


class CustomOpError(ValueError):
    """A model uses the ``ai.qcompiler`` domain in a way this runtime cannot run."""


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """One op: its inputs (name, element type), required int64 attributes, numpy kernel and first opset version."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    attributes: tuple[str, ...]
    kernel: Callable[..., np.ndarray]
    since_version: int = 1


SCHEMAS: dict[str, OpSchema] = {schema.name: schema for schema in (
    OpSchema("MatMulIntN", (("A", "float32"), ("B", "uint8"), ("scales", "float32"), ("zero_points", "uint8"),
                            ("bias", "float32")), ("K", "N", "bits", "block_size"), matmul_intn),
    OpSchema("MatMulFp8", (("A", "float32"), ("B", "uint8"), ("scale", "float32"), ("bias", "float32")),
             ("K", "N"), matmul_fp8),
)}


def check_nodes(version: int, nodes: Iterable[tuple[str, str, tuple[str, ...]]]) -> tuple[str, ...]:
    """The ops of ours a model uses, given its ``ai.qcompiler`` opset version and its nodes of that domain as
    (node name, op type, input names).

    Raises:
        CustomOpError: the version is newer than :data:`OPSET_VERSION`, an op is unknown (or newer than the
            model's version), or a node has the wrong number of inputs or an absent (empty-named) one.
    """
    if version > OPSET_VERSION:
        raise CustomOpError(f"it uses {DOMAIN} opset {version}; this runtime runs up to opset {OPSET_VERSION} "
                            "(upgrade qcompiler)")
    used: set[str] = set()
    for name, op_type, inputs in nodes:
        schema = SCHEMAS.get(op_type)
        if schema is None or schema.since_version > version:
            raise CustomOpError(f"node '{name}' uses {DOMAIN}::{op_type}, which {DOMAIN} opset {version} of this "
                                f"runtime does not have (known: {', '.join(sorted(SCHEMAS))})")
        if len(inputs) != len(schema.inputs) or "" in inputs:
            given = f"{len(inputs)} inputs" if "" not in inputs else "an absent input"
            raise CustomOpError(f"node '{name}' ({DOMAIN}::{op_type}) has {given}; it takes {len(schema.inputs)} "
                                f"({', '.join(n for n, _ in schema.inputs)}; an absent one is an empty tensor)")
        used.add(op_type)
    return tuple(sorted(used))
