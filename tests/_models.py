"""Small model builders and ONNX Runtime helpers shared by the canonicalize/fusion/finalize tests."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "FLOAT_PASS_ORDER",
    "assert_close",
    "float_passes",
    "from_text",
    "init",
    "make_model",
    "op_counts",
    "random_feeds",
    "run_ort",
]

OPSET = 21

#: the float recipe's passes, in order (canonicalize, fuse, finalize)
FLOAT_PASS_ORDER = ("infer-shapes", "fold-constants", "remove-identity", "remove-dead-code", "fuse-pad-conv",
                    "fuse-conv-bn", "fuse-matmul-add", "fuse-conv-activation", "finalize")


def float_passes(*, finalize: bool = True) -> list:
    """Fresh instances of the float recipe's passes, in order."""
    from qcompiler.passes.canonicalize import (
        FoldConstantsPass,
        InferShapesPass,
        RemoveDeadCodePass,
        RemoveIdentityPass,
    )
    from qcompiler.passes.finalize import FinalizePass
    from qcompiler.passes.fusion.activation import FuseConvActivationPass
    from qcompiler.passes.fusion.batchnorm import FuseConvBatchNormPass
    from qcompiler.passes.fusion.gemm import FuseMatMulAddPass
    from qcompiler.passes.fusion.pad import FusePadConvPass

    passes = [InferShapesPass(), FoldConstantsPass(), RemoveIdentityPass(), RemoveDeadCodePass(),
              FusePadConvPass(), FuseConvBatchNormPass(), FuseMatMulAddPass(), FuseConvActivationPass()]
    if finalize:
        passes.append(FinalizePass())
    return passes


def init(name: str, array: np.ndarray) -> TensorProto:
    """An initializer proto."""
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[TensorProto] = (),
               opset: int = OPSET) -> ir.Model:
    """An IR model from helper-built protos (checked by onnx.checker first)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def from_text(text: str) -> ir.Model:
    """An IR model from ONNX text syntax."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def to_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def run_ort(model: ir.Model | bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model on CPU with graph optimizations off (so ORT's own fusions do not hide ours)."""
    data = model if isinstance(model, bytes) else to_bytes(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (static shapes required)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy()
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        if dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_close(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], rtol: float = 1e-5) -> None:
    """Relative error (max |a - e| / max(|e|, tiny)) below ``rtol`` for every output."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
        err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if e.size else 0.0
        assert err / scale < rtol, f"relative error {err / scale:.3g} >= {rtol}"


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op type -> number of nodes, over the main graph and every subgraph."""
    return dict(collections.Counter(node.op_type for graph in model.graphs() for node in graph))
