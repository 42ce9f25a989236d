"""convert-qdq-to-qoperator: exact op counts, the integer chain, ORT outputs equal to the QDQ model's, skips, CLI.

Bound on the outputs: both models run the same integer kernels on the same int8/uint8 tensors (checked exactly on an
intermediate tensor), so where the output is an integer tensor dequantized they agree to within one output
quantization step (measured: identical), and where it is the float result of a MatMul/Gemm they differ only by the
float32 rounding of the epilogue (ORT's fused QGemm/MatMulIntegerToFloat versus Cast -> Mul -> Add): a few ulp of
the largest output, far below one quantization step. Measured: at most 0.5 ulp of max|y|; asserted: 4 ulp.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import cnn, mlp, op_counts, transformer_block
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.config import load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.passes.lower.qoperator import ConvertQDQToQOperatorPass
from qcompiler.pipelines import BuildContext, build_pipeline

_EPS = float(np.finfo(np.float32).eps)


def _lower(model: ir.Model, tmp_path, shape, **quantization) -> bytes:
    """Run the int8 recipe (QDQ) on ``model`` in place; return the QDQ model's bytes."""
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32))
    data = load_calibration_data(tmp_path / "calib.npz", model)
    recipe = override(load_recipe("int8"), quantization=quantization)
    build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)
    return ir.to_proto(model).SerializeToString()


def _ort(model: ir.Model | bytes, x: np.ndarray, extra_outputs: tuple[tuple[str, int], ...] = ()) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else ir.to_proto(model)
    proto.graph.output.extend(helper.make_tensor_value_info(name, dtype, None) for name, dtype in extra_outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _assert_float_outputs_agree(actual: np.ndarray, expected: np.ndarray) -> None:
    bound = 4 * _EPS * float(np.abs(expected).max())
    assert float(np.abs(actual - expected).max()) <= bound


def _convert(model: ir.Model, **options):
    result = ConvertQDQToQOperatorPass(**options)(model)
    onnx.checker.check_model(ir.to_proto(model))
    again = ConvertQDQToQOperatorPass(**options)(model)
    assert not again.modified and again.stats.skip_reasons() == result.stats.skip_reasons()
    return result


def test_cnn_becomes_an_integer_chain(tmp_path):
    model = cnn()
    qdq = _lower(model, tmp_path, (3, 16, 16), op_types=("Conv", "MatMul", "Gemm"))  # layers only
    result = _convert(model)
    assert result.modified and not result.stats.skips
    counters = dict(result.stats.counters)
    assert counters == {"QLinearConv": 2, "relu_absorbed": 2, "MatMulInteger": 1, "dequantize_removed": 9,
                        "initializers_removed": 9}
    # x enters through its QuantizeLinear; the DQ before the GlobalAveragePool (a float op) stays; so does the Q
    # of the Gemm's input, which now feeds MatMulInteger directly
    assert op_counts(model) == {"QuantizeLinear": 2, "QLinearConv": 2, "DequantizeLinear": 1, "GlobalAveragePool": 1,
                                "Flatten": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1, "Add": 1}
    conv1, conv2 = (n for n in model.graph if n.op_type == "QLinearConv")
    assert conv2.inputs[0].producer() is conv1 and conv1.outputs[0].dtype == ir.DataType.UINT8
    assert conv1.inputs[0].producer().op_type == "QuantizeLinear" and conv1.inputs[0].producer().inputs[0].name == "x"
    assert conv2.inputs[8].const_value.dtype == ir.DataType.INT32 and conv2.attributes["strides"].value == (2, 2)
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [("x", ir.DataType.FLOAT)]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("y", ir.DataType.FLOAT)]
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32) * 1.5
    integer = (("r2_quantized", TensorProto.UINT8),)  # conv2's output: a Q output in QDQ, QLinearConv's here
    (y_qdq, r2_qdq), (y_qop, r2_qop) = _ort(qdq, x, integer), _ort(model, x, integer)
    np.testing.assert_array_equal(r2_qop, r2_qdq)
    _assert_float_outputs_agree(y_qop, y_qdq)


