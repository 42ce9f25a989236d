"""qcompiler.runtime: the ORT session wrapper, its checks, and that it imports no compiler dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler.runtime import InvalidFeedError, Session, SessionError, TensorInfo


@pytest.fixture
def mlp_path(tmp_path: Path, make_mlp, write_model) -> Path:
    proto = make_mlp()
    onnx.helper.set_model_props(proto, {"qcompiler.version": "0.1.0", "qcompiler.recipe": "int8"})
    return write_model(proto, tmp_path, external=True)


def test_runtime_imports_no_compiler_dependency() -> None:
    code = ("import sys, qcompiler.runtime, qcompiler.runtime.session\n"
            "heavy = [m for m in ('torch', 'networkx', 'onnx', 'onnx_ir', 'onnxscript', 'qcompiler.io', "
            "'qcompiler.api') if m in sys.modules]\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_session_runs_and_matches_ort(mlp_path: Path) -> None:
    session = Session(mlp_path, intra_op_threads=1, inter_op_threads=1)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    outputs = session.run({"x": x})
    assert list(outputs) == ["y"]
    reference = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(outputs["y"], reference)
    assert session.run({"x": x}, output_names=["y"])["y"].shape == (5, 4)
    assert session.providers == ["CPUExecutionProvider"]


def test_session_describes_inputs_outputs_and_metadata(mlp_path: Path) -> None:
    session = Session(mlp_path)
    assert session.inputs == [TensorInfo("x", ("N", 8), "tensor(float)", np.dtype(np.float32))]
    assert session.outputs == [TensorInfo("y", ("N", 4), "tensor(float)", np.dtype(np.float32))]
    assert session.metadata == {"qcompiler.version": "0.1.0", "qcompiler.recipe": "int8"}


@pytest.mark.parametrize(("feeds", "match"), [
    ({"X": np.zeros((1, 8), np.float32)}, r"unknown input name\(s\) 'X'; the model's inputs are 'x'"),
    ({}, r"missing input\(s\) 'x'"),
    ({"x": np.zeros((1, 8), np.float64)}, "input 'x' must be float32"),
    ({"x": np.zeros((8,), np.float32)}, "must have rank 2"),
    ({"x": np.zeros((1, 7), np.float32)}, "must have 8 at axis 1"),
])
def test_bad_feeds_are_clear(mlp_path: Path, feeds: dict, match: str) -> None:
    session = Session(mlp_path)
    with pytest.raises(InvalidFeedError, match=match) as info:
        session.run(feeds)
    assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)


def test_unknown_output_name(mlp_path: Path) -> None:
    with pytest.raises(InvalidFeedError, match=r"unknown output name\(s\) 'z'"):
        Session(mlp_path).run({"x": np.zeros((1, 8), np.float32)}, output_names=["z"])


def test_session_errors(tmp_path: Path, mlp_path: Path) -> None:
    with pytest.raises(SessionError, match="no such model file"):
        Session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(SessionError, match="not an ONNX model"):
        Session(tmp_path / "junk.onnx")
    (tmp_path / "nodes.onnx").write_bytes(b"\x3a\x02\x0a\x00")  # well-formed protobuf, a graph of one empty node
    with pytest.raises(SessionError, match="cannot load the model"):
        Session(tmp_path / "nodes.onnx")
    with pytest.raises(SessionError, match="not available"):
        Session(mlp_path, providers=["NoSuchExecutionProvider"])


def test_auto_providers_pick_what_this_build_has(mlp_path: Path, monkeypatch) -> None:
    from qcompiler.runtime import session as session_module

    assert Session(mlp_path, providers="auto").providers == ["CPUExecutionProvider"]  # a CPU build
    asked = {}
    real = session_module.ort.InferenceSession

    def recording(path, options, providers):
        asked["providers"] = providers
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session_module.ort, "InferenceSession", recording)
    Session(mlp_path, providers="auto")
    assert asked["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(SessionError, match="providers must be a list of ONNX Runtime execution providers or 'auto'"):
        Session(mlp_path, providers="CPUExecutionProvider")
