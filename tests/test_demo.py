"""Tests for ``qcompile demo`` (:mod:`qcompiler.demo`) and the shipped digits model it uses."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler import demo

pytestmark = pytest.mark.select_speed  # the demo shows the int8 recipe's real select-speed (conftest.py)

MODEL_NAMES = ("fp32", "int8-dynamic", "int8 (static, for batch 1)", "int8 (static, for batch 497)")


def test_shipped_files_are_small_and_well_formed() -> None:
    import onnx

    shipped = importlib.resources.files("qcompiler.models")
    with importlib.resources.as_file(shipped / "digits_cnn.onnx") as path:
        assert path.stat().st_size < 200_000
        model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}  # left in for the fusion pass
    with importlib.resources.as_file(shipped / "digits.npz") as path:
        assert path.stat().st_size < 200_000
        with np.load(path, allow_pickle=False) as data:
            assert data["calib_x"].dtype == np.float32 and data["calib_x"].shape[1:] == (1, 8, 8)
            assert data["test_x"].shape == (len(data["test_y"]), 1, 8, 8)
            assert 0.0 <= data["test_x"].min() and data["test_x"].max() <= 1.0


def test_demo_import_is_light() -> None:
    code = "import sys, qcompiler.demo; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.timeout(30)
def test_run_demo_quantized_accuracy_close_to_fp32(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path / "work", quiet=True)
    assert result.ok, result.to_table()
    assert [row.name for row in result.rows] == list(MODEL_NAMES)
    fp32 = result.row("fp32")
    assert fp32.accuracy > 0.9
    for name in MODEL_NAMES[1:]:
        row = result.row(name)
        assert row.accuracy >= fp32.accuracy - 0.015, result.to_table()
        assert row.agreement > 0.95
        assert row.size_bytes > 0 and row.latency_b1_s > 0 and row.compile_s > 0
        assert row.path is not None and row.path.is_file()
    # batch 1: select-speed keeps every layer of this tiny CNN float; batch 497: its two Gemms int8
    batch1, batch497 = result.row(MODEL_NAMES[2]), result.row(MODEL_NAMES[3])
    assert batch1.kernels == fp32.kernels and "kept 4 of 4 layers float" in batch1.why
    assert "2 QGemm" in batch497.kernels and "kept 2 of 4 layers float (/0/Conv, /3/Conv: conv region" in batch497.why
    assert batch497.size_bytes < fp32.size_bytes
    assert batch497.latency_all_s > 0  # produced; not asserted for speed (a shared CI machine)
    table = result.to_table()
    for name in MODEL_NAMES:
        assert f"| {name} |" in table
        assert f"- {name}: " in table  # the "why" line: what ORT runs
    assert "Why (what ONNX Runtime runs; what select-speed kept float):" in table
    assert (tmp_path / "work" / "digits_calib.npz").is_file()


def test_run_demo_reports_a_failing_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcompiler import api
    from qcompiler.errors import QCompileError

    def broken(*args: object, **kwargs: object) -> None:
        raise QCompileError("boom")

    monkeypatch.setattr(api, "compile_model", broken)
    result = demo.run_demo(None, quiet=True)
    assert not result.ok
    assert result.workdir is None
    assert result.row("fp32").accuracy > 0.9
    assert "boom" in result.row("int8-dynamic").error
    assert "failed: QCompileError: boom" in result.to_table()
