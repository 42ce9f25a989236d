"""Issue 12, class 7: malformed input is refused at load (exit 2, one line), valid input is compiled, and no output
is written that fails ``onnx.checker`` with full checking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

D = 4


def _mlp(**tweaks) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (D, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"],
                                                                                      name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _compile(model: onnx.ModelProto, tmp_path: Path, capfd, *flags: str) -> tuple[int, str, Path]:
    from qcompiler.cli import main

    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    code = main([str(src), "-o", str(out), *flags])
    err = capfd.readouterr().err
    assert src.read_bytes() == model.SerializeToString()
    return code, err, out


def _refused(model: onnx.ModelProto, tmp_path: Path, capfd, needle: str) -> None:
    code, err, out = _compile(model, tmp_path, capfd)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def _set(tensor: TensorProto, **fields) -> None:
    for key, value in fields.items():
        if key == "dims":
            del tensor.dims[:]
            tensor.dims.extend(value)
        else:
            setattr(tensor, key, value)


def _w(model: onnx.ModelProto) -> TensorProto:
    return model.graph.initializer[0]


def _malformed() -> list[tuple[str, onnx.ModelProto, str]]:
    cases = []

    def case(name: str, needle: str):
        def wrap(fn):
            model = _mlp()
            fn(model)
            cases.append((name, model, needle))
        return wrap

    @case("negative dim", "negative dimension")
    def _(m): _set(_w(m), dims=[-4, 8])

    @case("overflowing dims", "more than any memory")
    def _(m): _set(_w(m), dims=[2**40, 2**30])

    @case("raw_data too short", "raw_data")
    def _(m): _set(_w(m), raw_data=_w(m).raw_data[:-4])

    @case("raw_data too long", "raw_data")
    def _(m): _set(_w(m), raw_data=_w(m).raw_data + b"\0" * 4)

    @case("typed data count", "float_data")
    def _(m):
        t = _w(m)
        t.ClearField("raw_data")
        t.float_data.extend([0.5] * (D * 8 - 1))

    @case("no data", "no data")
    def _(m): _w(m).ClearField("raw_data")

    @case("unknown data type", "data type")
    def _(m): _w(m).data_type = 99

    @case("undefined data type", "data type")
    def _(m): _w(m).data_type = 0

    @case("string raw_data", "string")
    def _(m):
        t = _w(m)
        t.data_type = TensorProto.STRING
        _set(t, dims=[1])
        t.raw_data = b"abcd"

    @case("cycle", "sorted")
    def _(m): m.graph.node[0].input[0] = "y"

    @case("undefined input", "nope")
    def _(m): m.graph.node[1].input[0] = "nope"

    @case("opset too new", "opset 99")
    def _(m): m.opset_import[0].version = 99

    @case("opset zero", "opset 0")
    def _(m): m.opset_import[0].version = 0

    @case("opset twice", "twice")
    def _(m): m.opset_import.append(helper.make_opsetid("", 13))

    @case("IR version too new", "IR version")
    def _(m): m.ir_version = 99

    @case("negative input dim", "negative dimension")
    def _(m): m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -3

    @case("unknown op", "NoSuchOp")
    def _(m): m.graph.node[1].op_type = "NoSuchOp"

    @case("domain not imported", "foo")
    def _(m): m.graph.node[1].domain = "foo"

    @case("recursive function", "recursive")
    def _(m):
        f = helper.make_function("loc", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="loc")],
                                 [helper.make_opsetid("", 17), helper.make_opsetid("loc", 1)])
        m.functions.append(f)
        m.opset_import.append(helper.make_opsetid("loc", 1))
        m.graph.node[1].op_type, m.graph.node[1].domain = "F", "loc"

    @case("conflicting shapes", "shape")
    def _(m): m.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [3, 7]))

    @case("sparse index out of range", "index outside")
    def _(m):
        values = numpy_helper.from_array(np.array([1.0], np.float32), "S")
        indices = numpy_helper.from_array(np.array([99], np.int64), "S_idx")
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [D]))
        m.graph.node.append(helper.make_node("Add", ["x", "S"], ["z"]))
        m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", D]))

    return cases


MALFORMED = _malformed()


@pytest.mark.parametrize(("model", "needle"), [(m, n) for _, m, n in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_model_is_refused_at_load(model: onnx.ModelProto, needle: str, tmp_path: Path, capfd) -> None:
    _refused(model, tmp_path, capfd, needle)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _full_check(path: Path) -> None:
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int4", "float"])
def test_sparse_initializer_feeding_an_op_compiles(recipe: str, tmp_path: Path, capfd) -> None:
    model = _mlp()
    dense = numpy_helper.to_array(_w(model))
    del model.graph.initializer[:]
    flat = dense.reshape(-1)
    keep = np.flatnonzero(np.abs(flat) > 0.3)
    values = numpy_helper.from_array(flat[keep], "W")
    indices = numpy_helper.from_array(keep.astype(np.int64), "W_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(dense.shape)))
    code, err, out = _compile(model, tmp_path, capfd, "--recipe", recipe)
    assert code == 0, err
    _full_check(out)
    x = np.random.default_rng(1).normal(size=(3, D)).astype(np.float32)
    expected = np.maximum(x @ np.where(np.abs(dense) > 0.3, dense, 0), 0)
    np.testing.assert_allclose(_run(out, {"x": x})[0], expected, atol=0.1 * np.abs(expected).max())
    np.testing.assert_allclose(_run(tmp_path / "in.onnx", {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["int8-dynamic", "float"])
@pytest.mark.parametrize("through", ["initializer", "identity"])
def test_string_initializer_routed_to_an_output_compiles(recipe: str, through: str, tmp_path: Path, capfd) -> None:
    model = _mlp()
    words = helper.make_tensor("labels", TensorProto.STRING, [3], [b"cat", b"dog", b"x" * 5000])
    model.graph.initializer.append(words)
    name = "labels"
    if through == "identity":
        model.graph.node.append(helper.make_node("Identity", ["labels"], ["labels_out"]))
        name = "labels_out"
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.STRING, [3]))
    code, err, out = _compile(model, tmp_path, capfd, "--recipe", recipe)
    assert code == 0, err
    _full_check(out)
    y, labels = _run(out, {"x": np.ones((1, D), np.float32)})
    assert list(labels) == ["cat", "dog", "x" * 5000]


def test_zero_element_weight_compiles(tmp_path: Path, capfd) -> None:
    model = _mlp()
    empty = numpy_helper.from_array(np.zeros((D, 0), np.float32), "E")
    model.graph.initializer.append(empty)
    model.graph.node.append(helper.make_node("MatMul", ["x", "E"], ["e"], name="mm_empty"))
    model.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 0]))
    code, err, out = _compile(model, tmp_path, capfd)
    assert code == 0, err
    _full_check(out)
    y, e = _run(out, {"x": np.ones((2, D), np.float32)})
    assert e.shape == (2, 0) and y.shape == (2, 8)


def test_every_recipe_output_passes_the_full_checker(tmp_path: Path, capfd) -> None:
    model = _mlp()
    for recipe in ("int8-dynamic", "int4", "int8-weight", "nf4", "fp8-weight", "ternary", "float"):
        folder = tmp_path / recipe
        folder.mkdir()
        code, err, out = _compile(model, folder, capfd, "--recipe", recipe)
        assert code in (0, 2), err
        if code == 0:
            _full_check(out)


def test_constant_with_a_sparse_value_compiles(tmp_path: Path, capfd) -> None:
    model = _mlp()
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "c_idx")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], sparse_value=helper.make_sparse_tensor(
        values, indices, [D])))
    model.graph.node[1].input[0] = "xc"
    model.graph.node.insert(1, helper.make_node("Add", ["x", "c"], ["xc"]))
    code, err, out = _compile(model, tmp_path, capfd, "--recipe", "float")
    assert code == 0, err
    _full_check(out)
    x = np.random.default_rng(2).normal(size=(2, D)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], _run(tmp_path / "in.onnx", {"x": x})[0], rtol=1e-6)


def test_constant_with_a_huge_sparse_value_is_refused(tmp_path: Path, capfd) -> None:
    model = _mlp()
    values = numpy_helper.from_array(np.array([1.0], np.float32), "c")
    indices = numpy_helper.from_array(np.array([0], np.int64), "c_idx")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], sparse_value=helper.make_sparse_tensor(
        values, indices, [2**20, 2**20])))
    model.graph.node[1].input[0] = "xc"
    model.graph.node.insert(1, helper.make_node("Add", ["x", "c"], ["xc"]))
    _refused(model, tmp_path, capfd, "sparse tensor 'c'")
