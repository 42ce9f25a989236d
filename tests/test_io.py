"""qcompiler.io: load/save round trips, external data, determinism, laziness, ORT sessions and the checker."""

from __future__ import annotations

import filecmp
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompiler import io, io_write
from qcompiler.errors import UsageError


def _run_file(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


FEEDS = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}


def _if_model() -> onnx.ModelProto:
    """An If whose branches each hold a 64x8 initializer (subgraph tensors) plus a Constant node."""
    rng = np.random.default_rng(2)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        w = numpy_helper.from_array((rng.standard_normal((8, 64)) * scale).astype(np.float32), f"W_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", onnx.TensorProto.FLOAT, None)], [w])

    const = numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "c")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=const),
        helper.make_node("Add", ["x", "c"], ["xc"]),
        helper.make_node("ReduceSum", ["xc"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -2.0)),
    ]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 64])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-input"])
def test_round_trip_keeps_outputs(make_mlp, write_model, tmp_path: Path, external: bool) -> None:
    src = write_model(make_mlp(), tmp_path / "in", external=external)
    model = io.load_model(src)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    io.save_model(model, out, input_path=src)
    assert sorted(os.listdir(out.parent)) == ["model.onnx"]  # small: saved inline, no data file
    for expected, actual in zip(_run_file(src, FEEDS), _run_file(out, FEEDS), strict=True):
        np.testing.assert_array_equal(expected, actual)
    reloaded = onnx.load(out)
    assert [i.name for i in reloaded.graph.initializer] == ["W1", "b1", "W2", "b2"]
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in reloaded.graph.initializer)


def test_load_is_lazy(make_mlp, write_model, tmp_path: Path) -> None:
    src = write_model(make_mlp(), tmp_path, external=True)
    model = io.load_model(src)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors)  # nothing mapped or read yet
    assert all(Path(t.base_dir) == tmp_path.absolute() for t in tensors)
    w1 = model.graph.initializers["W1"].const_value
    np.testing.assert_array_equal(w1.numpy(), numpy_helper.to_array(make_mlp().graph.initializer[0]))
    assert w1.raw is not None  # memory-mapped on first use


def test_load_does_not_change_the_input(make_mlp, write_model, tmp_path: Path, digest) -> None:
    src = write_model(make_mlp(), tmp_path / "in", external=True)
    before = digest(src.parent)
    io.save_model(io.load_model(src), tmp_path / "out.onnx", input_path=src)
    assert digest(src.parent) == before


@pytest.mark.parametrize("threshold", [0, 800])  # the tensors total 848 bytes
def test_large_model_path_writes_external_data(make_mlp, write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               threshold: int) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", threshold)
    monkeypatch.setattr(io, "EXTERNAL_MIN_TENSOR_BYTES", 64)
    src = write_model(make_mlp(), tmp_path / "in")
    out = tmp_path / "out.onnx"
    io.save_model(io.load_model(src), out)
    names = sorted(p.name for p in tmp_path.iterdir())
    data = tmp_path / names[2]
    assert names[:2] == ["in", "out.onnx"] and len(names) == 3
    assert data.name == f"out.onnx.{hashlib.sha256(data.read_bytes()).hexdigest()[:16]}.data"  # named by content
    proto = onnx.load(out, load_external_data=False)
    locations = {i.name: {e.key: e.value for e in i.external_data} for i in proto.graph.initializer}
    # W1 (512 B), b1 (64 B), W2 (256 B) go external, b2 (16 B) stays inline
    assert sorted(n for n, fields in locations.items() if fields) == ["W1", "W2", "b1"]
    assert {fields["location"] for fields in locations.values() if fields} == {data.name}
    for expected, actual in zip(_run_file(src, FEEDS), _run_file(out, FEEDS), strict=True):
        np.testing.assert_array_equal(expected, actual)
    assert io.model_bytes(out) == out.stat().st_size + data.stat().st_size
    # the saved model loads back lazily and saves again (external data in, external data out)
    again = io.load_model(out)
    assert isinstance(again.graph.initializers["W1"].const_value, ir.ExternalTensor)
    out2 = tmp_path / "again" / "out.onnx"
    out2.parent.mkdir()
    io.save_model(again, out2, input_path=out)
    assert filecmp.cmp(out, out2, shallow=False)
    assert filecmp.cmp(data, out2.parent / data.name, shallow=False)


