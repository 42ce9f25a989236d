"""annotate-int8: which nodes get specs, where the specs go, skip reasons, idempotence."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mark_fused_activations, mlp, run, transformer_block
from onnx import TensorProto, helper

from qcompiler.errors import ConfigError
from qcompiler.passes.annotate import AnnotateInt8Pass, node_scheme
from qcompiler.qspec import QuantSpec, get_qspec


def _by_name(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_static_specs_on_weights_activations_and_outputs():
    model = mlp()
    result = AnnotateInt8Pass()(model)
    assert result.modified
    assert dict(result.stats.counters) == {"annotated_MatMul": 1, "annotated_Gemm": 1}
    fc1, fc2 = _by_name(model, "fc1"), _by_name(model, "fc2")
    assert get_qspec(fc1.inputs[1]) == QuantSpec("int8", "per_channel", axis=1, symmetric=True)
    assert get_qspec(fc2.inputs[1]).axis == 0  # transB=1: output channels are rows
    act = QuantSpec("uint8", "per_tensor", symmetric=False, observer="minmax")
    assert get_qspec(fc1.inputs[0]) == act and get_qspec(fc1.outputs[0]) == act and get_qspec(fc2.outputs[0]) == act
    assert node_scheme(fc1) == "int8-static"


def test_second_run_changes_nothing_and_float_function_is_kept():
    model = cnn()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    before = run(model, {"x": x})[0]
    assert AnnotateInt8Pass()(model).modified
    assert not AnnotateInt8Pass()(model).modified
    np.testing.assert_array_equal(run(model, {"x": x})[0], before)


def test_dynamic_specs_have_no_observer_and_no_output_spec():
    model = transformer_block()
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul", "Gemm"))(model)
    proj = _by_name(model, "proj_q")
    spec = get_qspec(proj.inputs[0])
    assert spec.dynamic and spec.observer is None and spec.dtype == "uint8"
    assert get_qspec(proj.outputs[0]) is None and node_scheme(proj) == "int8-dynamic"


def test_fused_activation_output_gets_the_spec():
    model = cnn()
    assert mark_fused_activations(model) == 2
    AnnotateInt8Pass()(model)
    conv1, relu1 = _by_name(model, "conv1"), _by_name(model, "relu1")
    assert get_qspec(conv1.outputs[0]) is None  # nothing between Conv and its Relu
    assert get_qspec(relu1.outputs[0]) is not None


def test_skips_with_reasons():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="dynamic_weight"),
             helper.make_node("MatMul", ["a", "c"], ["b"], name="excluded"),
             helper.make_node("MatMul", ["b", "c3"], ["y"], name="batched_weight")]
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32)),
             helper.make_tensor("c3", TensorProto.FLOAT, [2, 4, 4], np.ones(32, np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 4])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = AnnotateInt8Pass(exclude_nodes=("excluded",))(model)
    assert not result.modified
    assert dict(result.stats.skips) == {"dynamic_weight": "non-constant weight", "excluded": "excluded by name",
                                        "batched_weight": "MatMul weight of rank 3 (2-D only)"}


def test_op_types_and_per_tensor():
    model = cnn()
    result = AnnotateInt8Pass(op_types=("Conv",), per_channel=False)(model)
    assert dict(result.stats.counters) == {"annotated_Conv": 2}
    assert get_qspec(_by_name(model, "conv1").inputs[1]) == QuantSpec("int8", "per_tensor", symmetric=True)
    assert node_scheme(_by_name(model, "fc")) is None


def test_bad_options():
    with pytest.raises(ConfigError):
        AnnotateInt8Pass(op_types=("Relu",))
    with pytest.raises(ConfigError):
        AnnotateInt8Pass(activation_dtype="int4")


def test_from_recipe_reads_the_lowering():
    from qcompiler.config import load_recipe

    dynamic = AnnotateInt8Pass.from_recipe(load_recipe("int8-dynamic"), None)
    static = AnnotateInt8Pass.from_recipe(load_recipe("int8"), None)
    assert not dynamic.static_activations and dynamic.op_types == ("MatMul", "Gemm")
    assert static.static_activations and static.activation_dtype == "uint8"
