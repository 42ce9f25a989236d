"""Tests of the finalize pass and of the determinism of the whole float pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _models import assert_close, float_passes, init, make_model, random_feeds, run_ort, to_bytes
from onnx import TensorProto, helper

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import PassPipeline
from qcompiler.passes.finalize import FinalizePass

F = TensorProto.FLOAT


def _vi(name: str, shape: list):
    return helper.make_tensor_value_info(name, F, shape)


def _small_cnn() -> ir.Model:
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Conv", ["xi", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "M"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"])]
    inits = [init("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("g", rng.uniform(0.5, 1.5, 4).astype(np.float32)), init("b", rng.standard_normal(4).astype(np.float32)),
             init("m", rng.standard_normal(4).astype(np.float32)), init("v", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
             init("M", rng.standard_normal((64, 5)).astype(np.float32)), init("bias", np.ones(5, np.float32))]
    return make_model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 5])], inits)


def test_unsorted_graph_is_sorted_and_named() -> None:
    nodes = [helper.make_node("Neg", ["r"], ["y"]), helper.make_node("Relu", ["x"], ["r"])]  # not sorted
    graph = helper.make_graph(nodes, "", [_vi("x", [2])], [_vi("y", [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.x", 1)])
    model = ir.serde.deserialize_model(proto)
    model.graph.node(1).outputs[0].name = ""  # an unnamed intermediate value
    result = FinalizePass()(model)
    assert result.modified
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]
    assert [n.name for n in model.graph] == ["Relu", "Neg"]
    assert model.graph.node(0).outputs[0].name == "Relu_out0"
    assert dict(model.opset_imports) == {"": 21}
    assert model.graph.name == "main_graph"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert FinalizePass()(model).modified is False


def test_default_opset_is_declared() -> None:
    a = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    relu = ir.Node("", "Relu", [a], name="relu")
    graph = ir.Graph([a], [relu.outputs[0]], nodes=[relu], opset_imports={}, name="g")
    relu.outputs[0].name = "y"
    model = ir.Model(graph, ir_version=10)
    result = FinalizePass(default_opset=19)(model)
    assert result.modified and result.stats.counters["default_opset_added"] == 1
    assert dict(model.opset_imports) == {"": 19}
    with pytest.raises(ConfigError):
        FinalizePass(default_opset=0)


def test_duplicate_names_are_made_unique() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="same"), helper.make_node("Neg", ["r"], ["y"], name="same")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2])], [_vi("y", [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert FinalizePass()(model).modified
    assert [n.name for n in model.graph] == ["same", "same_1"]


def test_float_pipeline_is_deterministic_and_idempotent() -> None:
    outputs = []
    for _ in range(2):
        model = _small_cnn()
        feeds = random_feeds(model)
        expected = run_ort(model, feeds)
        PassPipeline(float_passes()).run(model)
        assert_close(run_ort(model, feeds), expected)
        outputs.append(to_bytes(model))
    assert outputs[0] == outputs[1]
    # a second run on the same in-memory model changes nothing
    report = PassPipeline(float_passes()).run(model)
    assert [p.name for p in report.passes if p.modified] == []
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Flatten", "Gemm"]
    # on a reloaded model only the in-memory pairing of fuse-conv-activation is made again
    reloaded = ir.serde.deserialize_model(onnx.load_from_string(outputs[0]))
    report = PassPipeline(float_passes()).run(reloaded)
    assert [p.name for p in report.passes if p.modified] == ["fuse-conv-activation"]
    assert to_bytes(reloaded) == outputs[0]