def test_save_leaves_the_model_unchanged(make_mlp, write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    src = write_model(make_mlp(), tmp_path / "in", external=True)
    model = io.load_model(src)
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    io.save_model(model, tmp_path / "out.onnx")
    after = {name: v.const_value for name, v in model.graph.initializers.items()}
    assert before == after and list(before) == list(after)
    assert all(Path(t.path).parent == src.parent.absolute() for t in after.values())


@pytest.mark.parametrize("threshold", [io.EXTERNAL_DATA_THRESHOLD, 0], ids=["inline", "external"])
def test_save_is_deterministic(make_mlp, write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", threshold)
    model = io.load_model(write_model(make_mlp(), tmp_path / "in", external=True))
    model.metadata_props["qcompiler.recipe"] = "int8"
    model.metadata_props["a"] = "b"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        io.save_model(model, tmp_path / folder / "m.onnx")
    io.save_model(model, tmp_path / "a" / "m.onnx")  # over an existing output
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert cmp.left_only == cmp.right_only == [] and cmp.diff_files == []
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", os.listdir(tmp_path / "a"), shallow=False)
    assert mismatch == errors == []


def test_subgraphs_and_constants_with_external_data(make_mlp, write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proto = _if_model()
    src = write_model(proto, tmp_path / "in", external=True)
    # onnx.save keeps attribute tensors inline: move the Constant's value to its own data file by hand
    proto = onnx.load(src, load_external_data=False)
    const = proto.graph.node[0].attribute[0].t
    (src.parent / "const.bin").write_bytes(b"\0" * 16 + const.raw_data)
    onnx.external_data_helper.set_external_data(const, "const.bin", offset=16, length=len(const.raw_data))
    const.ClearField("raw_data")
    const.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(proto, src)
    feeds = {"x": np.ones((3, 8), np.float32)}
    model = io.load_model(src)
    slots = io._tensor_slots(model)
    assert sum(isinstance(t, ir.ExternalTensor) for t, _, _ in slots) == 4  # zero, Constant, two branch weights
    io.check_model(model)
    for threshold in (io.EXTERNAL_DATA_THRESHOLD, 0):
        monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", threshold)
        out = tmp_path / f"out{threshold}" / "m.onnx"
        out.parent.mkdir()
        io.save_model(model, out, input_path=src)
        np.testing.assert_array_equal(_run_file(src, feeds)[0], _run_file(out, feeds)[0])
        io.check_model(io.load_model(out))
    np.testing.assert_array_equal(_run_file(src, feeds)[0], io.ort_session(model).run(None, feeds)[0])


@pytest.mark.parametrize("kind", ["in-memory", "external", "mixed-folders"])
def test_ort_session(make_mlp, write_model, tmp_path: Path, kind: str) -> None:
    src_inline = write_model(make_mlp(), tmp_path / "a")
    expected = _run_file(src_inline, FEEDS)[0]
    if kind == "in-memory":
        model = ir.serde.deserialize_model(make_mlp())
    else:
        model = io.load_model(write_model(make_mlp(), tmp_path / "b", external=True))
    if kind == "mixed-folders":  # external tensors from two folders: goes through a temporary copy
        other = io.load_model(write_model(make_mlp(), tmp_path / "c", external=True))
        model.graph.initializers["W2"].const_value = other.graph.initializers["W2"].const_value
    leftovers = sorted(Path(tempfile.gettempdir()).glob("qcompiler-ort-*"))
    session = io.ort_session(model, intra_op_threads=1, optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    np.testing.assert_allclose(session.run(None, FEEDS)[0], expected, rtol=1e-6, atol=1e-6)
    assert sorted(Path(tempfile.gettempdir()).glob("qcompiler-ort-*")) == leftovers  # temporary copy removed


def test_check_model_strips_weights_and_finds_errors(make_mlp, write_model, tmp_path: Path) -> None:
    model = io.load_model(write_model(make_mlp(), tmp_path, external=True))
    io.check_model(model)
    assert all(isinstance(v.const_value, ir.ExternalTensor) and v.const_value.raw is None
               for v in model.graph.initializers.values())  # weights were not read
    assert list(model.graph.initializers) == ["W1", "b1", "W2", "b2"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    model.graph.node(0).op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError):
        io.check_model(model)


def test_to_proto_is_self_contained(make_mlp, write_model, tmp_path: Path) -> None:
    model = io.load_model(write_model(make_mlp(), tmp_path, external=True))
    proto = io.to_proto(model)
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in proto.graph.initializer)
    assert isinstance(model.graph.initializers["W1"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]),
                                  numpy_helper.to_array(make_mlp().graph.initializer[0]))


def test_model_bytes_counts_external_data(make_mlp, write_model, tmp_path: Path) -> None:
    src = write_model(make_mlp(), tmp_path, external=True)
    assert io.model_bytes(src) == src.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    inline = write_model(make_mlp(), tmp_path, "inline.onnx")
    assert io.model_bytes(inline) == inline.stat().st_size


def test_check_output_path_accepts_a_new_file(make_mlp, write_model, tmp_path: Path) -> None:
    src = write_model(make_mlp(), tmp_path, external=True)
    io.check_output_path(src, tmp_path / "out.onnx")
    (tmp_path / "out.onnx").write_bytes(b"old")  # an existing output that is not the input may be replaced
    io.check_output_path(src, tmp_path / "out.onnx")


def test_save_refuses_to_overwrite_data_the_model_reads(make_mlp, write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    src = write_model(make_mlp(), tmp_path, "m.onnx", external=True)  # data in m.onnx.data
    model = io.load_model(src)
    with pytest.raises(UsageError, match="still reads"):
        io.save_model(model, tmp_path / "m.onnx.data")
    # the model file itself may be replaced (no input_path given): the output's data gets its own name, and the
    # file the model reads its weights from is kept
    before = (tmp_path / "m.onnx.data").read_bytes()
    io.save_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").read_bytes() == before
    assert len(list(tmp_path.glob("m.onnx.*.data"))) == 1
    for expected, actual in zip(_run_file(tmp_path / "m.onnx", FEEDS), io.ort_session(model).run(None, FEEDS),
                                strict=True):
        np.testing.assert_array_equal(expected, actual)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_every_dtype_round_trips_bit_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool) -> None:
    import ml_dtypes

    monkeypatch.setattr(io, "EXTERNAL_MIN_TENSOR_BYTES", 0)
    rng = np.random.default_rng(0)
    tensors = {
        "f16": ir.Tensor(rng.standard_normal((33, 17)).astype(np.float16)),
        "bf16": ir.Tensor(rng.standard_normal(9).astype(ml_dtypes.bfloat16), dtype=ir.DataType.BFLOAT16),
        "i4": ir.Tensor(rng.integers(-8, 8, (5, 7)).astype(ml_dtypes.int4), dtype=ir.DataType.INT4),
        "u8": ir.Tensor(rng.integers(0, 255, 300).astype(np.uint8)),
        "b": ir.Tensor(rng.integers(0, 2, 40).astype(bool)),
        "s": ir.StringTensor(np.array([b"ab", b"cde"], dtype=object)),
    }
    graph = ir.Graph([], [], nodes=[], name="g", opset_imports={"": 17})
    for name, tensor in tensors.items():
        tensor.name = name
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
        graph.register_initializer(value)
        graph.outputs.append(value)
    model = ir.Model(graph, ir_version=10)
    first = tmp_path / "a" / "m.onnx"
    first.parent.mkdir()
    io_write._save(model, first, external=True)  # every tensor but the strings goes to m.onnx.<hash>.data
    second = tmp_path / "b" / "m.onnx"
    second.parent.mkdir()
    io_write._save(io.load_model(first), second, external=external)
    loaded = io.load_model(second)
    for name, tensor in tensors.items():
        got = loaded.graph.initializers[name].const_value
        assert got.dtype == tensor.dtype
        if name == "s":
            assert got.string_data() == tensor.string_data()
        else:
            assert got.tobytes() == tensor.tobytes(), name
