"""Tests for ``select-speed`` (int8 only where ONNX Runtime runs it faster than float) and for the report's list of
the kernels ORT really runs (:mod:`qcompiler.ort_kernels`).

The cost model is a function of shapes, so its decisions are asserted exactly; measured decisions are made
deterministic by injecting the timings (``select_speed.time_variants``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qcompiler.api import compile_model
from qcompiler.config import load_recipe
from qcompiler.errors import ConfigError
from qcompiler.ort_kernels import inspect_kernels, kernel_kind
from qcompiler.passes.algorithms import select_speed
from qcompiler.passes.algorithms.select_speed import SelectSpeedPass
from qcompiler.report import render_markdown, report_dict

pytestmark = pytest.mark.select_speed  # the real cost model (conftest.py)


def _cnn(hw: int = 8, widths: tuple[int, ...] = (4, 8)) -> onnx.ModelProto:
    """x[N,1,hw,hw] -> (Conv 3x3 + Relu) per width (the second with stride 2) -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur, channels, size = [], [], "x", 1, hw
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        inits += [numpy_helper.from_array((rng.standard_normal((width, channels, 3, 3)) * 0.3).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(np.full(width, 0.05, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4, strides=[stride] * 2,
                                   name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cur, channels, size = f"r{i}", width, (size + stride - 1) // stride
    inits += [numpy_helper.from_array((rng.standard_normal((10, channels * size * size)) * 0.1).astype(np.float32),
                                      "g"), numpy_helper.from_array(np.zeros(10, np.float32), "gb")]
    nodes += [helper.make_node("Flatten", [cur], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                           ["N", 1, hw, hw])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calib(hw: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).random((32, 1, hw, hw), dtype=np.float32)}


def _recipe(**options: Any) -> Any:
    base = load_recipe("int8")
    return dataclasses.replace(base, pass_options=MappingProxyType({"select-speed": MappingProxyType(options)}))


def _layers(result: Any) -> dict[str, dict[str, Any]]:
    return next(r for r in result.report.passes if r.name == "select-speed").stats.layers


def _ops(result: Any) -> list[str]:
    return [node.op_type for node in result.model.graph]


def test_tiny_cnn_stays_float_with_the_reason() -> None:
    result = compile_model(_cnn(), recipe=_recipe(allow_all_float=True), calib=_calib())
    layers = _layers(result)
    # per image: conv0 8x8x4 outputs x 9 MACs, conv1 4x4x8 outputs x 36 MACs = 6,912
    assert layers["conv0"]["speed"] == layers["conv1"]["speed"] == "float"
    assert "conv region 1 (2 Conv, 6.91 K MACs per image): below 3 M" in layers["conv0"]["speed_reason"]
    assert layers["fc"]["speed"] == "float"  # 128 x 10 MACs per run at batch 1
    assert "1.28 K MACs per run at batch 1: below 65.5 K" in layers["fc"]["speed_reason"]
    assert "QuantizeLinear" not in _ops(result) and "DequantizeLinear" not in _ops(result)
    stats = next(r for r in result.report.passes if r.name == "select-speed").stats
    assert stats.counters["units"] == 2 and stats.counters["layers_kept_float"] == 3
    assert stats.skip_reasons() == {"left in float: int8 would run slower in ONNX Runtime (speed_reason in the "
                                    "layers)": 3}


def test_a_larger_batch_makes_the_gemm_int8_and_the_conv_region_stays_float() -> None:
    result = compile_model(_cnn(), recipe=_recipe(batch=64), calib=_calib())
    layers = _layers(result)
    assert layers["fc"]["speed"] == "int8" and "81.9 K MACs per run at batch 64" in layers["fc"]["speed_reason"]
    assert layers["conv0"]["speed"] == "float"  # per image: the batch does not change a conv region's decision
    assert _ops(result).count("Conv") == 2 and "QuantizeLinear" in _ops(result)


def test_a_conv_region_over_the_threshold_stays_int8() -> None:
    result = compile_model(_cnn(), recipe=_recipe(min_conv_macs=5000, min_matmul_macs=1000), calib=_calib())
    layers = _layers(result)
    assert {layers[n]["speed"] for n in ("conv0", "conv1", "fc")} == {"int8"}
    assert "at least 5 K, int8 QLinearConv (NHWC) is faster" in layers["conv0"]["speed_reason"]
    summary = inspect_kernels(result.model, threads=1)
    assert summary.counts()["integer"] == {"QLinearConv": 2, "QGemm": 1}


def test_a_model_that_would_be_all_float_stays_int8_by_default(caplog: pytest.LogCaptureFixture) -> None:
    result = compile_model(_cnn(), recipe="int8", calib=_calib())
    layers = _layers(result)
    assert {layers[n]["speed"] for n in ("conv0", "conv1", "fc")} == {"int8"}
    assert "every layer would stay float" in layers["fc"]["speed_reason"]
    assert "QuantizeLinear" in _ops(result)  # the recipe asked for int8: it gets int8 (smaller weights)
    stats = next(r for r in result.report.passes if r.name == "select-speed").stats
    assert stats.counters["all_float_overruled"] == 1
    assert any("allow_all_float" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="allow_all_float"):
        compile_model(_cnn(), recipe=_recipe(allow_all_float="yes"), calib=_calib())


def test_measured_int8_slower_keeps_float_and_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    calls: list[int] = []

    def slower_int8(model_a: Any, model_b: Any, feeds: Any, *, threads: Any) -> tuple[float, float]:
        calls.append(len(next(iter(feeds.values()))))  # the batch measured
        return 0.002, 0.001  # int8 twice as slow

    monkeypatch.setattr(select_speed, "time_variants", slower_int8)
    # the cost model alone would keep every unit int8 here: the measurement overrules it
    recipe = _recipe(mode="measure", batch=4, min_conv_macs=0, min_matmul_macs=0, allow_all_float=True)
    result = compile_model(_cnn(), recipe=recipe, calib=_calib())
    layers = _layers(result)
    assert calls == [4, 4]  # one timing per unit (the conv region, the Gemm), on batches of 4
    for name in ("conv0", "conv1", "fc"):
        assert layers[name]["speed"] == "float"
        assert layers[name]["speed_int8_ms"] == 2.0 and layers[name]["speed_float_ms"] == 1.0
        assert "float faster by more than 3%" in layers[name]["speed_reason"]
    assert "QuantizeLinear" not in _ops(result)
    assert len(list((tmp_path / "speed").glob("*.json"))) == 2

    calls.clear()
    again = compile_model(_cnn(), recipe=recipe, calib=_calib())
    assert calls == []  # decided from the cache
    stats = next(r for r in again.report.passes if r.name == "select-speed").stats
    assert stats.counters["units_from_cache"] == 2 and _layers(again)["fc"]["speed"] == "float"
    assert again.to_bytes() == result.to_bytes()


def test_measured_int8_faster_overrules_the_cost_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    monkeypatch.setattr(select_speed, "time_variants", lambda *a, **k: (0.001, 0.00102))  # within the margin
    result = compile_model(_cnn(), recipe=_recipe(mode="measure"), calib=_calib())
    layers = _layers(result)
    assert {layers[n]["speed"] for n in ("conv0", "conv1", "fc")} == {"int8"}
    assert layers["fc"]["speed_reason"].startswith("measured fc: int8 1.000 ms, float 1.020 ms")


def test_time_budget_spent_keeps_the_cost_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    monkeypatch.setattr(select_speed, "time_variants", lambda *a, **k: (0.001, 0.002))
    result = compile_model(_cnn(), recipe=_recipe(mode="measure", time_budget_s=0, allow_all_float=True),
                           calib=_calib())
    layers = _layers(result)
    assert layers["fc"]["speed"] == "float" and "(not measured: time budget spent)" in layers["fc"]["speed_reason"]


def test_real_timing_runs_both_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    result = compile_model(_cnn(), recipe=_recipe(mode="measure", threads=1), calib=_calib())
    for name in ("conv0", "fc"):
        figures = _layers(result)[name]
        assert figures["speed_int8_ms"] > 0 and figures["speed_float_ms"] > 0  # produced, not asserted for speed
    entry = json.loads(next((tmp_path / "speed").glob("*.json")).read_text())
    assert set(entry) == {"int8_s", "float_s"}


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "fast"}, "mode must be one of cost, measure"),
    ({"batch": 0}, "batch must be an integer of at least 1"),
    ({"min_conv_macs": -1}, "min_conv_macs must be an integer of at least 0"),
    ({"margin": 2.0}, "margin must be a number in [0, 1]"),
    ({"threads": 0}, "threads must be a positive integer"),
])
def test_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SelectSpeedPass(**options)


