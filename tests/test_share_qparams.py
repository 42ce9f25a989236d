"""share-qparams: Concat/MaxPool neighbours get one range, so ONNX Runtime copies instead of rescaling."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from _int8_models import optimized_model, optimized_op_counts, rel_l2, run
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.config import load_recipe
from qcompiler.pipelines import BuildContext, build_pipeline
from qcompiler.qspec import get_range

F = TensorProto.FLOAT


def _model() -> ir.Model:
    """Two convs -> Concat -> MaxPool -> conv: the Concat and the MaxPool sit between quantized layers."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = (rng.standard_normal((4, 3, 3, 3)) * 3).astype(np.float32)  # a wider range than conv a
    w3 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1),
             helper.make_node("MaxPool", ["cat"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["pool", "w3"], ["y"], name="conv_c", pads=[1, 1, 1, 1])]
    inits = [helper.make_tensor(n, F, a.shape, a.reshape(-1).tolist()) for n, a in (("w1", w1), ("w2", w2),
                                                                                 ("w3", w3))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, ["N", 6, 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _compile(tmp_path, disable: tuple[str, ...] = ()):
    model = _model()
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration_data(tmp_path / "calib.npz", model)
    import dataclasses

    recipe = dataclasses.replace(load_recipe("int8"), disable=disable)
    report = build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)
    return model, report, x


def test_concat_and_maxpool_share_one_range_and_run_in_uint8(tmp_path) -> None:
    expected = run(_model(), {"x": np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)})[0]
    model, report, x = _compile(tmp_path)
    record = next(p for p in report.passes if p.name == "share-qparams")
    assert record.modified and record.stats.counters["groups"] == 1
    optimized = optimized_op_counts(model)
    assert optimized.get("QLinearConv", 0) == 3 and "Conv" not in optimized, optimized
    assert optimized.get("QLinearConcat", 0) == 1 and "Concat" not in optimized, optimized
    assert optimized.get("QuantizeLinear", 0) == 1 and optimized.get("DequantizeLinear", 0) == 1, optimized
    assert rel_l2(run(model, {"x": x})[0], expected) < 0.05

    assert len(set(_concat_scales(model))) == 1  # inputs and output on one grid: a copy, no rescaling
    plain, _, _ = _compile(tmp_path, disable=("share-qparams",))
    assert len(set(_concat_scales(plain))) > 1  # ORT still fuses, but rescales inputs inside QLinearConcat


def _concat_scales(model: ir.Model) -> list[float]:
    """The (output, input...) scales of the QLinearConcat that ONNX Runtime runs."""
    proto = optimized_model(model)
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    concat = next(n for n in proto.graph.node if n.op_type == "QLinearConcat")
    scale_names = [concat.input[0]] + [concat.input[i] for i in range(3, len(concat.input), 3)]
    return [round(float(consts[name]), 12) for name in scale_names]


def test_ranges_are_the_union_and_a_second_run_changes_nothing(tmp_path) -> None:
    from qcompiler.passes.share_qparams import ShareQuantParamsPass

    model = _model()
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration_data(tmp_path / "calib.npz", model)
    recipe = load_recipe("int8")
    passes = build_pipeline(recipe, BuildContext(calibration_data=data)).passes
    for qpass in passes[:passes.index(next(p for p in passes if p.name == "share-qparams"))]:
        qpass(model)
    values = {v.name: v for n in model.graph for v in n.outputs}
    before = {name: get_range(values[name]) for name in ("ra", "rb", "pool")}
    result = ShareQuantParamsPass()(model)
    assert result.modified
    after = {name: get_range(values[name]) for name in ("ra", "rb", "cat", "pool")}
    union = (min(r.min for r in before.values()), max(r.max for r in before.values()))
    assert {(r.min, r.max) for r in after.values() if r is not None} == {union}
    assert ShareQuantParamsPass()(model).modified is False
