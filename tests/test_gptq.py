"""gptq: the rounding beats round-to-nearest on the layer output, patches match ONNX Conv, the lowering keeps the grid."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mark_fused_activations, mlp, rel_l2, run
from _models import init, make_model, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import ConfigError
from qcompiler.metadata import PINNED_SCALE_KEY
from qcompiler.passes.algorithms._gptq_core import gptq_round
from qcompiler.passes.algorithms.bias_correction import CollectInputMeansPass
from qcompiler.passes.algorithms.gptq import GPTQPass, conv_patches
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass

F = TensorProto.FLOAT


def _correlated(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    mix = rng.standard_normal((k, k)) * 0.4 + np.eye(k)
    return rng.standard_normal((n, k)) @ mix + rng.uniform(-1, 1, k)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), qmax=st.sampled_from([7, 63, 127]), act_order=st.booleans())
def test_gptq_beats_round_to_nearest_on_the_output(seed: int, qmax: int, act_order: bool) -> None:
    rng = np.random.default_rng(seed)
    x = _correlated(rng, 512, 24)
    w = rng.standard_normal((10, 24))
    scale = np.abs(w).max(axis=1) / qmax
    q = gptq_round(w, x.T @ x, scale, -qmax, qmax, act_order=act_order)
    assert q.dtype == np.int64 and q.shape == w.shape and np.abs(q).max() <= qmax
    rtn = np.clip(np.rint(w / scale[:, None]), -qmax, qmax)

    def error(levels):
        return float(np.sum((x @ (w - levels * scale[:, None]).T) ** 2))

    assert error(q) <= error(rtn) * 1.0001


def test_gptq_keeps_a_weight_on_the_grid_and_dead_inputs() -> None:
    rng = np.random.default_rng(1)
    scale = np.full(4, 0.1)
    levels = rng.integers(-7, 8, (4, 6))
    x = _correlated(rng, 128, 6)
    x[:, 2] = 0.0  # an input never seen: its weights are rounded, not zeroed
    np.testing.assert_array_equal(gptq_round(levels * 0.1, x.T @ x, scale, -7, 7), levels)
    per_row = gptq_round(levels * 0.1 + 0.03, np.stack([x.T @ x] * 4), scale, -7, 7, act_order=False)
    shared = gptq_round(levels * 0.1 + 0.03, x.T @ x, scale, -7, 7, act_order=False)
    np.testing.assert_array_equal(per_row, shared)
    assert np.all(shared[:, 2] != 0) or np.array_equal(shared[:, 2], np.rint((levels[:, 2] * 0.1 + 0.03) / 0.1))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), group=st.sampled_from([1, 2, 4]))
def test_conv_patches_reproduce_onnx_conv(seed, stride, dilation, pads, group) -> None:
    rng = np.random.default_rng(seed)
    c, m = 4, 8
    w = rng.standard_normal((m, c // group, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, c, 9, 9)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=pads, strides=[stride] * 2, dilations=[dilation] * 2,
                            group=group)
    model = make_model([node], [helper.make_tensor_value_info("x", F, [1, c, 9, 9])],
                       [helper.make_tensor_value_info("y", F, [1, m, "H", "W"])], [init("w", w)])
    (expected,) = run_ort(model, {"x": x})
    patches = conv_patches(x[0], (3, 3), pads, [stride] * 2, [dilation] * 2)  # [C, T, P]
    grouped = patches.reshape(group, (c // group) * 9, -1)
    rows = w.reshape(group, m // group, -1)
    actual = np.concatenate([rows[g] @ grouped[g] for g in range(group)]).reshape(expected.shape[1:])
    np.testing.assert_allclose(actual, expected[0], rtol=1e-4, atol=1e-4)


def _data(tmp_path, model, x):
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_pass_lowers_onto_its_grid_and_beats_rtn(tmp_path, kind: str) -> None:
    rng = np.random.default_rng(3)
    shape = (3, 16, 16) if kind == "cnn" else (64,)
    x = rng.standard_normal((48, *shape)).astype(np.float32)
    errors = {}
    for use_gptq in (False, True):
        model = cnn() if kind == "cnn" else mlp()
        (expected,) = run(model, {"x": x})
        data = _data(tmp_path, model, x)
        mark_fused_activations(model)
        AnnotateInt8Pass()(model)
        CalibratePass(calibration_data=data)(model)
        CollectInputMeansPass(calibration_data=data)(model)
        if use_gptq:
            result = GPTQPass(calibration_data=data, reduce_range=True)(model)
            assert result.modified and result.stats.counters["layers"] == (3 if kind == "cnn" else 2)
            grids = {n.name: n.inputs[1].const_value.numpy().copy() for n in model.graph
                     if len(n.inputs) > 1 and PINNED_SCALE_KEY in n.inputs[1].meta}
            assert len(grids) == result.stats.counters["layers"]
        LowerInt8QDQPass(reduce_range=True)(model)
        if use_gptq:  # DQ(q, s) reproduces the grid weights GPTQ chose, exactly
            for node in model.graph:
                if node.name in grids:
                    dq = node.inputs[1].producer()
                    q, s = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
                    axis = dq.attributes["axis"].as_int()
                    shape_s = [1] * q.ndim
                    shape_s[axis] = -1
                    np.testing.assert_allclose(q * s.reshape(shape_s), grids[node.name], rtol=1e-6, atol=1e-12)
        errors[use_gptq] = rel_l2(run(model, {"x": x})[0], expected)
    assert errors[True] < errors[False], errors


def test_needs_data_and_validates_options(tmp_path) -> None:
    model = mlp()
    AnnotateInt8Pass()(model)
    result = GPTQPass()(model)
    assert result.modified is False and result.stats.counters["no_calibration_data"] == 1
    for bad in ({"damp": 0.0}, {"act_order": "yes"}, {"batch_size": 0}, {"reduce_range": "maybe"}):
        with pytest.raises(ConfigError):
            GPTQPass(**bad)


def test_shared_weight_is_skipped(tmp_path) -> None:
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"],
                                                                                        name="b")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, ["N", 8])],
                       [helper.make_tensor_value_info("y", F, ["N", 8])], [init("w", w)])
    AnnotateInt8Pass()(model)
    x = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    result = GPTQPass(calibration_data=_data(tmp_path, model, x))(model)
    assert result.modified is False
    assert result.stats.skip_reasons() == {"weight is shared by several nodes": 2}
    assert isinstance(model.graph.initializers["w"].const_value, ir.TensorProtocol)
