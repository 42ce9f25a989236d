"""Calibration data: accepted forms, batching, and every malformed case as its own one-line CalibrationError."""

from __future__ import annotations

import pickle

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mlp
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import CalibrationError


def _two_input_model() -> ir.Model:
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _x(n: int = 10, k: int = 64) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)


def _error(path, model) -> str:
    with pytest.raises(CalibrationError) as info:
        load_calibration_data(path, model)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


def test_npz_batches_and_max_samples(tmp_path):
    x = _x(10)
    np.savez(tmp_path / "c.npz", x=x)
    data = load_calibration_data(tmp_path / "c.npz", mlp())
    assert data.input_names == ("x",) and data.num_samples == 10
    batches = list(data.iter_batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert sum(b["x"].shape[0] for b in data.iter_batches(3, max_samples=5)) == 5


def test_missing_and_unknown_names_are_listed(tmp_path):
    np.savez(tmp_path / "c.npz", a=_x(3, 4), c=_x(3, 4))
    message = _error(tmp_path / "c.npz", _two_input_model())
    assert "missing input(s) b" in message and "unknown name(s) c" in message


def test_wrong_names(tmp_path):
    np.savez(tmp_path / "c.npz", input=_x(3))
    message = _error(tmp_path / "c.npz", mlp())
    assert "missing input(s) x" in message and "unknown name(s) input" in message


def test_wrong_dtype_is_refused_not_cast(tmp_path):
    np.savez(tmp_path / "c.npz", x=_x(3).astype(np.float64))
    message = _error(tmp_path / "c.npz", mlp())
    assert "'x'" in message and "float64" in message and "expected float32" in message


def test_wrong_shape(tmp_path):
    np.savez(tmp_path / "c.npz", x=_x(3, 63))
    assert "dimension 1 is 64" in _error(tmp_path / "c.npz", mlp())
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2, 64), np.float32))
    assert "rank" in _error(tmp_path / "d.npz", mlp())


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_name_input_and_sample(tmp_path, bad, word):
    x = _x(6)
    x[4, 7] = bad
    np.savez(tmp_path / "c.npz", x=x)
    message = _error(tmp_path / "c.npz", mlp())
    assert "input 'x'" in message and "sample 4" in message and word in message


def test_sample_index_counts_across_files(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=_x(5))
    bad = _x(5)
    bad[2, 0] = np.nan
    np.savez(folder / "b.npz", x=bad)
    assert "sample 7" in _error(folder, mlp())


def test_pickled_npy_is_never_loaded(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert "pickle" in _error(path, mlp())
    raw = tmp_path / "raw.npy"
    raw.write_bytes(pickle.dumps({"x": _x(2)}))
    _error(raw, mlp())


def test_pickled_npz_member_is_never_loaded(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.array([None, 1], dtype=object))
    assert "pickle" in _error(tmp_path / "c.npz", mlp())


def test_empty_data(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((0, 64), np.float32))
    assert "zero samples" in _error(tmp_path / "c.npz", mlp())
    (tmp_path / "empty").mkdir()
    assert "no .npz" in _error(tmp_path / "empty", mlp())
    assert "not found" in _error(tmp_path / "nothing.npz", mlp())


def test_npy_needs_a_single_input_model(tmp_path):
    np.save(tmp_path / "c.npy", _x(3, 4))
    assert ".npy" in _error(tmp_path / "c.npy", _two_input_model())
    np.save(tmp_path / "x.npy", _x(7))
    data = load_calibration_data(tmp_path / "x.npy", mlp())
    assert data.num_samples == 7 and list(data.iter_batches(16))[0]["x"].shape == (7, 64)


def test_folder_of_npz_is_sorted_and_concatenated_lazily(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    parts = [_x(3) + i for i in range(3)]
    for i, part in enumerate(parts):
        np.savez(folder / f"part{i:02d}.npz", x=part)
    data = load_calibration_data(folder, mlp())
    assert data.num_samples == 9
    batches = list(data.iter_batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), np.concatenate(parts))


def test_batch_one_model_is_fed_sample_by_sample(tmp_path):
    model = cnn(batch=1)
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    data = load_calibration_data(tmp_path / "c.npz", model)
    batches = list(data.iter_batches(16))
    assert len(batches) == 5 and all(b["x"].shape == (1, 3, 16, 16) for b in batches)


def test_inputs_with_different_sample_counts(tmp_path):
    np.savez(tmp_path / "c.npz", a=_x(3, 4), b=_x(2, 4))
    assert "different numbers of samples" in _error(tmp_path / "c.npz", _two_input_model())
