"""qcompiler.io refuses bad and unsafe inputs with one clear line, never touches the input, never leaves output."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qcompiler import io, io_write
from qcompiler.errors import InputError, QCompileError, UnsafeModelError, UsageError


def _refused(exc_type: type[QCompileError], call: Callable[[], object], watched: Path, digest,
             match: str = "") -> str:
    """Run ``call``; assert it raises exactly ``exc_type`` with a one-line message and ``watched`` is unchanged."""
    before = digest(watched)
    with pytest.raises(QCompileError) as info:
        call()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message and "\n" not in message
    assert match in message
    assert digest(watched) == before
    return message


@pytest.fixture
def ext_model(tmp_path: Path, make_mlp, write_model) -> Path:
    """An MLP in tmp_path/model/ with every tensor in model.onnx.data, and tmp_path/secret.bin beside the folder."""
    (tmp_path / "secret.bin").write_bytes(np.arange(1024, dtype=np.float32).tobytes())
    return write_model(make_mlp(), tmp_path / "model", external=True)


def _set_external(path: Path, tensor: str, entries: list[tuple[str, str]]) -> None:
    """Rewrite the external_data entries of one initializer (in the .onnx file only)."""
    proto = onnx.load(path, load_external_data=False)
    init = next(i for i in proto.graph.initializer if i.name == tensor)
    del init.external_data[:]
    for key, value in entries:
        init.external_data.add(key=key, value=value)
    onnx.save_model(proto, path)


def _load_and_save(src: Path) -> Callable[[], None]:
    out = src.parent.parent / "out" / "out.onnx"
    out.parent.mkdir(exist_ok=True)

    def call() -> None:
        try:
            io.save_model(io.load_model(src), out, input_path=src)
        finally:
            assert not out.exists() and os.listdir(out.parent) == []
    return call


# -- files that are not models ------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path, digest) -> None:
    assert "no such file" in _refused(InputError, lambda: io.load_model(tmp_path / "nope.onnx"), tmp_path, digest)


def test_a_folder(tmp_path: Path, digest) -> None:
    (tmp_path / "dir.onnx").mkdir()
    assert "folder" in _refused(InputError, lambda: io.load_model(tmp_path / "dir.onnx"), tmp_path, digest)


def test_empty_file(tmp_path: Path, digest) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty" in _refused(InputError, lambda: io.load_model(tmp_path / "empty.onnx"), tmp_path, digest)


@pytest.mark.parametrize("content", [b"hello, this is not a model\n", b"PK\x03\x04zipfile", b"\xff" * 64,
                                     b"ir_version: 8\ngraph { }\n"])
def test_not_an_onnx_file(tmp_path: Path, digest, content: bytes) -> None:
    (tmp_path / "x.onnx").write_bytes(content)
    assert "not" in _refused(InputError, lambda: io.load_model(tmp_path / "x.onnx"), tmp_path, digest)


def test_truncated_model(tmp_path: Path, make_mlp) -> None:
    blob = make_mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    cuts = [n for n in range(1, len(blob)) if n < 64 or n > len(blob) - 64 or n % 7 == 0]  # file writes are slow
    for n in cuts:
        path.write_bytes(blob[:n])
        with pytest.raises(InputError) as info:
            io.load_model(path)
        assert type(info.value) is InputError and "\n" not in str(info.value)
        assert path.read_bytes() == blob[:n]
    path.write_bytes(blob)
    io.load_model(path)


# -- unsafe or malformed external data ----------------------------------------------------------------------------
@pytest.mark.parametrize(("entries", "match"), [
    ([("location", "../secret.bin")], "'..'"),
    ([("location", "sub/../../secret.bin")], "'..'"),
    ([("location", "ABSOLUTE")], "absolute"),
    ([("location", "")], "empty location"),
    ([("offset", "0")], "without a location"),
    ([("location", "model.onnx.data"), ("offset", "-4")], "negative offset"),
    ([("location", "model.onnx.data"), ("length", "-512")], "negative length"),
    ([("location", "model.onnx.data"), ("offset", "1e3")], "not a non-negative integer"),
    ([("location", "model.onnx.data"), ("offset", " 4")], "not a non-negative integer"),
    ([("location", "model.onnx.data"), ("offset", "100000")], "past the end"),
    ([("location", "model.onnx.data"), ("offset", "400"), ("length", "512")], "past the end"),
    ([("location", "model.onnx.data"), ("offset", "0"), ("length", "4")], "length 4"),
    ([("location", "model.onnx.data"), ("basepath", "/etc")], "unknown external_data key 'basepath'"),
    ([("location", "model.onnx.data"), ("sneaky", "1")], "unknown external_data key 'sneaky'"),
    ([("location", "model.onnx.data"), ("location", "../secret.bin")], "repeats"),
    ([("location", "nothere.bin")], "does not exist"),
    ([("location", "sub")], "not a regular file"),
])
def test_bad_external_data(ext_model: Path, digest, entries: list[tuple[str, str]], match: str) -> None:
    (ext_model.parent / "sub").mkdir()
    if entries and entries[0] == ("location", "ABSOLUTE"):
        entries = [("location", str(ext_model.parent.parent / "secret.bin"))]
    _set_external(ext_model, "W1", entries)
    message = _refused(UnsafeModelError, _load_and_save(ext_model), ext_model.parent.parent, digest, match)
    assert "'W1'" in message and str(ext_model) in message


def test_external_data_through_a_symlinked_file(ext_model: Path, digest) -> None:
    (ext_model.parent / "link.bin").symlink_to(ext_model.parent.parent / "secret.bin")
    _set_external(ext_model, "W1", [("location", "link.bin")])
    _refused(UnsafeModelError, _load_and_save(ext_model), ext_model.parent.parent, digest, "symlinked file")


def test_external_data_through_a_symlink_inside_the_folder(ext_model: Path, digest) -> None:
    (ext_model.parent / "alias.data").symlink_to("model.onnx.data")  # stays inside, still refused
    _set_external(ext_model, "W1", [("location", "alias.data"), ("offset", "0"), ("length", "512")])
    _refused(UnsafeModelError, _load_and_save(ext_model), ext_model.parent.parent, digest, "symlinked file")


def test_external_data_through_a_symlinked_folder(ext_model: Path, digest) -> None:
    (ext_model.parent.parent / "elsewhere").mkdir()
    (ext_model.parent.parent / "elsewhere" / "w.bin").write_bytes(b"\0" * 512)
    (ext_model.parent / "weights").symlink_to(ext_model.parent.parent / "elsewhere")
    _set_external(ext_model, "W1", [("location", "weights/w.bin")])
    _refused(UnsafeModelError, _load_and_save(ext_model), ext_model.parent.parent, digest, "symlinked folder")


def test_external_data_through_a_hardlink(ext_model: Path, digest) -> None:
    os.link(ext_model.parent.parent / "secret.bin", ext_model.parent / "hard.bin")
    _set_external(ext_model, "W1", [("location", "hard.bin")])
    _refused(UnsafeModelError, _load_and_save(ext_model), ext_model.parent.parent, digest, "hard-linked")


def test_external_data_in_a_subgraph_is_checked(tmp_path: Path, write_model, digest) -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "Wb")
    onnx.external_data_helper.set_external_data(w, "../secret.bin")
    w.ClearField("raw_data")
    body = helper.make_graph([helper.make_node("MatMul", ["x", "Wb"], ["yb"])], "body", [],
                             [helper.make_tensor_value_info("yb", onnx.TensorProto.FLOAT, None)], [w])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)], "g",
                              [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    src = write_model(model, tmp_path / "m")
    _refused(UnsafeModelError, _load_and_save(src), tmp_path, digest, "'Wb'")


def test_external_data_in_a_function_is_checked(tmp_path: Path, write_model, digest) -> None:
    t = numpy_helper.from_array(np.ones(4, np.float32), "k")
    onnx.external_data_helper.set_external_data(t, "/etc/passwd")
    t.ClearField("raw_data")
    function = helper.make_function("local", "AddK", ["a"], ["b"],
                                    [helper.make_node("Constant", [], ["kk"], value=t),
                                     helper.make_node("Add", ["a", "kk"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddK", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    src = write_model(model, tmp_path / "m")
    _refused(UnsafeModelError, _load_and_save(src), tmp_path, digest, "absolute")


# -- output paths ---------------------------------------------------------------------------------------------------
def test_output_equal_to_input(ext_model: Path, digest) -> None:
    model = io.load_model(ext_model)
    _refused(UsageError, lambda: io.check_output_path(ext_model, ext_model), ext_model.parent, digest, "is the input")
    _refused(UsageError, lambda: io.save_model(model, ext_model, input_path=ext_model), ext_model.parent, digest)
    same = ext_model.parent / "." / ".." / "model" / "model.onnx"
    _refused(UsageError, lambda: io.save_model(model, same, input_path=ext_model), ext_model.parent, digest)


def test_output_equal_to_input_via_symlink(ext_model: Path, digest) -> None:
    link = ext_model.parent.parent / "link.onnx"
    link.symlink_to(ext_model)
    model = io.load_model(ext_model)
    _refused(UsageError, lambda: io.save_model(model, link, input_path=ext_model), ext_model.parent.parent, digest,
             "is the input")
    _refused(UsageError, lambda: io.save_model(model, ext_model, input_path=link), ext_model.parent.parent, digest,
             "is the input")


def test_output_equal_to_input_via_hardlink(ext_model: Path, digest) -> None:
    hard = ext_model.parent.parent / "hard.onnx"
    os.link(ext_model, hard)
    model = io.load_model(ext_model)
    _refused(UsageError, lambda: io.save_model(model, hard, input_path=ext_model), ext_model.parent.parent, digest,
             "is the input")


def test_output_over_the_inputs_external_data(ext_model: Path, digest) -> None:
    folder = ext_model.parent
    _refused(UsageError, lambda: io.check_output_path(ext_model, folder / "model.onnx.data"), folder, digest,
             "external data")
    # "x.onnx" writes its data to "x.onnx.<16 hex>.data" and removes stale files so named: an input whose data file
    # is named like that is refused for that output
    (folder / "model.onnx.data").rename(folder / "x.onnx.0123456789abcdef.data")
    proto = onnx.load(ext_model, load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "x.onnx.0123456789abcdef.data"
    onnx.save_model(proto, ext_model)
    digest_now = digest(folder)
    _refused(UsageError, lambda: io.check_output_path(ext_model, folder / "x.onnx"), folder, lambda _: digest_now,
             "named like the output's data files")


def test_output_folder_missing(ext_model: Path, digest) -> None:
    out = ext_model.parent / "no" / "such" / "out.onnx"
    _refused(UsageError, lambda: io.save_model(io.load_model(ext_model), out, input_path=ext_model),
             ext_model.parent, digest, "does not exist")


def test_output_is_a_folder(ext_model: Path, digest) -> None:
    out = ext_model.parent / "out.onnx"
    out.mkdir()
    _refused(UsageError, lambda: io.save_model(io.load_model(ext_model), out), ext_model.parent, digest, "folder")


# -- interrupted saves ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["_write_bytes", "_write_tensor"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_keyboard_interrupt_during_save_leaves_nothing(tmp_path: Path, make_mlp, write_model, digest,
                                                       monkeypatch: pytest.MonkeyPatch, writer: str,
                                                       existing: bool) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)  # external data, so both writers run
    monkeypatch.setattr(io, "EXTERNAL_MIN_TENSOR_BYTES", 0)
    src = write_model(make_mlp(), tmp_path / "in", external=True)
    model = io.load_model(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if existing:
        (out_dir / "m.onnx").write_bytes(b"previous model")
        (out_dir / "m.onnx.data").write_bytes(b"previous data")
    before_out, before_in = digest(out_dir), digest(src.parent)
    real = getattr(io_write, writer)

    def interrupted(f, payload) -> None:
        real(f, payload)  # some bytes reach the temporary file first
        raise KeyboardInterrupt

    monkeypatch.setattr(io_write, writer, interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_model(model, out_dir / "m.onnx", input_path=src)
    assert digest(out_dir) == before_out  # no temp files, no partial output, previous output untouched
    assert digest(src.parent) == before_in
    monkeypatch.setattr(io_write, writer, real)
    io.save_model(model, out_dir / "m.onnx", input_path=src)  # the model object is still intact
    names = sorted(os.listdir(out_dir))
    data = [n for n in names if re.fullmatch(r"m\.onnx\.[0-9a-f]{16}\.data", n)]
    # the model, its data, and the earlier "m.onnx.data", which is not named like this output's data files
    assert len(data) == 1 and names == sorted(["m.onnx", *data, *(["m.onnx.data"] if existing else [])])


def test_interrupt_between_renames_completes_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temps = [tmp_path / ".d.tmp", tmp_path / ".m.tmp"]
    temps[0].write_bytes(b"data")
    temps[1].write_bytes(b"model")
    calls = []
    real_replace = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(io_write.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        io_write._commit(temps, [tmp_path / "m.onnx.data", tmp_path / "m.onnx"])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").read_bytes() == b"model"
