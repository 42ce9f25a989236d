"""--report out.png: the per-layer SQNR bar chart (sensitivity first, else weight SQNR); errors are one line."""

from __future__ import annotations

import pytest

from qcompiler.errors import UsageError
from qcompiler.report_plot import layer_series, plot_layers


def _data(**figures) -> dict:
    return {"recipe": {"name": "int8"}, "layers": {"conv1": {"op_type": "Conv", **figures},
                                                   "fc": {"op_type": "Gemm", "weight_sqnr_db": 40.0}}}


def test_series_prefers_sensitivity_then_weight_sqnr() -> None:
    label, rows = layer_series(_data(sensitivity_sqnr_db=21.5, kept_float=True, weight_sqnr_db=35.0)["layers"])
    assert "only this layer" in label and rows == [("conv1", 21.5, True)]
    label, rows = layer_series(_data(weight_sqnr_db=35.0)["layers"])
    assert label == "weight SQNR (dB)" and rows == [("conv1", 35.0, False), ("fc", 40.0, False)]
    assert layer_series({}) == ("", [])


def test_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "layers.png"
    assert plot_layers(_data(weight_sqnr_db=35.0), path) == 2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary file left


def test_nothing_to_plot_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="no per-layer SQNR"):
        plot_layers({"layers": {}}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
