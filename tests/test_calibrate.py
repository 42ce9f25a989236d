"""calibrate: ranges equal numpy's min/max over the data, the weights are shared, errors and constant tensors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mark_fused_activations, mlp
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import CalibrationError
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.observe import observer_session, values_to_observe
from qcompiler.qspec import get_range, scale_zero_point


def _data(tmp_path, model, x):
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model)


def test_ranges_match_numpy_over_all_batches(tmp_path):
    model = mlp()
    x = np.random.default_rng(0).standard_normal((23, 64)).astype(np.float32)
    AnnotateInt8Pass()(model)
    result = CalibratePass(calibration_data=_data(tmp_path, model, x), batch_size=5)(model)
    assert result.modified and result.stats.counters["ranges"] == 4 and result.stats.counters["samples"] == 23
    g = model.graph
    w1 = g.initializers["w1"].const_value.numpy()
    b1 = g.initializers["b1"].const_value.numpy()
    h0 = x @ w1
    fc1 = next(n for n in g if n.name == "fc1")
    assert get_range(fc1.inputs[0]).min == float(x.min()) and get_range(fc1.inputs[0]).max == float(x.max())
    np.testing.assert_allclose([get_range(fc1.outputs[0]).min, get_range(fc1.outputs[0]).max],
                               [h0.min(), h0.max()], rtol=1e-5)
    y_range = get_range(model.graph.outputs[0])
    h2 = np.maximum(h0 + b1, 0)
    fc2 = next(n for n in g if n.name == "fc2")
    np.testing.assert_allclose([get_range(fc2.inputs[0]).min, get_range(fc2.inputs[0]).max], [0.0, h2.max()],
                               rtol=1e-5)
    w2, b2 = g.initializers["w2"].const_value.numpy(), g.initializers["b2"].const_value.numpy()
    y = h2 @ w2.T + b2
    np.testing.assert_allclose([y_range.min, y_range.max], [y.min(), y.max()], rtol=1e-5)
    assert not CalibratePass(calibration_data=_data(tmp_path, model, x), batch_size=7)(model).modified


def test_max_samples_and_progress(tmp_path):
    model = cnn()
    mark_fused_activations(model)
    AnnotateInt8Pass()(model)
    x = np.random.default_rng(1).standard_normal((12, 3, 16, 16)).astype(np.float32)
    result = CalibratePass(calibration_data=_data(tmp_path, model, x), max_samples=4, batch_size=3,
                           progress=True)(model)
    assert result.stats.counters["samples"] == 4
    conv1 = next(n for n in model.graph if n.name == "conv1")
    assert get_range(conv1.inputs[0]).min == float(x[:4].min())
    assert get_range(conv1.outputs[0]) is None  # fused with its Relu: the Relu output is observed instead
    assert get_range(next(n for n in model.graph if n.name == "relu1").outputs[0]).min == 0.0


def test_no_data_is_a_calibration_error():
    model = mlp()
    AnnotateInt8Pass()(model)
    with pytest.raises(CalibrationError):
        CalibratePass()(model)
    with pytest.raises(CalibrationError):
        CalibratePass(batch_size=0)


def test_observer_session_shares_weights_and_leaves_the_model_alone():
    model = mlp(k=256, hidden=512)
    AnnotateInt8Pass()(model)
    values = values_to_observe(model)
    outputs_before = list(model.graph.outputs)
    weight_before = model.graph.initializers["w1"].const_value
    session, names = observer_session(model, values)
    assert [o.name for o in session.get_outputs()] == ["y", "x", "h0", "h2"]
    assert names == ["x", "h0", "h2", "y"]
    assert list(model.graph.outputs) == outputs_before
    assert model.graph.initializers["w1"].const_value is weight_before
    x = np.ones((2, 256), np.float32)
    h0 = session.run(["h0"], {"x": x})[0]
    np.testing.assert_allclose(h0, x @ weight_before.numpy(), rtol=1e-5)


def test_constant_activation_gets_a_finite_scale(tmp_path):
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"], name="zeros"),
             helper.make_node("MatMul", ["z", "w"], ["y"], name="mm")]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    AnnotateInt8Pass()(model)
    np.savez(tmp_path / "c.npz", x=np.ones((4, 4), np.float32))
    result = CalibratePass(calibration_data=load_calibration_data(tmp_path / "c.npz", model))(model)
    assert result.stats.counters["constant_ranges"] == 2
    z = next(n for n in model.graph if n.name == "zeros").outputs[0]
    found = get_range(z)
    assert found.min == found.max == 0.0
    scale, zp = scale_zero_point(found.min, found.max, "uint8", False)
    assert np.isfinite(scale) and scale > 0 and zp == 0
