"""Shared test fixtures: tiny models built in code, a file-tree digest, and model files written into tmp folders.

Kept small and generic on purpose; a test file that needs something specific builds it itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

OPSET = 17


def build_mlp(in_features: int = 8, hidden: int = 16, out_features: int = 4, *, seed: int = 0,
             batch: int | str = "N", opset: int = OPSET) -> onnx.ModelProto:
    """x[batch, in] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> Add b2 -> y[batch, out], seeded float32 weights."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((in_features, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, out_features)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(out_features).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="matmul1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="matmul2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, out_features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_proto(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx", *, external: bool = False,
                location: str | None = None) -> Path:
    """Save ``proto`` to ``folder/name``; with ``external``, every tensor goes to one data file (default
    ``<name>.data``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location or f"{name}.data", size_threshold=0)
    else:
        onnx.save_model(proto, path)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks recorded by target), to assert nothing changed."""
    digest: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                digest[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "select_speed: run select-speed with its real cost model (see below)")


@pytest.fixture(autouse=True)
def _int8_everywhere(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``select-speed`` (int8 recipes) leaves in float what ONNX Runtime would run slower in int8: every tiny test
    model. Tests of the other passes were written for every layer int8, so they run with its cost model's
    thresholds at 0 (every unit int8, outputs as before the pass existed); a test marked ``select_speed`` (the
    pass's own, the pinned output hashes, the demo) gets the real thresholds."""
    if request.node.get_closest_marker("select_speed") is None:
        from qcompiler.passes.algorithms import _speed_cost

        monkeypatch.setattr(_speed_cost, "DEFAULT_MIN_CONV_MACS", 0)
        monkeypatch.setattr(_speed_cost, "DEFAULT_MIN_MATMUL_MACS", 0)


@pytest.fixture
def make_mlp() -> Callable[..., onnx.ModelProto]:
    """The :func:`build_mlp` builder: ``make_mlp(in_features=8, hidden=16, out_features=4, seed=0)``."""
    return build_mlp


@pytest.fixture
def write_model() -> Callable[..., Path]:
    """The :func:`save_proto` helper: ``write_model(proto, folder, name="model.onnx", external=False)``."""
    return save_proto


@pytest.fixture
def digest() -> Callable[[Path], dict[str, str]]:
    """The :func:`tree_digest` helper."""
    return tree_digest
