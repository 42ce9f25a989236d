"""Small float models built in code for the int8 tests (annotate, calibrate, lowering), and ORT helpers."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = ["mlp", "transformer_block", "cnn", "mark_fused_activations", "run", "optimized_op_counts", "op_counts",
           "rel_l2"]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def mlp(seed: int = 0, k: int = 64, hidden: int = 128, n: int = 32, batch: str | int = "B",
        gemm_alpha: float = 1.0, gemm_beta: float = 1.0, opset: int = 17) -> ir.Model:
    """x[B, K] -> MatMul + Add -> Relu -> Gemm(transB=1, bias) -> y[B, N]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((n, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1, alpha=gemm_alpha, beta=gemm_beta),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
                  [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)], opset)


def transformer_block(seed: int = 0, d: int = 64, ff: int = 128) -> ir.Model:
    """x[B, S, D]: q/k/v projections sharing x, then an FFN: rank-3 MatMuls with constant 2-D weights."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name in ("q", "k", "v"):
        inits.append(_init(f"w{name}", (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", f"w{name}"], [name], name=f"proj_{name}"))
    nodes += [
        helper.make_node("Add", ["q", "k"], ["qk"], name="mix1"),
        helper.make_node("Add", ["qk", "v"], ["qkv"], name="mix2"),
        helper.make_node("MatMul", ["qkv", "w_up"], ["up"], name="ffn_up"),
        helper.make_node("Relu", ["up"], ["act"], name="ffn_relu"),
        helper.make_node("MatMul", ["act", "w_down"], ["y"], name="ffn_down"),
    ]
    inits += [_init("w_up", (rng.standard_normal((d, ff)) / np.sqrt(d)).astype(np.float32)),
              _init("w_down", (rng.standard_normal((ff, d)) / np.sqrt(ff)).astype(np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)


def cnn(seed: int = 0, batch: str | int = "N", size: int = 16, classes: int = 10) -> ir.Model:
    """x[N, 3, H, W] -> Conv+Relu -> Conv(stride 2)+Relu -> GlobalAveragePool -> Flatten -> Gemm -> y."""
    rng = np.random.default_rng(seed)
    c1 = (rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    c2 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    fc = (rng.standard_normal((16, classes)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1_b"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2", "c2_b"], ["a2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc"),
    ]
    inits = [_init("c1", c1), _init("c1_b", (rng.standard_normal(8) * 0.1).astype(np.float32)),
             _init("c2", c2), _init("c2_b", (rng.standard_normal(16) * 0.1).astype(np.float32)),
             _init("fc", fc), _init("fc_b", (rng.standard_normal(classes) * 0.1).astype(np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], inits)


def mark_fused_activations(model: ir.Model) -> int:
    """Set the fusion pass's metadata on Conv/Gemm/MatMul followed by a single-consumer Relu/Clip."""
    count = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0][0].op_type in ("Relu", "Clip") and not node.outputs[0].is_graph_output():
            node.meta["qcompiler.fused_activation"] = uses[0][0]
            uses[0][0].meta["qcompiler.fused_into"] = node
            count += 1
    return count


def _session(model: ir.Model, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model in ONNX Runtime (CPU)."""
    return _session(model).run(None, feeds)


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph))


def optimized_model(model: ir.Model) -> onnx.ModelProto:
    """The graph ORT actually runs (``SessionOptions.optimized_model_filepath``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        _session(model, path)
        return onnx.load(path)


def optimized_op_counts(model: ir.Model) -> dict[str, int]:
    """Op counts of the graph ORT actually runs."""
    return dict(collections.Counter(n.op_type for n in optimized_model(model).graph.node))


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected.astype(np.float64)))
