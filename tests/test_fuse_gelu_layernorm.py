"""fuse-gelu and fuse-layernorm: the exporters' spellings become one node with the same float function."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.passes.fusion.gelu import FuseGeluPass
from qcompiler.passes.fusion.layernorm import FuseLayerNormPass

F = TensorProto.FLOAT


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _model(nodes, inits, shape, opset: int = 17, extra_outputs=()) -> ir.Model:
    outputs = [helper.make_tensor_value_info("y", F, shape)]
    outputs += [helper.make_tensor_value_info(name, F, shape) for name in extra_outputs]
    proto = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, shape)],
                                                outputs, inits), opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _gelu(spelling: str, opset: int = 17, divide: bool = True, extra_outputs=()) -> ir.Model:
    head = [helper.make_node("Div", ["x", "sqrt2"], ["d"]) if divide else helper.make_node("Mul", ["inv", "x"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["one", "e"], ["a"])]
    tails = {
        "x*e*0.5": [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])],
        "(x*0.5)*e": [helper.make_node("Mul", ["half", "x"], ["h"]), helper.make_node("Mul", ["a", "h"], ["y"])],
        "x*(e*0.5)": [helper.make_node("Mul", ["a", "half"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])],
    }
    inits = [_scalar("sqrt2", math.sqrt(2)), _scalar("inv", 1 / math.sqrt(2)), _scalar("one", 1.0),
             _scalar("half", 0.5)]
    return _model(head + tails[spelling], inits, ["B", 8], opset, extra_outputs)


@pytest.mark.parametrize("spelling", ["x*e*0.5", "(x*0.5)*e", "x*(e*0.5)"])
@pytest.mark.parametrize(("opset", "divide"), [(17, True), (17, False), (20, True)])
def test_gelu_spellings_fuse_into_one_node(spelling, opset, divide):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 3
    model = _gelu(spelling, opset, divide)
    expected = run(model, {"x": x})[0]
    result = FuseGeluPass()(model)
    assert result.modified and result.stats.counters["fused"] == 1
    (node,) = list(model.graph)
    assert node.op_type == "Gelu" and node.domain == ("" if opset >= 20 else "com.microsoft")
    assert [v.name for v in model.graph.outputs] == ["y"]
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-6, atol=1e-6)


def test_gelu_with_a_wrong_constant_or_an_exposed_intermediate_is_left_alone():
    model = _gelu("x*e*0.5")
    model.graph.initializers["half"].const_value = ir.tensor(np.array(0.4, np.float32), name="half")
    result = FuseGeluPass()(model)
    assert not result.modified and dict(result.stats.skips) and len(model.graph) == 5
    exposed = _gelu("x*e*0.5", extra_outputs=("a",))  # the intermediate "1 + erf" is also a graph output
    assert not FuseGeluPass()(exposed).modified


def _layernorm(square: str = "Pow", affine: bool = True, opset: int = 17, dims: int = 16) -> ir.Model:
    axes_attr = {"axes": [-1]} if opset < 18 else {}
    axes_in = [] if opset < 18 else ["axes"]
    nodes = [helper.make_node("ReduceMean", ["x", *axes_in], ["m"], keepdims=1, **axes_attr),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["p"]),
             helper.make_node("ReduceMean", ["p", *axes_in], ["v"], keepdims=1, **axes_attr),
             helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n" if affine else "y"])]
    rng = np.random.default_rng(1)
    inits = [_scalar("two", 2.0), _scalar("eps", 1e-5), numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["g"]), helper.make_node("Add", ["beta", "g"], ["y"])]
        inits += [numpy_helper.from_array(rng.standard_normal(dims).astype(np.float32), "gamma"),
                  numpy_helper.from_array(rng.standard_normal(dims).astype(np.float32), "beta")]
    if opset < 18:
        inits = [i for i in inits if i.name != "axes"]
    return _model(nodes, inits, ["B", 4, dims], opset)


@settings(max_examples=12, deadline=None)
@given(square=st.sampled_from(["Pow", "Mul"]), affine=st.booleans(), opset=st.sampled_from([17, 18]),
       offset=st.floats(-5, 5), spread=st.floats(0.1, 10), seed=st.integers(0, 2**16))
def test_layernorm_spellings_fuse_and_agree(square, affine, opset, offset, spread, seed):
    x = (np.random.default_rng(seed).standard_normal((3, 4, 16)) * spread + offset).astype(np.float32)
    model = _layernorm(square, affine, opset)
    expected = run(model, {"x": x})[0]
    result = FuseLayerNormPass()(model)
    assert result.modified and result.stats.counters["fused"] == 1
    (node,) = list(model.graph)
    assert node.op_type == "LayerNormalization" and node.attributes["axis"].as_int() == 2
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_layernorm_skips_with_reasons():
    old = _layernorm(opset=17)
    old.opset_imports[""] = 16
    result = FuseLayerNormPass()(old)
    assert not result.modified and "default opset below 17 (no LayerNormalization)" in result.stats.skip_reasons()
    cube = _layernorm()
    cube.graph.initializers["two"].const_value = ir.tensor(np.array(3.0, np.float32), name="two")
    result = FuseLayerNormPass()(cube)
    assert not result.modified and "Pow exponent is not 2" in result.stats.skip_reasons()


def test_fusions_leave_no_unused_constant():
    gelu, norm = _gelu("x*e*0.5"), _layernorm()
    FuseGeluPass()(gelu)
    FuseLayerNormPass()(norm)
    assert sorted(gelu.graph.initializers) == ["inv"]  # the model's own unused constant (it divides by sqrt2)
    assert sorted(norm.graph.initializers) == ["layernorm_bias", "layernorm_scale"]
