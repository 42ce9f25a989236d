"""lower-int8-dynamic: the exact ORT-fusable pattern, ORT's integer kernels, numerics vs numpy and vs fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mlp, op_counts, optimized_op_counts, rel_l2, run, transformer_block
from onnx import TensorProto, helper

from qcompiler.errors import ConfigError
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.lower.int8_dynamic import LowerInt8DynamicPass
from qcompiler.qspec import quantize, scale_zero_point

INTEGER_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")


def _lower(model: ir.Model, **options):
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul", "Gemm"))(model)
    return LowerInt8DynamicPass(**options)(model)


def test_mlp_exact_ops_and_ort_kernels():
    model = mlp()
    result = _lower(model)
    assert result.modified
    assert dict(result.stats.counters) == {"lowered_MatMul": 1, "lowered_Gemm": 1, "float_weights_removed": 2}
    assert op_counts(model) == {"DynamicQuantizeLinear": 2, "MatMulInteger": 2, "Cast": 2, "Mul": 4, "Add": 2,
                                "Relu": 1}
    assert [v.name for v in model.graph.outputs] == ["y"]
    optimized = optimized_op_counts(model)
    assert optimized.get("DynamicQuantizeMatMul", 0) == 2, optimized
    assert "MatMul" not in optimized and "Gemm" not in optimized
    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    assert weights["w1_quantized"].dtype == np.int8 and weights["w1_quantized"].shape == (64, 128)
    assert weights["w2_quantized"].shape == (128, 32)  # Gemm transB=1: stored as [K, N]
    assert weights["w1_scale"].shape == (128,) and "w1" not in weights
    for layer in ("fc1", "fc2"):
        assert result.stats.layers[layer]["weight_sqnr_db"] > 35


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_close_to_float(seed):
    model = mlp(seed=seed)
    x = np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    _lower(model)
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03


def test_rank3_activations_share_one_dynamic_quantization():
    model = transformer_block()
    x = np.random.default_rng(3).standard_normal((2, 8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    _lower(model)
    counts = op_counts(model)
    assert counts["DynamicQuantizeLinear"] == 3 and counts["MatMulInteger"] == 5 and "MatMul" not in counts
    dql = [n for n in model.graph if n.op_type == "DynamicQuantizeLinear" and n.inputs[0].name == "x"]
    assert len(dql) == 1 and len(dql[0].outputs[0].uses()) == 3
    optimized = optimized_op_counts(model)
    assert sum(optimized.get(k, 0) for k in INTEGER_KERNELS) == 5 and "MatMul" not in optimized, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.04


def test_numerics_match_a_numpy_reference_of_the_pattern():
    model = mlp(k=96, hidden=48, n=8)
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    _lower(model)
    g = model.graph
    target = next(n for n in g if n.op_type == "Mul" and n.name == "fc1_output_scale_mul").outputs[0]
    g.outputs.append(target)
    actual = run(model, {"x": x})[1]
    wq = g.initializers["w1_quantized"].const_value.numpy()
    ws = g.initializers["w1_scale"].const_value.numpy()
    scale, zp = scale_zero_point(x.min(), x.max(), "uint8", symmetric=False)
    xq = quantize(x, scale, zp, "uint8")
    acc = (xq.astype(np.int64) - int(zp)) @ wq.astype(np.int64)
    expected = acc.astype(np.float32) * (np.float32(scale) * ws)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_full_range_weights_option():
    model = mlp()
    _lower(model, reduce_range=False)
    assert np.abs(model.graph.initializers["w1_quantized"].const_value.numpy()).max() == 127
    reduced = mlp()
    _lower(reduced, reduce_range=True)
    assert np.abs(reduced.graph.initializers["w1_quantized"].const_value.numpy()).max() == 63
    with pytest.raises(ConfigError):
        LowerInt8DynamicPass(reduce_range="yes")


def test_gemm_alpha_beta_are_folded():
    model = mlp(gemm_alpha=0.5, gemm_beta=2.0)
    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    _lower(model)
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.03


def test_skips_conv_and_trans_a():
    model = cnn()
    AnnotateInt8Pass(static_activations=False)(model)
    result = LowerInt8DynamicPass()(model)
    assert result.stats.skip_reasons() == {"Conv has no dynamic int8 kernel (use the static int8 recipe)": 2}
    assert result.stats.counters["lowered_Gemm"] == 1
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="ta", transA=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))])
    gemm = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    AnnotateInt8Pass(static_activations=False)(gemm)
    result = LowerInt8DynamicPass()(gemm)
    assert not result.modified and result.stats.skip_reasons() == {"Gemm with transA=1": 1}


def test_nothing_annotated_is_not_modified():
    model = mlp()
    assert not LowerInt8DynamicPass()(model).modified
    assert op_counts(model) == {"MatMul": 1, "Add": 1, "Relu": 1, "Gemm": 1}