def test_report_lists_what_ort_runs_per_layer(tmp_path: Path) -> None:
    result = compile_model(_cnn(), tmp_path / "out.onnx", recipe=_recipe(batch=64), calib=_calib())
    data = report_dict(result)
    kernels = data["ort_kernels"]
    assert kernels["counts"]["integer"] == {"QGemm": 1}
    assert kernels["counts"]["float"] == {"Conv": 2}  # NCHWc convolutions, Relu fused
    assert kernels["float_fallbacks"] == []
    assert data["layers"]["fc"]["ort_kernel"] == "QGemm (integer)"
    assert data["layers"]["conv0"]["ort_kernel"] == "Conv (float)"
    assert data["layers"]["conv0"]["speed"] == "float"
    text = render_markdown(data)
    assert "## What ONNX Runtime runs (its optimised graph, CPU)" in text
    assert "| integer | 1 QGemm |" in text and "Float fallbacks (a float kernel reading a DequantizeLinear): 0" in text


def test_a_float_fallback_is_found() -> None:
    """Q -> DQ into a Conv whose weight is float: ORT has no integer kernel for it, so the Conv reads the
    DequantizeLinear output in float (a fallback)."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
         helper.make_node("Conv", ["xd", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w"),
         numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    from qcompiler import io

    summary = inspect_kernels(io.load_model_bytes(model.SerializeToString()), threads=1)
    assert len(summary.fallbacks) == 1 and summary.counts()["quantize"] == {"QuantizeLinear": 1,
                                                                            "DequantizeLinear": 1}
    assert summary.one_line().endswith("1 float fallback(s)")


@pytest.mark.parametrize(("op", "kind"), [("QLinearConv", "integer"), ("QGemm", "integer"),
                                          ("DynamicQuantizeMatMul", "integer"), ("FusedGemm", "float"),
                                          ("Conv", "float"), ("Transpose", "layout"), ("ReorderOutput", "layout"),
                                          ("QuantizeLinear", "quantize"), ("Flatten", "other")])
def test_kernel_kinds(op: str, kind: str) -> None:
    assert kernel_kind(op) == kind
