"""Activation-only ops (Add, Softmax, GlobalAveragePool, LayerNormalization, a MatMul of two activations):
annotation, QDQ lowering into ONNX Runtime's integer kernels, and the sensitivity screening that leaves the
expensive ones in float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from _int8_models import optimized_op_counts, rel_l2, run
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.config import load_recipe, override
from qcompiler.metadata import NODE_QUANT_KEY
from qcompiler.passes.annotate import AnnotateInt8Pass, NodeQuant, is_activation_op, is_weight_layer, node_scheme
from qcompiler.pipelines import BuildContext, build_pipeline
from qcompiler.qspec import get_qspec

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits) -> ir.Model:
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _residual_cnn(seed: int = 0) -> ir.Model:
    """x -> conv1+Relu -> conv2 -> Add(conv1's Relu, conv2) -> conv3 -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    init = lambda name, shape, s: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "c1", "b1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "c2", "b2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["r1", "a2"], ["s"], name="residual"),
             helper.make_node("Conv", ["s", "c3", "b3"], ["a3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["a3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc")]
    inits = [init("c1", (8, 3, 3, 3), 0.2), init("b1", (8,), 0.1), init("c2", (8, 8, 3, 3), 0.1),
             init("b2", (8,), 0.1), init("c3", (8, 8, 3, 3), 0.1), init("b3", (8,), 0.1), init("fc", (8, 10), 0.3), init("fc_b", (10,), 0.1)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 12, 12])],
                  [helper.make_tensor_value_info("y", F, ["N", 10])], inits)


def _masked_attention(seed: int = 0, d: int = 16) -> ir.Model:
    """Scores q k^T of x's projections, plus an additive mask of -10000 (BERT's), Softmax, times v, projected.

    The mask makes the Add's output range [-10000, a few]: quantized to 8 bits the scores lose every difference
    that the Softmax turns into weights, so the mask Add and the Softmax are the expensive activation-only ops."""
    rng = np.random.default_rng(seed)
    init = lambda name: numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj_q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="proj_k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="proj_v"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
             helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="proj_o")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["B", 8, d]),
                          helper.make_tensor_value_info("mask", F, ["B", 1, 8])],
                  [helper.make_tensor_value_info("y", F, ["B", 8, d])],
                  [init("wq"), init("wk"), init("wv"), init("wo")])


def _attention_data(tmp_path, count: int = 32):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((count, 8, 16)).astype(np.float32)
    mask = np.zeros((count, 1, 8), np.float32)
    for i in range(count):  # the last 1-4 positions are padding
        mask[i, 0, 8 - (i % 4 + 1):] = -10000.0
    np.savez(tmp_path / "calib.npz", x=x, mask=mask)
    return x, mask


def _compile(model: ir.Model, tmp_path, **quantization):
    data = load_calibration_data(tmp_path / "calib.npz", model)
    recipe = override(load_recipe("int8"), quantization=quantization) if quantization else load_recipe("int8")
    return build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)


def _stats(report, name: str):
    return next(record.stats for record in report.passes if record.name == name)


def test_annotation_marks_activation_inputs_and_output():
    model = _residual_cnn()
    AnnotateInt8Pass(op_types=("Conv", "Gemm", "Add", "GlobalAveragePool"))(model)
    nodes = {n.name: n for n in model.graph}
    add, gap = nodes["residual"], nodes["gap"]
    assert add.meta[NODE_QUANT_KEY] == NodeQuant("int8-static", "activations")
    assert is_activation_op(add) and not is_weight_layer(add) and is_weight_layer(nodes["conv1"])
    for value in (*add.inputs, add.outputs[0], gap.outputs[0]):
        spec = get_qspec(value)
        assert spec is not None and spec.dtype == "uint8" and not spec.dynamic


