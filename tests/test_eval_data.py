"""``qcompile eval --data``: classifiers and embedding models on the user's .npz, against numpy references."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_mlp
from onnx import TensorProto, helper, numpy_helper

from qcompiler.cli import main
from qcompiler.quality_data import compare_on_data


def _outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)


def _log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


@pytest.fixture
def classifier(tmp_path):
    """A float MLP, a copy with perturbed weights (the 'quantized' one), and 40 samples."""
    float_model = build_mlp(in_features=8, hidden=16, out_features=5, seed=3)
    quant = onnx.ModelProto()
    quant.CopyFrom(float_model)
    rng = np.random.default_rng(1)
    for init in quant.graph.initializer:
        array = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((array + 0.3 * rng.standard_normal(array.shape)).astype(np.float32),
                                              init.name))
    paths = tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "data.npz"
    onnx.save(float_model, paths[0])
    onnx.save(quant, paths[1])
    np.savez(paths[2], x=rng.standard_normal((40, 8)).astype(np.float32))
    return paths


def test_classifier_figures_equal_numpy(classifier):
    f, q, data = classifier
    x = np.load(data)["x"]
    ref, got = _outputs(f, {"x": x}), _outputs(q, {"x": x})
    kl = np.sum(np.exp(_log_softmax(ref)) * (_log_softmax(ref) - _log_softmax(got)), axis=1)
    report = compare_on_data(f, q, data, batch=7, latency_runs=2)
    assert report.kind == "classifier" and report.samples == 40
    assert report.figures["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == got.argmax(1)))
    assert 0 < report.figures["top1_agreement"] < 1  # the perturbation flips some samples: the figure can fail
    assert report.figures["kl_mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert report.figures["kl_max"] == pytest.approx(kl.max(), rel=1e-6)
    assert report.latency_float_ms > 0 and report.latency_quant_ms > 0


def test_identical_models_agree_fully(classifier):
    f, _, data = classifier
    report = compare_on_data(f, f, data, latency_runs=0)
    assert report.figures["top1_agreement"] == 1.0 and report.figures["kl_max"] == pytest.approx(0.0, abs=1e-12)


def _encoder(path, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((30, 6)).astype(np.float32)
    weight = rng.standard_normal((6, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["h"])],
        "enc", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 6])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)  # attention_mask is unused by the graph: the evaluation pools with it


def test_embedding_cosine_pools_with_the_mask(tmp_path):
    f, q, data = tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "d.npz"
    _encoder(f, 0)
    _encoder(q, 1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, (9, 7))
    mask = (np.arange(7)[None, :] < rng.integers(1, 8, (9, 1))).astype(np.int64)
    np.savez(data, input_ids=ids, attention_mask=mask)
    feeds = {"input_ids": ids, "attention_mask": mask}
    w = mask[..., None].astype(np.float64)
    ref = (_outputs(f, feeds) * w).sum(1) / w.sum(1)
    got = (_outputs(q, feeds) * w).sum(1) / w.sum(1)
    cos = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    report = compare_on_data(f, q, data, batch=4, latency_runs=0)
    assert report.kind == "embedding"
    assert report.figures["cos_mean"] == pytest.approx(cos.mean(), rel=1e-9)
    assert report.figures["cos_min"] == pytest.approx(cos.min(), rel=1e-9)


def test_cli_prints_and_writes_json(classifier, tmp_path, capsys):
    f, q, data = classifier
    out = tmp_path / "eval.json"
    assert main(["eval", str(f), str(q), "--data", str(data), "--latency-runs", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "KL divergence" in printed
    saved = json.loads(out.read_text())
    assert saved["kind"] == "classifier" and saved["samples"] == 40


@pytest.mark.parametrize("extra, needle", [
    (["--text", "t.txt"], "--data is for"),
    (["--kind", "embedding", "--batch", "0"], "--batch must be at least 1"),
])
def test_cli_refuses_mixed_or_bad_flags(classifier, capfd, extra, needle):
    f, q, data = classifier
    assert main(["eval", str(f), str(q), "--data", str(data), *extra]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_data_that_does_not_fit_is_one_line(classifier, tmp_path, capfd):
    f, q, _ = classifier
    for name, arrays, needle in (("wrong.npz", {"y": np.zeros((3, 8), np.float32)}, "missing input"),
                                 ("nan.npz", {"x": np.full((3, 8), np.nan, np.float32)}, "NaN"),
                                 ("shape.npz", {"x": np.zeros((3, 9), np.float32)}, "axis 1")):
        np.savez(tmp_path / name, **arrays)
        assert main(["eval", str(f), str(q), "--data", str(tmp_path / name)]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_a_model_that_gives_probabilities_is_compared_on_them(tmp_path):
    from qcompiler.quality_data import _log_probabilities

    p = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    assert np.allclose(np.exp(_log_probabilities(p)), p)
    scores = np.array([[2.0, -1.0, 0.5]])
    assert np.allclose(np.exp(_log_probabilities(scores)).sum(), 1.0)
