"""Property test: random small float graphs keep their meaning through the float pipeline, which is idempotent.

Hypothesis draws chains/DAGs over image tensors ``[1, C, 4, 4]`` and matrices ``[M, D]`` made of Conv (plain,
grouped, depthwise, with/without bias), BatchNormalization, Relu, Clip, Add, Mul, MatMul (rank 2 and rank 3), Gemm,
Identity, Transpose, Reshape and Constant subexpressions, with random weights; some intermediate values are also
graph outputs (so some fusions must be skipped). The float recipe's passes must keep every output within relative
error 1e-5 (ONNX Runtime, CPU, its own graph optimizations off), and a second run must report no pass modified.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from _models import assert_close, float_passes, random_feeds, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.pass_manager import PassPipeline

IMAGE_OPS = ("conv", "pad_conv", "conv_bn", "conv_bn", "bn", "relu", "clip", "add_other", "mul_const_expr", "identity", "transpose", "to_matrix")
MATRIX_OPS = ("matmul", "matmul_add", "matmul3_add", "gemm", "gemm_bn", "matmul_bn", "matmul_add_bn", "bn", "relu", "clip", "add_bias", "add_other",
              "mul_const_expr", "identity", "transpose")


class _Builder:
    """Accumulates nodes/initializers and the shape of every value."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, array: np.ndarray, base: str = "w") -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int, scale: float = 0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{op}_"), **attrs))
        self.shapes[out] = shape
        return out

    def const_node(self, array: np.ndarray) -> str:
        out = self.fresh("k")
        tensor = numpy_helper.from_array(np.asarray(array, np.float32), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant_"), value=tensor))
        return out

    def bn(self, x: str, channels: int) -> str:
        u = self.rng.uniform
        params = [u(0.5, 1.5, channels), u(-1, 1, channels), u(-1, 1, channels), u(0.5, 1.5, channels)]
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        return self.node("BatchNormalization", [x, *names], self.shapes[x], epsilon=1e-3)


def _apply(b: _Builder, op: str, x: str, draw) -> str:
    shape = b.shapes[x]
    rng = b.rng
    if op == "conv":
        c = shape[1]
        group = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
        k = draw(st.sampled_from([1, 3]))
        inputs = [x, b.weight(c, c // group, k, k)]
        if draw(st.booleans()):
            inputs.append(b.weight(c))
        return b.node("Conv", inputs, shape, group=group, pads=[k // 2] * 4)
    if op == "pad_conv":  # explicit "same" padding (exporters' static_padding), sometimes with a nonzero value
        c, (n, _, h, w) = shape[1], shape
        k = draw(st.sampled_from([1, 3]))
        begin = [draw(st.integers(0, k - 1)) for _ in range(2)]
        pads = [0, 0, *begin, 0, 0, *[k - 1 - p for p in begin]]
        inputs = [x, b.const(np.array(pads, np.int64), "pads")]
        if draw(st.booleans()):
            inputs.append(b.const(np.float32(draw(st.sampled_from([0.0, 0.5]))), "fill"))
        padded = b.node("Pad", inputs, (n, c, h + k - 1, w + k - 1))
        del b.shapes[padded]  # the other ops assume the input's spatial size: only the Conv reads the Pad
        return b.node("Conv", [padded, b.weight(c, c, k, k)], shape)
    if op in ("conv_bn", "gemm_bn", "matmul_bn", "matmul_add_bn"):
        y = _apply(b, op.rsplit("_", 1)[0], x, draw)
        return b.bn(y, b.shapes[y][1])
    if op == "bn":
        return b.bn(x, shape[1])
    if op == "relu":
        return b.node("Relu", [x], shape)
    if op == "clip":
        return b.node("Clip", [x, b.const(np.float32(-1.0), "lo"), b.const(np.float32(1.5), "hi")], shape)
    if op == "add_other":
        same = sorted(v for v, s in b.shapes.items() if s == shape)
        other = draw(st.sampled_from(same))
        return b.node(draw(st.sampled_from(["Add", "Mul"])), [x, other], shape)
    if op == "mul_const_expr":  # a constant subexpression for fold-constants
        bshape = (shape[1], 1, 1) if len(shape) == 4 else (shape[-1],)
        k1, k2 = b.const_node(rng.uniform(0.5, 1.0, bshape)), b.const_node(rng.uniform(0.1, 0.5, bshape))
        k = b.node(draw(st.sampled_from(["Add", "Mul"])), [k1, k2], bshape)
        k = b.node("Sqrt", [k], bshape)
        return b.node(draw(st.sampled_from(["Add", "Mul"])), [x, k], shape)
    if op == "identity":
        return b.node("Identity", [x], shape)
    if op == "transpose":
        if len(shape) == 4:
            return b.node("Transpose", [x], (shape[0], shape[1], shape[3], shape[2]), perm=[0, 1, 3, 2])
        return b.node("Transpose", [x], (shape[1], shape[0]), perm=[1, 0])
    if op == "to_matrix":
        new = (shape[1] * 4, 4)
        return b.node("Reshape", [x, b.const(np.array(new, np.int64), "shape")], new)
    m, d = shape
    d_out = draw(st.sampled_from([3, 4, 6]))
    if op == "matmul":
        return b.node("MatMul", [x, b.weight(d, d_out)], (m, d_out))
    if op == "matmul_add":
        mm = b.node("MatMul", [x, b.weight(d, d_out)], (m, d_out))
        bias_shape = draw(st.sampled_from([(d_out,), (1, d_out), (m, d_out), (m, 1)]))
        return b.node("Add", [mm, b.weight(*bias_shape)] if draw(st.booleans()) else [b.weight(*bias_shape), mm],
                      (m, d_out))
    if op == "matmul3_add":  # rank-3 MatMul + Add stays as it is
        x3 = b.node("Reshape", [x, b.const(np.array([1, m, d], np.int64), "shape")], (1, m, d))
        mm = b.node("MatMul", [x3, b.weight(d, d_out)], (1, m, d_out))
        y3 = b.node("Add", [mm, b.weight(d_out)], (1, m, d_out))
        return b.node("Reshape", [y3, b.const(np.array([m, d_out], np.int64), "shape")], (m, d_out))
    if op == "gemm":
        trans_b = draw(st.sampled_from([0, 1]))
        w = b.weight(d_out, d) if trans_b else b.weight(d, d_out)
        inputs = [x, w] + ([b.weight(d_out)] if draw(st.booleans()) else [])
        return b.node("Gemm", inputs, (m, d_out), transB=trans_b, alpha=draw(st.sampled_from([1.0, 0.5])),
                      beta=draw(st.sampled_from([1.0, 2.0])))
    if op == "add_bias":
        return b.node("Add", [x, b.weight(d)], shape)
    raise AssertionError(op)


@st.composite
def float_graphs(draw) -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    if draw(st.booleans()):
        x_shape: tuple[int, ...] = (1, draw(st.sampled_from([2, 4])), 4, 4)
    else:
        x_shape = (3, draw(st.sampled_from([4, 6])))
    b.shapes["x"] = x_shape
    last = "x"
    for _ in range(draw(st.integers(1, 8))):
        usable = sorted(v for v, shape in b.shapes.items() if len(shape) in (2, 4))
        x = draw(st.sampled_from([last, last, *usable]))  # mostly chains, sometimes a DAG
        ops = IMAGE_OPS if len(b.shapes[x]) == 4 else MATRIX_OPS
        last = _apply(b, draw(st.sampled_from(ops)), x, draw)
    outputs = [last]
    for extra in draw(st.lists(st.sampled_from(sorted(b.shapes)), max_size=2)):
        if extra not in outputs and extra != "x":
            outputs.append(extra)
    if draw(st.booleans()):  # an Identity feeding the graph output
        outputs[0] = b.node("Identity", [outputs[0]], b.shapes[outputs[0]])
    graph = helper.make_graph(
        b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(b.shapes[o])) for o in outputs], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=float_graphs())
def test_float_pipeline_keeps_outputs_and_is_idempotent(proto: onnx.ModelProto) -> None:
    model = ir.serde.deserialize_model(proto)
    feeds = random_feeds(model)
    expected = run_ort(proto.SerializeToString(), feeds)
    PassPipeline(float_passes()).run(model)
    assert_close(run_ort(model, feeds), expected, rtol=1e-5)
    report = PassPipeline(float_passes()).run(model)
    assert [p.name for p in report.passes if p.modified] == []
