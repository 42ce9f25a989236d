"""select-precision: per-layer sensitivity, the fewest float layers that meet the budget, and its metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mark_fused_activations, run
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.config import load_recipe
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.metadata import FUSED_ACTIVATION_KEY
from qcompiler.passes._common import clone_with_meta
from qcompiler.passes.algorithms.mixed_precision import SelectPrecisionPass, output_sqnr_db, top1_disagreement
from qcompiler.passes.annotate import AnnotateInt8Pass, node_scheme
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass
from qcompiler.pipelines import BuildContext, build_pipeline

F = TensorProto.FLOAT


def _outlier_mlp(seed: int = 0) -> ir.Model:
    """x -> Gemm 'g1' -> Gemm 'g2' -> Gemm 'g3' -> y where one channel of g1's output is 300x the others, so
    quantizing g2's input per tensor wipes out the small channels: g2 is the sensitive layer."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 16)).astype(np.float32)
    w1[:, 0] *= 300
    w2 = rng.standard_normal((16, 16)).astype(np.float32)
    w2[0, :] /= 300
    w3 = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], name="g1"),
             helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="g2"),
             helper.make_node("Gemm", ["h2", "w3"], ["y"], name="g3")]
    inits = [helper.make_tensor(n, F, a.shape, a.reshape(-1).tolist()) for n, a in (("w1", w1), ("w2", w2),
                                                                                 ("w3", w3))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 16])],
                              [helper.make_tensor_value_info("y", F, ["N", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _prepared(tmp_path, model, shape, n=48):
    x = np.random.default_rng(1).standard_normal((n, *shape)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration_data(tmp_path / "calib.npz", model)
    mark_fused_activations(model)
    AnnotateInt8Pass()(model)
    CalibratePass(calibration_data=data)(model)
    return data, x


def test_no_budget_changes_nothing(tmp_path) -> None:
    model = _outlier_mlp()
    data, _ = _prepared(tmp_path, model, (16,))
    result = SelectPrecisionPass(calibration_data=data)(model)
    assert result.modified is False and not result.stats.counters
    assert all(node_scheme(n) == "int8-static" for n in model.graph)


def test_keeps_only_the_sensitive_layer_float_and_meets_the_budget(tmp_path) -> None:
    model = _outlier_mlp()
    data, x = _prepared(tmp_path, model, (16,))
    (expected,) = run(model, {"x": x})
    result = SelectPrecisionPass(calibration_data=data, min_sqnr_db=25.0, eval_samples=48)(model)
    assert result.modified
    counters = result.stats.counters
    assert counters["layers_measured"] == 3 and counters["layers_kept_float"] == 1
    layers = result.stats.layers
    assert layers["g2"]["sensitivity_rank"] == 1 and layers["g2"]["kept_float"] is True
    assert layers["g2"]["sensitivity_sqnr_db"] < 25 < min(layers["g1"]["sensitivity_sqnr_db"],
                                                         layers["g3"]["sensitivity_sqnr_db"])
    assert layers["(whole model)"]["all_quantized_sqnr_db"] < 25 <= layers["(whole model)"]["output_sqnr_db"]
    assert "g2" not in {n.name for n in model.graph if node_scheme(n)}
    lowered = LowerInt8QDQPass()(model)
    assert lowered.stats.counters["lowered_Gemm"] == 2
    (actual,) = run(model, {"x": x})
    assert output_sqnr_db([expected], [actual]) >= 25.0  # the budget holds on the compiled model


def test_an_easy_budget_keeps_everything_quantized(tmp_path) -> None:
    model = cnn()
    data, _ = _prepared(tmp_path, model, (3, 16, 16), n=16)
    result = SelectPrecisionPass(calibration_data=data, min_sqnr_db=5.0)(model)
    assert result.modified is False and result.stats.counters["layers_kept_float"] == 0
    assert result.stats.counters["layers_measured"] == 3


def test_accuracy_budget_on_a_classifier(tmp_path) -> None:
    model = _outlier_mlp()
    data, x = _prepared(tmp_path, model, (16,))
    result = SelectPrecisionPass(calibration_data=data, max_accuracy_drop=0.0, eval_samples=48)(model)
    drop = result.stats.layers["(whole model)"]["top1_disagreement"]
    assert drop == 0.0


def test_through_the_int8_recipe_with_pass_options(tmp_path) -> None:
    model = _outlier_mlp()
    x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration_data(tmp_path / "calib.npz", model)
    recipe = load_recipe("int8")
    assert "select-precision" in recipe.passes
    recipe = dataclasses.replace(recipe, pass_options={"select-precision": {"min_sqnr_db": 25.0}})
    report = build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)
    record = next(p for p in report.passes if p.name == "select-precision")
    assert record.stats.counters["layers_kept_float"] == 1
    assert {n.op_type for n in model.graph} >= {"QuantizeLinear", "DequantizeLinear", "Gemm"}


def test_needs_data_and_validates_options(tmp_path) -> None:
    model = _outlier_mlp()
    _prepared(tmp_path, model, (16,))
    with pytest.raises(CalibrationError, match="calibration data"):
        SelectPrecisionPass(min_sqnr_db=20.0)(model)
    for bad in ({"min_sqnr_db": float("nan")}, {"max_accuracy_drop": 1.5}, {"max_accuracy_drop": True},
                {"eval_samples": 0}):
        with pytest.raises(ConfigError):
            SelectPrecisionPass(**bad)


def test_metrics() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], np.float32)
    assert output_sqnr_db([ref], [ref]) == 300.0
    noisy = ref + np.float32(0.1)
    expected = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / (6 * 0.1 ** 2))
    assert output_sqnr_db([ref], [noisy]) == pytest.approx(expected, rel=1e-5)
    assert top1_disagreement(ref, np.array([[1.0, 2.0, 3.0], [1.0, 3.0, 0.0]], np.float32)) == 0.5
    assert output_sqnr_db([np.array([1, 2])], [np.array([2, 2])]) == 300.0  # integer outputs are not compared


def test_clone_with_meta_points_at_the_clone(tmp_path) -> None:
    model = cnn()
    mark_fused_activations(model)
    clone = clone_with_meta(model)
    for original, copied in zip(model.graph, clone.graph, strict=True):
        fused = copied.meta.get(FUSED_ACTIVATION_KEY)
        if fused is not None:
            assert fused.graph is clone.graph and fused is not original.meta[FUSED_ACTIVATION_KEY]
