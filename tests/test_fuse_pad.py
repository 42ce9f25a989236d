"""fuse-pad-conv: a zero spatial Pad folds into the Conv's pads exactly; everything else is a counted skip."""

from __future__ import annotations

import numpy as np
import pytest
from _models import assert_close, init, make_model, op_counts, random_feeds, run_ort
from onnx import TensorProto, helper

from qcompiler.passes.fusion.pad import FusePadConvPass

F = TensorProto.FLOAT


def _pad_conv(pads, *, fill=None, mode=None, conv_pads=None, consumers=1, opset=21, axes=None, auto_pad=None):
    rng = np.random.default_rng(0)
    inputs = ["x", "pads"] + (["fill"] if fill is not None or axes is not None else [])
    inits = [init("pads", np.array(pads, np.int64)), init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))]
    if fill is not None:
        inits.append(init("fill", np.array(fill, np.float32)))
    elif axes is not None:
        inputs[-1] = ""
    if axes is not None:
        inputs.append("axes")
        inits.append(init("axes", np.array(axes, np.int64)))
    attrs = {"mode": mode} if mode else {}
    nodes = [helper.make_node("Pad", inputs, ["p"], name="pad", **attrs)]
    conv_attrs = {"pads": conv_pads} if conv_pads else {}
    if auto_pad:
        conv_attrs = {"auto_pad": auto_pad}
    outs = []
    for i in range(consumers):
        nodes.append(helper.make_node("Conv", ["p", "w"], [f"y{i}"], name=f"conv{i}", **conv_attrs))
        outs.append(helper.make_tensor_value_info(f"y{i}", F, [1, 4, "H", "W"]))
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 9, 9])], outs, inits, opset=opset)


@pytest.mark.parametrize("case", [
    {"pads": [0, 0, 1, 1, 0, 0, 1, 1]},
    {"pads": [0, 0, 0, 1, 0, 0, 2, 1], "fill": 0.0},
    {"pads": [0, 0, 1, 0, 0, 0, 1, 2], "conv_pads": [1, 1, 0, 0]},
    {"pads": [1, 2, 0, 1], "axes": [2, 3]},
    {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "consumers": 2},
])
def test_folds_exactly(case) -> None:
    model = _pad_conv(**case)
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = FusePadConvPass()(model)
    assert result.modified and result.stats.counters["folded"] == 1
    assert "Pad" not in op_counts(model) and "pads" not in model.graph.initializers
    assert_close(run_ort(model, feeds), expected, rtol=1e-6)
    assert FusePadConvPass()(model).modified is False


def test_constant_nodes_feeding_only_the_pad_go_with_it() -> None:
    rng = np.random.default_rng(1)
    zero = helper.make_tensor("zero", F, [], [0.0])
    nodes = [helper.make_node("Constant", [], ["fill"], value=zero, name="fill_const"),
             helper.make_node("Pad", ["x", "pads", "fill"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    inits = [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 9, 9])],
                       [helper.make_tensor_value_info("y", F, [1, 4, 9, 9])], inits)
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    assert FusePadConvPass()(model).modified
    assert op_counts(model) == {"Conv": 1}
    assert_close(run_ort(model, feeds), expected, rtol=1e-6)


@pytest.mark.parametrize(("case", "reason"), [
    ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "fill": 0.5}, "Pad value is not a constant 0"),
    ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"}, "Pad mode is not constant"),
    ({"pads": [0, 1, 1, 1, 0, 0, 1, 1]}, "Pad pads the batch or channel axis"),
    ({"pads": [0, 0, -1, 1, 0, 0, 1, 1]}, "negative Pad amounts (cropping)"),
    ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "auto_pad": "SAME_UPPER"}, "Conv uses auto_pad"),
])
def test_skips_with_reason(case, reason) -> None:
    model = _pad_conv(**case)
    result = FusePadConvPass()(model)
    assert result.modified is False
    assert result.stats.skip_reasons() == {reason: 1}
    assert op_counts(model)["Pad"] == 1
