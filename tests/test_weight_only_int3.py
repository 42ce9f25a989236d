"""Compiling to the ai.qcompiler custom ops: int3 weights (RTN, GPTQ, HQQ, AWQ, mixed precision) as MatMulIntN
and FP8 as the fused MatMulFp8, run through qcompiler.runtime.Session against numpy and the float model; recipes,
refusals and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _cli import one_error_line, run_main
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only, hqq_codes, lower_weight_only, rtn_and_lower
from onnx import TensorProto, helper, numpy_helper
from test_weight_only import _calibrated, _mlp

from qcompiler.config import load_recipe, override, recipe_from_dict
from qcompiler.errors import ConfigError
from qcompiler.formats.blockwise import quantize_rtn
from qcompiler.passes.algorithms.weight_only_hqq import WeightOnlyHQQPass
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass
from qcompiler.runtime import Session

F = TensorProto.FLOAT


def _run_file(model: ir.Model, folder: Path, feeds: dict[str, np.ndarray]) -> tuple[Session, np.ndarray]:
    path = folder / "lowered.onnx"
    onnx.save(ir.to_proto(model), path)
    session = Session(path)
    return session, session.run(feeds)[session.outputs[0].name]


def _weights(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    return tuple(model.graph.initializers[n].const_value.numpy() for n in ("w1", "w2"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int3_lowers_to_matmulintn_that_matches_the_numpy_reference(tmp_path, symmetric):
    model, reference = _mlp(), _mlp()  # K = 100: the last block of 32 is padded
    w1, w2 = _weights(reference)
    result = lower_weight_only(bits=3, block_size=32, symmetric=symmetric)(model)
    assert result.modified and result.stats.counters["lowered_MatMul_intn"] == 2
    assert result.stats.layers["fc1"]["scheme"] == "int3-weight-only"
    nodes = [n for n in model.graph if n.op_type == "MatMulIntN"]
    assert len(nodes) == 2 and all(n.domain == "ai.qcompiler" for n in nodes)
    assert model.opset_imports["ai.qcompiler"] == 1
    assert {a: nodes[0].attributes[a].value for a in ("K", "N", "bits", "block_size")} == \
        {"K": 100, "N": 48, "bits": 3, "block_size": 32}
    zero_points, bias = nodes[0].inputs[3], nodes[0].inputs[4]
    assert (zero_points.const_value.numpy().size == 0) == symmetric and bias.const_value.numpy().size == 0
    assert nodes[1].inputs[4] is bias  # one shared empty tensor stands for every absent bias
    x = np.random.default_rng(1).standard_normal((2, 3, 100)).astype(np.float32)
    session, y = _run_file(model, tmp_path, {"x": x})
    assert session.custom_ops == ("MatMulIntN",)
    d1, d2 = (quantize_rtn(w, 3, 32, symmetric).dequantize() for w in (w1, w2))
    np.testing.assert_allclose(y, np.maximum(x @ d1, 0) @ d2, rtol=1e-4, atol=1e-4)


def test_gemm_bias_and_transposed_weight_go_into_matmulintn(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 64)).astype(np.float32)  # B of Gemm(transB=1): W = B^T [64, 12]
    c = rng.standard_normal(12).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, name="gemm")], "g",
                              [helper.make_tensor_value_info("x", F, ["B", 64])],
                              [helper.make_tensor_value_info("y", F, ["B", 12])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    lower_weight_only(bits=3, block_size=16, symmetric=False)(model)
    (node,) = list(model.graph)
    assert node.op_type == "MatMulIntN" and node.inputs[4].name == "c"
    x = rng.standard_normal((5, 64)).astype(np.float32)
    _, y = _run_file(model, tmp_path, {"x": x})
    expected = x @ quantize_rtn(np.ascontiguousarray(w.T), 3, 16, False).dequantize() + c
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_int3_gptq_beats_rtn_and_its_codes_are_lowered(tmp_path):
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _mlp()
    data, x = _calibrated(tmp_path, model)
    annotate_weight_only(model, bits=3, block_size=32, symmetric=False)
    result = WeightOnlyGPTQPass(calibration_data=data)(model)
    for name in ("fc1", "fc2"):
        layer = result.stats.layers[name]
        assert layer["gptq_output_error_db"] < layer["rtn_output_error_db"], layer
    lowered = LowerWeightOnlyPass()(model)
    assert lowered.stats.counters["codes_chosen_by_algorithm"] == 2
    rtn = _mlp()
    lower_weight_only(bits=3, block_size=32, symmetric=False)(rtn)
    expected = run(_mlp(), {"x": x[:16]})[0]
    _, gptq_y = _run_file(model, tmp_path, {"x": x[:16]})
    _, rtn_y = _run_file(rtn, tmp_path, {"x": x[:16]})
    assert rel_l2(gptq_y, expected) < rel_l2(rtn_y, expected)


def test_int3_hqq_codes_are_lowered(tmp_path):
    model, reference = _mlp(), _mlp()
    w1, w2 = _weights(reference)
    annotate_weight_only(model, bits=3, block_size=32, symmetric=False)
    assert WeightOnlyHQQPass()(model).stats.counters["layers"] == 2
    assert LowerWeightOnlyPass()(model).stats.counters["codes_chosen_by_algorithm"] == 2
    x = np.random.default_rng(3).standard_normal((2, 3, 100)).astype(np.float32)
    _, y = _run_file(model, tmp_path, {"x": x})
    d1, d2 = (hqq_codes(w, 3, 32, False).dequantize() for w in (w1, w2))
    np.testing.assert_allclose(y, np.maximum(x @ d1, 0) @ d2, rtol=1e-4, atol=1e-4)


def test_int3_awq_lowers_the_error_against_rtn(tmp_path):
    from test_weight_only import _outlier_data

    from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass

    model = _mlp()
    data, x = _outlier_data(tmp_path, model)
    annotate_weight_only(model, bits=3, block_size=32, symmetric=False)
    result = WeightOnlyAWQPass(calibration_data=data)(model)
    assert result.modified and result.stats.counters["groups_scaled"] >= 1
    assert LowerWeightOnlyPass()(model).stats.counters["codes_chosen_by_algorithm"] >= 1
    rtn = _mlp()
    lower_weight_only(bits=3, block_size=32, symmetric=False)(rtn)
    expected = run(_mlp(), {"x": x[:8]})[0]
    _, awq_y = _run_file(model, tmp_path, {"x": x[:8]})
    _, rtn_y = _run_file(rtn, tmp_path, {"x": x[:8]})
    assert rel_l2(awq_y, expected) < rel_l2(rtn_y, expected)


def test_mixed_precision_with_3_bit_candidates(tmp_path):
    from test_weight_bits import _data, _two_branches

    from qcompiler.passes.algorithms.weight_bits import SelectWeightBitsPass

    model = _two_branches()  # the output is 10x more sensitive to layer a than to b
    data, x = _data(tmp_path, model)
    annotate_weight_only(model, bits=4, block_size=32)
    result = SelectWeightBitsPass(calibration_data=data, target_bits=3.5, candidate_bits=(3, 4))(model)
    assert {name: layer["chosen_bits"] for name, layer in result.stats.layers.items()} == {"a": 4, "b": 3}
    rtn_and_lower(model)
    assert sorted(n.op_type for n in model.graph if n.name in ("a", "b")) == ["MatMulIntN", "MatMulNBits"]
    _, y = _run_file(model, tmp_path, {"x": x[:2]})
    assert rel_l2(y, run(_two_branches(), {"x": x[:2]})[0]) < 0.2
    recipe = recipe_from_dict({"extends": "int4", "weight-only": {"candidate_bits": [3, 4], "target_bits": 3.5}})
    assert recipe.weight_only.candidate_bits == (3, 4)
    # float zero points: the 3-bit members of the family store integer ones (MatMulIntN has no float zero points)
    mixed = override(load_recipe("int4"), weight_only={"target_bits": 3.5, "candidate_bits": [2, 3, 4],
                                                       "symmetric": False, "zero_point": "float"})
    from qcompiler.formats import get_format
    from qcompiler.formats.registry import spec_at_bits

    base = get_format("int4").spec(block_size=mixed.weight_only.block_size, symmetric=False, zero_point="float")
    assert spec_at_bits(base, 3).zero_point == "int" and spec_at_bits(base, 2).zero_point == "float"


def test_fused_fp8_computes_what_dequantize_linear_does(tmp_path):
    fused, plain = _mlp(), _mlp()
    result = lower_weight_only(bits=8, fp8=True, fp8_fused=True)(fused)
    lower_weight_only(bits=8, fp8=True)(plain)
    assert result.stats.counters["lowered_MatMul_fp8"] == 2 and "opset_17_converted_to_19" not in \
        result.stats.counters
    assert fused.opset_imports[""] == 17 and fused.opset_imports["ai.qcompiler"] == 1
    nodes = [n for n in fused.graph if n.op_type == "MatMulFp8"]
    assert len(nodes) == 2 and nodes[0].inputs[1].dtype == ir.DataType.UINT8
    assert nodes[0].inputs[1].shape == ir.Shape([48, 100])  # W^T [N, K]
    assert not any(n.op_type == "DequantizeLinear" for n in fused.graph)
    x = np.random.default_rng(6).standard_normal((2, 3, 100)).astype(np.float32)
    session, y = _run_file(fused, tmp_path, {"x": x})
    assert session.custom_ops == ("MatMulFp8",)
    np.testing.assert_allclose(y, run(plain, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_recipes_and_refusals():
    int3, fused = load_recipe("int3"), load_recipe("fp8-fused")
    assert int3.weight_only.format == "int3" and int3.weight_only.bits == 3
    assert fused.weight_only.format == "fp8" and fused.weight_only.fp8_kernel == "fused"
    assert load_recipe("fp8-weight").weight_only.fp8_kernel == "dequantize"
    refusals = [(int3, {"symmetric": False, "zero_point": "float"}, "MatMulIntN stores uint8 zero points"),
                (int3, {"fp8_kernel": "fused"}, "fp8_kernel = 'fused' needs format = 'fp8'"),
                (fused, {"fp8_kernel": "native"}, "fp8_kernel must be one of dequantize, fused"),
                (int3, {"candidate_bits": [3, 5]}, "candidate_bits must be a list of 2, 3, 4 and/or 8")]
    for recipe, bad, match in refusals:
        with pytest.raises(ConfigError, match=match):
            override(recipe, weight_only=bad)
    for bad in ({"bits": 3, "symmetric": False, "float_zero_point": True}, {"bits": 8, "fp8_fused": True},
                {"bits": 1}):
        with pytest.raises(ConfigError):
            lower_weight_only(**bad)


@pytest.mark.parametrize(("recipe", "op", "tolerance"), [("int3", "MatMulIntN", 0.3), ("fp8-fused", "MatMulFp8", 0.06)])
def test_cli_end_to_end_through_the_runtime_session(tmp_path, capsys, recipe, op, tolerance):
    src, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(ir.to_proto(_mlp()), src)
    code, _, err = run_main([str(src), "-o", str(out), "--recipe", recipe, "-q"], capsys)
    assert code == 0, err
    session = Session(out)
    assert op in session.custom_ops and session.metadata["qcompiler.recipe"] == recipe
    assert json.loads(session.metadata["qcompiler.weight_only"])["format"] == load_recipe(recipe).weight_only.format
    x = np.random.default_rng(4).standard_normal((1, 5, 100)).astype(np.float32)
    error = rel_l2(session.run({"x": x})["y"], run(_mlp(), {"x": x})[0])
    assert 0 < error < tolerance


def test_cli_refuses_float_zero_points_for_int3(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(ir.to_proto(_mlp()), src)
    code, _, err = run_main([str(src), "-o", str(out), "--recipe", "int3", "--asymmetric", "--zero-point", "float"],
                            capsys)
    assert code == 2 and "uint8 zero points" in one_error_line(err) and not out.exists()