def test_annotation_skips_constant_operands_and_dynamic_activations():
    model = _masked_attention()
    nodes = [helper.make_node("Add", ["x", "c"], ["y"], name="bias_add")]
    const = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 4])], [helper.make_tensor_value_info("y", F, [2, 4])],
                   [numpy_helper.from_array(np.ones(4, np.float32), "c")])
    result = AnnotateInt8Pass(op_types=("Add",))(const)
    assert not result.modified
    assert dict(result.stats.skips) == {"bias_add": "constant operand (no integer kernel takes a float constant)"}
    result = AnnotateInt8Pass(op_types=("MatMul", "Softmax"), static_activations=False)(model)
    skips = dict(result.stats.skips)
    assert skips["softmax"] == skips["qk"] == "activation-only op needs static activations"
    assert is_weight_layer(next(n for n in model.graph if n.name == "proj_q"))


def test_residual_add_and_pool_become_integer_kernels(tmp_path):
    x = np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model = _residual_cnn()
    expected = run(model, {"x": x})[0]
    result = _compile(model, tmp_path)
    screening = _stats(result, "select-precision")
    # in context both cost nothing: their inputs and outputs are the Convs' quantized tensors anyway
    assert screening.counters["activation_ops_measured"] == 2 and not screening.counters.get(
        "activation_ops_kept_float")
    assert _stats(result, "lower-int8-qdq").counters["lowered_activation_Add"] == 1
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearAdd") == 1 and optimized.get("QLinearGlobalAveragePool") == 1
    assert optimized.get("QLinearConv") == 3 and "Add" not in optimized and "GlobalAveragePool" not in optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.05


def test_screening_leaves_the_masked_softmax_in_float(tmp_path):
    x, mask = _attention_data(tmp_path)
    reference = _masked_attention()
    expected = run(reference, {"x": x, "mask": mask})[0]
    model = _masked_attention()
    result = _compile(model, tmp_path, op_types=("MatMul", "Add", "Softmax"))
    skips = dict(_stats(result, "select-precision").skips)
    assert "mask_add" in skips and "softmax" in skips, skips
    layers = _stats(result, "select-precision").layers
    assert layers["softmax"]["kept_float"] and layers["softmax"]["sensitivity_sqnr_db"] < \
        layers["(whole model)"]["weight_layers_sqnr_db"] - 0.5
    nodes = {n.name: n for n in model.graph}
    assert get_qspec(nodes["softmax"].outputs[0]) is None or node_scheme(nodes["softmax"]) is None
    # the float Softmax reads float scores: nothing quantized between the mask Add and the Softmax
    assert nodes["softmax"].inputs[0].producer().op_type == "Add"
    actual = run(model, {"x": x, "mask": mask})[0]
    everything = _masked_attention()
    forced = _compile(everything, tmp_path, op_types=("MatMul", "Add", "Softmax"), min_sqnr_db=-100.0)
    assert not _stats(forced, "select-precision").skips  # a budget any model meets: nothing left float
    forced_error = rel_l2(run(everything, {"x": x, "mask": mask})[0], expected)
    assert rel_l2(actual, expected) < 0.05 < forced_error


def test_a_budget_ranks_activation_ops_with_the_layers(tmp_path):
    _attention_data(tmp_path)
    model = _masked_attention()
    result = _compile(model, tmp_path, op_types=("MatMul", "Add", "Softmax"), min_sqnr_db=500.0)
    stats = _stats(result, "select-precision")
    # an unreachable budget leaves everything in float: 4 weight MatMuls, 2 activation MatMuls, the Add, the Softmax
    assert stats.counters["layers_measured"] == 8 and stats.counters["layers_kept_float"] == 8
    assert "activation_ops_measured" not in stats.counters
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)


def test_layernorm_quantizes_its_input_not_its_parameters(tmp_path):
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["B", 4, 8])],
                   [helper.make_tensor_value_info("y", F, ["B", 4, 8])],
                   [numpy_helper.from_array(np.full(8, 2.0, np.float32), "gamma"),
                    numpy_helper.from_array(np.zeros(8, np.float32), "beta")])
    AnnotateInt8Pass(op_types=("LayerNormalization",))(model)
    ln = next(iter(model.graph))
    assert get_qspec(ln.inputs[0]) is not None and get_qspec(ln.outputs[0]) is not None
    assert get_qspec(ln.inputs[1]) is None and get_qspec(ln.inputs[2]) is None