def test_mlp_gemms_run_matmulinteger_with_transposed_weight(tmp_path):
    model = mlp()
    qdq = _lower(model, tmp_path, (64,))
    result = _convert(model)
    # fc1's Relu -> Q stays: a Gemm takes the float path (its bias is float after the integer accumulation)
    assert dict(result.stats.counters) == {"gemm_output_quantize_kept": 1, "MatMulInteger": 2,
                                           "dequantize_removed": 6, "initializers_removed": 11}
    assert op_counts(model) == {"QuantizeLinear": 2, "MatMulInteger": 2, "Cast": 2, "Mul": 2, "Add": 2, "Relu": 1}
    fc1, fc2 = (n for n in model.graph if n.op_type == "MatMulInteger")
    assert fc1.inputs[1].const_value.shape == (64, 128)
    assert fc2.inputs[1].const_value.shape == (128, 32)  # transB=1: [32, 128] transposed at compile time
    assert fc2.inputs[0].producer().op_type == "QuantizeLinear"
    adds = [n for n in model.graph if n.op_type == "Add"]
    assert all(a.inputs[1].const_value.dtype == ir.DataType.FLOAT for a in adds)  # int32 biases dequantized
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    _assert_float_outputs_agree(_ort(model, x)[0], _ort(qdq, x)[0])


def test_transformer_block_qlinearmatmul_and_shared_input(tmp_path):
    model = transformer_block()
    qdq = _lower(model, tmp_path, (8, 64))
    result = _convert(model)
    assert dict(result.stats.counters) == {"MatMulInteger": 4, "QLinearMatMul": 1, "relu_absorbed": 1,
                                           "dequantize_removed": 8, "initializers_removed": 8}
    assert op_counts(model) == {"QuantizeLinear": 2, "MatMulInteger": 4, "Cast": 4, "Mul": 4, "Add": 2,
                                "QLinearMatMul": 1}
    x_q = model.graph.inputs[0].uses()[0][0].outputs[0]
    assert sorted(u.name for u, _ in x_q.uses()) == ["proj_k", "proj_q", "proj_v"]
    up = next(n for n in model.graph if n.op_type == "QLinearMatMul")  # ffn_up -> Relu -> Q, the Relu absorbed
    assert [u.name for u, _ in up.outputs[0].uses()] == ["ffn_down"]
    x = np.random.default_rng(3).standard_normal((2, 8, 64)).astype(np.float32)
    _assert_float_outputs_agree(_ort(model, x)[0], _ort(qdq, x)[0])


