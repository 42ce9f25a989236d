"""lower-int8-qdq: Q/DQ placement, shared activation Q/DQ, int32 bias, ORT's QLinear kernels, accuracy vs fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import (
    cnn,
    mark_fused_activations,
    mlp,
    op_counts,
    optimized_op_counts,
    rel_l2,
    run,
    transformer_block,
)
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass


def _quantize(model: ir.Model, tmp_path, shape, *, n=32, seed=0, **options):
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    AnnotateInt8Pass()(model)
    CalibratePass(calibration_data=load_calibration_data(tmp_path / "calib.npz", model))(model)
    return LowerInt8QDQPass(**options)(model)


def test_cnn_exact_ops_no_qdq_inside_conv_relu_and_qlinear_kernels(tmp_path):
    model = cnn()
    mark_fused_activations(model)
    x = np.random.default_rng(9).standard_normal((4, 3, 16, 16)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    result = _quantize(model, tmp_path, (3, 16, 16))
    assert result.modified
    counters = dict(result.stats.counters)
    assert counters == {"lowered_Conv": 2, "lowered_Gemm": 1, "activation_qdq": 4, "int32_bias": 3,
                        "float_weights_removed": 6, "matmul_output_left_float": 1}
    assert op_counts(model) == {"QuantizeLinear": 4, "DequantizeLinear": 10, "Conv": 2, "Relu": 2,
                                "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    for conv in (n for n in model.graph if n.op_type == "Conv"):
        users = [u.op_type for u, _ in conv.outputs[0].uses()]
        assert users == ["Relu"]  # nothing quantized between Conv and its Relu
        assert conv.inputs[0].producer().op_type == "DequantizeLinear"
        assert conv.inputs[1].producer().attributes["axis"].as_int() == 0
        assert conv.inputs[2].producer().inputs[0].const_value.dtype == ir.DataType.INT32
    assert [v.name for v in model.graph.outputs] == ["y"]
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearConv", 0) == 2 and "Conv" not in optimized, optimized
    assert optimized.get("QGemm", 0) == 1 and "Gemm" not in optimized, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03
    assert all(layer["weight_sqnr_db"] > 30 for layer in result.stats.layers.values())


@pytest.mark.parametrize(("matmul_outputs", "kernels"), [(False, {"QGemm": 2}),  # MatMul+Add: QGemm, float output
                                                          (True, {"QLinearMatMul": 1, "QGemm": 1})])
def test_mlp_runs_integer_matmul_kernels(tmp_path, matmul_outputs, kernels):
    model = mlp()
    x = np.random.default_rng(10).standard_normal((8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    result = _quantize(model, tmp_path, (64,), matmul_outputs=matmul_outputs)
    assert ("matmul_output_left_float" in result.stats.counters) is not matmul_outputs
    optimized = optimized_op_counts(model)
    assert {k: optimized.get(k, 0) for k in kernels} == kernels, optimized
    assert "MatMul" not in optimized and "Gemm" not in optimized, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03


def test_one_shared_qdq_per_activation(tmp_path):
    model = transformer_block()
    x = np.random.default_rng(11).standard_normal((2, 8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    _quantize(model, tmp_path, (8, 64))
    graph_input = model.graph.inputs[0]
    assert [u.op_type for u, _ in graph_input.uses()] == ["QuantizeLinear"]
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].producer() is not None
              and n.inputs[0].producer().inputs[0] is graph_input)
    assert sorted(u.name for u, _ in dq.outputs[0].uses()) == ["proj_k", "proj_q", "proj_v"]
    # the same tensor has one scale everywhere: every QuantizeLinear quantizes a different tensor
    quantized = [n.inputs[0] for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(quantized) == len(set(quantized)) == op_counts(model)["QuantizeLinear"]
    optimized = optimized_op_counts(model)
    # float outputs: MatMulIntegerToFloat; the FFN's first MatMul feeds the second through Relu: QLinearMatMul
    assert optimized.get("MatMulIntegerToFloat", 0) + optimized.get("QLinearMatMul", 0) == 5, optimized
    assert "MatMul" not in optimized, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.05


def test_missing_range_leaves_the_node_float(tmp_path):
    from qcompiler.errors import CalibrationError
    from qcompiler.qspec import ValueRange, set_range

    model = mlp()
    AnnotateInt8Pass()(model)
    with pytest.raises(CalibrationError, match="no activation has a calibrated range"):  # no calibration ran
        LowerInt8QDQPass()(model)
    x = next(v for v in model.graph.inputs if v.name == "x")
    set_range(x, ValueRange(-1.0, 1.0))  # calibration saw x but not h2: that layer stays float, counted
    result = LowerInt8QDQPass()(model)
    assert result.stats.skip_reasons() == {"no calibrated range for input 'h2'": 1}


def test_int32_bias_overflow_widens_the_weight_scale(tmp_path):
    weight = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    weight[2] = 0.0  # an all-zero channel with a large bias
    bias = np.array([0.1, -0.2, 1e4, 0.3], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel()),
                               helper.make_tensor("b", TensorProto.FLOAT, [4], bias)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    result = _quantize(model, tmp_path, (3, 4, 4))
    assert result.stats.counters["weight_scale_widened_for_bias"] == 1
    actual = run(model, {"x": x})[0]
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual[:, 2], expected[:, 2], rtol=1e-3)


def test_int8_activations_option(tmp_path):
    model = mlp()
    x = np.random.default_rng(12).standard_normal((8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    AnnotateInt8Pass(activation_dtype="int8")(model)
    CalibratePass(calibration_data=load_calibration_data(tmp_path / "calib.npz", model))(model)
    LowerInt8QDQPass()(model)
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert q.inputs[2].const_value.dtype == ir.DataType.INT8
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.04


def test_pipeline_end_to_end_int8_recipe(tmp_path):
    from qcompiler.config import load_recipe
    from qcompiler.pipelines import BuildContext, build_pipeline

    model = cnn()
    x = np.random.default_rng(13).standard_normal((4, 3, 16, 16)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    data = load_calibration_data(tmp_path / "calib.npz", model)
    report = build_pipeline(load_recipe("int8"), BuildContext(calibration_data=data)).run(model)
    by_name = {p.name: p for p in report.passes}
    assert by_name["annotate-int8"].stats.counters["annotated_Conv"] == 2
    assert by_name["lower-int8-qdq"].stats.counters["lowered_Conv"] == 2
    for conv in (n for n in model.graph if n.op_type == "Conv"):
        assert [u.op_type for u, _ in conv.outputs[0].uses()] == ["Relu"]
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearConv", 0) == 2 and "Conv" not in optimized, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03


def test_pipeline_end_to_end_int8_dynamic_recipe():
    from qcompiler.config import load_recipe
    from qcompiler.pipelines import BuildContext, build_pipeline

    model = mlp()
    x = np.random.default_rng(14).standard_normal((8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    report = build_pipeline(load_recipe("int8-dynamic"), BuildContext()).run(model)
    assert {p.name for p in report.passes} >= {"annotate-int8", "lower-int8-dynamic"}
    optimized = optimized_op_counts(model)
    assert optimized.get("DynamicQuantizeMatMul", 0) == 2, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03


def test_depthwise_conv_keeps_full_range_weights_under_reduce_range(tmp_path):
    # ORT's integer depthwise kernel accumulates in int16 x int16 -> int32 and cannot saturate, so 7-bit weights
    # only cost precision there (EfficientNet-Lite0: 55% -> 74% top-1 agreement with 8-bit depthwise weights).
    rng = np.random.default_rng(0)
    dw = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    dw[:, 0, 1, 1] -= dw.sum(axis=(1, 2, 3)) * 0.98  # large taps that nearly cancel (a BN-folded high-pass)
    mult = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)  # group 8, channel multiplier 2: not depthwise
    pw = rng.standard_normal((4, 16, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "dw"], ["a"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "mult"], ["b"], name="multiplier", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "pw"], ["y"], name="pointwise")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel())
                               for n, a in (("dw", dw), ("mult", mult), ("pw", pw))])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.abs(rng.standard_normal((4, 8, 6, 6))).astype(np.float32)
    expected = run(model, {"x": x})[0]
    result = _quantize(model, tmp_path, (8, 6, 6), reduce_range=True)
    assert result.stats.counters["depthwise_full_range"] == 1
    qmax = {}
    for conv in (n for n in model.graph if n.op_type == "Conv"):
        qmax[conv.name] = int(np.abs(conv.inputs[1].producer().inputs[0].const_value.numpy()).max())
    assert qmax == {"depthwise": 127, "multiplier": 63, "pointwise": 63}
    actual = run(model, {"x": x})[0]
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearConv", 0) == 3 and "Conv" not in optimized, optimized
    assert rel_l2(actual, expected) < 0.1  # activations calibrated on N(0, 1), fed |N(0, 1)|: a sanity bound


def _three_convs() -> ir.Model:
    """x -> [Conv+Relu] x3 (ca, cb, cc), 8 channels, 8x8."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, name in enumerate(["ca", "cb", "cc"]):
        nodes += [helper.make_node("Conv", [prev, f"{name}_w", f"{name}_b"], [f"{name}_o"], name=name,
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"{name}_o"], [f"{name}_r"], name=f"{name}_relu")]
        inits += [helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [8, 8 if i else 3, 3, 3],
                                     (rng.standard_normal((8, 8 if i else 3, 3, 3)) / 6).astype(np.float32).ravel()),
                  helper.make_tensor(f"{name}_b", TensorProto.FLOAT, [8], (rng.standard_normal(8) * 0.1).ravel())]
        prev = f"{name}_r"
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_excluded_layer_between_quantized_layers_really_stays_float(tmp_path):
    """DQ -> float Conv -> Q would be turned by ONNX Runtime into a QLinearConv with its own per-tensor weights."""
    from qcompiler.config import load_recipe, override
    from qcompiler.pipelines import BuildContext, build_pipeline

    model = _three_convs()
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    recipe = override(load_recipe("int8"), quantization={"exclude_nodes": ("cb",)})
    data = load_calibration_data(tmp_path / "calib.npz", model)
    report = build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)
    lower = next(p for p in report.passes if p.name == "lower-int8-qdq")
    assert lower.stats.counters["lowered_Conv"] == 2
    assert lower.stats.counters["activation_left_float_for_float_layers"] == 1
    cb = next(n for n in model.graph if n.name == "cb")
    assert cb.inputs[0].producer().op_type == "Relu"  # reads ca's float output, not a DequantizeLinear
    assert cb.inputs[1].const_value is not None  # float weight kept
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearConv", 0) == 1 and optimized.get("Conv", 0) == 1, optimized