def _residual_clip_cnn() -> ir.Model:
    """x -> Conv -> Clip(0, 6) -> Conv -> Add(., clip) -> Conv -> y: Clip to absorb, a residual Add, a Conv output."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    inits += [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Conv", ["c", "w2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "c"], ["s"], name="residual"),
             helper.make_node("Conv", ["s", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("contrib_ops", [True, False])
def test_clip_absorbed_and_qlinearadd(tmp_path, contrib_ops):
    model = _residual_clip_cnn()
    qdq = _lower(model, tmp_path, (3, 8, 8))
    result = _convert(model, contrib_ops=contrib_ops)
    assert result.stats.counters["clip_absorbed"] == 1
    if contrib_ops:
        assert not result.stats.skips and model.opset_imports["com.microsoft"] == 1
        # y is a graph output: the DequantizeLinear where the float world is left stays
        assert op_counts(model) == {"QuantizeLinear": 1, "QLinearConv": 3, "QLinearAdd": 1, "DequantizeLinear": 1}
    else:
        assert result.stats.skip_reasons() == {
            "Add of DequantizeLinears needs com.microsoft.QLinearAdd (contrib_ops is off)": 1}
        assert "com.microsoft" not in model.opset_imports
        assert op_counts(model) == {"QuantizeLinear": 2, "QLinearConv": 3, "DequantizeLinear": 3, "Add": 1}
    assert model.graph.outputs[0].producer().op_type == "DequantizeLinear"
    x = np.random.default_rng(5).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y_scale = float(model.graph.outputs[0].producer().inputs[1].const_value.numpy())
    assert float(np.abs(_ort(model, x)[0] - _ort(qdq, x)[0]).max()) <= y_scale  # within one output step


def test_relu_not_exact_to_absorb_stays_qdq(tmp_path):
    model = cnn()
    _lower(model, tmp_path, (3, 16, 16))
    # conv1's output quantization gets zero point 3 (Q and DQ share it, so the QDQ model stays consistent):
    # Q(Relu(v)) >= 3 while Q(v) reaches 0, so dropping the Relu would change the integers
    zero_point = model.graph.initializers["r1_zero_point"]
    zero_point.const_value = ir.tensor(np.array(3, np.uint8), name="r1_zero_point")
    qdq = ir.to_proto(model).SerializeToString()
    result = _convert(model)
    assert result.stats.skips == [("conv1", "Relu is not absorbed exactly by the output quantization "
                                            "(its bounds quantize to [3, 255], not [0, 255])")]
    assert dict(result.stats.counters)["QLinearConv"] == 1
    counts = op_counts(model)
    assert {k: counts.get(k, 0) for k in ("Conv", "Relu", "QLinearConv")} == {"Conv": 1, "Relu": 1, "QLinearConv": 1}
    conv1 = next(n for n in model.graph if n.op_type == "Conv")
    assert [n.producer().op_type for n in conv1.inputs] == ["DequantizeLinear"] * 3
    x = np.random.default_rng(6).standard_normal((4, 3, 16, 16)).astype(np.float32)
    _assert_float_outputs_agree(_ort(model, x)[0], _ort(qdq, x)[0])


def test_conv_with_float_output_runs_convinteger(tmp_path):
    model = cnn()
    qdq = _lower(model, tmp_path, (3, 16, 16), exclude_nodes=("conv2",))  # conv1 then feeds only a float layer
    result = _convert(model)
    assert result.stats.skip_reasons() == {"input is not a per-tensor DequantizeLinear": 1}  # conv2, float
    counts = op_counts(model)
    assert {k: counts.get(k, 0) for k in ("ConvInteger", "Conv", "Relu", "MatMulInteger")} == {
        "ConvInteger": 1, "Conv": 1, "Relu": 2, "MatMulInteger": 1}
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    _assert_float_outputs_agree(_ort(model, x)[0], _ort(qdq, x)[0])


def test_float_model_and_bad_option():
    model = cnn()
    result = ConvertQDQToQOperatorPass()(model)
    assert not result.modified
    assert result.stats.skip_reasons() == {"input is not a per-tensor DequantizeLinear": 3}
    with pytest.raises(ConfigError, match="contrib_ops must be true or false"):
        ConvertQDQToQOperatorPass(contrib_ops="yes")


def test_cli_int8_qop_recipe_end_to_end(tmp_path):
    from qcompiler.cli import main

    ir.save(cnn(), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    common = [str(tmp_path / "cnn.onnx"), "--calib", str(tmp_path / "calib.npz"), "-q"]
    assert main([*common, "-o", str(tmp_path / "qdq.onnx"), "--recipe", "int8"]) == 0
    report = tmp_path / "report.json"
    assert main([*common, "-o", str(tmp_path / "qop.onnx"), "--recipe", "int8-qop", "--verify-each",
                 "--report", str(report)]) == 0
    data = json.loads(report.read_text(encoding="utf-8"))
    entry = next(e for e in data["verification"] if e["pass"] == "convert-qdq-to-qoperator")
    assert entry["max_abs_error"] < 1e-5  # --verify-each compared the QOperator model with the QDQ one
    stats = next(p for p in data["passes"] if p["name"] == "convert-qdq-to-qoperator")
    assert stats["modified"] and stats["counters"]["QLinearConv"] == 2
    recipe = load_recipe("int8-qop")
    assert list(recipe.passes) == [*load_recipe("int8").passes[:-1], "convert-qdq-to-qoperator", "finalize"]
    qop = ir.load(tmp_path / "qop.onnx")
    assert op_counts(qop)["QLinearConv"] == 2 and "Conv" not in op_counts(qop)
    assert qop.metadata_props["qcompiler.recipe"] == "int8-qop"
    x = np.random.default_rng(8).standard_normal((4, 3, 16, 16)).astype(np.float32)
    qdq_bytes = (tmp_path / "qdq.onnx").read_bytes()
    _assert_float_outputs_agree(_ort((tmp_path / "qop.onnx").read_bytes(), x)[0], _ort(qdq_bytes, x)[0])
