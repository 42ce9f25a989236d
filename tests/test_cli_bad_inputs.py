"""Bad inputs through the ``qcompile`` command, one test each.

Every case must end the same way: exit code 2, exactly one line on stderr starting ``qcompile: error:``, no
traceback, nothing on stdout, the input files' bytes unchanged (sha256 before and after), and no output file nor
temporary file left in the output folder.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

D = 16  # MLP width: tiny models keep each case fast


# -- helpers --------------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _expect_rejected(args: list[str], out: Path, watched: list[Path], capfd: pytest.CaptureFixture[str],
                     needle: str | None = None) -> str:
    """Run ``main(args)`` and check the contract of a rejected input; return the error line."""
    from qcompiler.cli import main

    watched = [p for p in watched if p.is_file()]
    hashes = {p: _sha(p) for p in watched}
    folders = {p.parent for p in watched} | {out.parent}
    listings = {f: _listing(f) for f in folders}
    out_existed = out.exists() or out.is_symlink()
    code = main(args)
    captured = capfd.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert lines[0].startswith("qcompile: error:"), lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    for path, digest in hashes.items():
        assert _sha(path) == digest, f"{path} was modified"
    assert out_existed or not (out.exists() or out.is_symlink()), f"{out} was written"
    for folder, listing in listings.items():
        assert _listing(folder) == listing, f"files left behind in {folder}"
    if needle is not None:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _mlp_proto(w1: TensorProto | None = None, seed: int = 1) -> onnx.ModelProto:
    r = np.random.default_rng(seed)
    w2 = numpy_helper.from_array(r.normal(0, 0.1, (4 * D, D)).astype(np.float32), "w2")
    if w1 is None:
        w1 = numpy_helper.from_array(r.normal(0, 0.1, (D, 4 * D)).astype(np.float32), "w1")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], initializer=[w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _external_w1(location: str, offset: int = 0, length: int | None = None) -> TensorProto:
    tensor = TensorProto()
    tensor.name = "w1"
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend([D, 4 * D])
    tensor.data_location = TensorProto.EXTERNAL
    nbytes = D * 4 * D * 4
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length or nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _weights_bytes() -> bytes:
    return np.random.default_rng(7).normal(0, 0.1, (D, 4 * D)).astype(np.float32).tobytes()


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """tmp/secret.bin (outside the model's folder), tmp/m/ (the model's folder), tmp/out/ (the output folder)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "out").mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(_weights_bytes())
    return {"root": tmp_path, "m": tmp_path / "m", "out": tmp_path / "out", "secret": secret,
            "output": tmp_path / "out" / "o.onnx"}


@pytest.fixture
def good_model(layout: dict[str, Path]) -> Path:
    path = layout["m"] / "mlp.onnx"
    onnx.save(_mlp_proto(), path)
    return path


@pytest.fixture
def cnn(layout: dict[str, Path]) -> Path:
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(r.normal(0, 0.1, (4,)).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = layout["m"] / "cnn.onnx"
    onnx.save(model, path)
    return path


def _calib_args(model: Path, calib: Path, out: Path) -> list[str]:
    return [str(model), "-o", str(out), "--recipe", "int8", "--calib", str(calib)]


# -- the input model --------------------------------------------------------------------------------------------------
def test_missing_file(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    missing = layout["m"] / "nope.onnx"
    _expect_rejected([str(missing), "-o", str(layout["output"])], layout["output"], [], capfd, "nope.onnx")


def test_folder_as_model(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    _expect_rejected([str(layout["m"]), "-o", str(layout["output"])], layout["output"], [], capfd, "folder")


def test_not_onnx(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = layout["m"] / "notes.onnx"
    path.write_text("this is not a model\n" * 10, encoding="utf-8")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path], capfd)


def test_random_bytes(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = layout["m"] / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path], capfd)


def test_empty_file(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = layout["m"] / "empty.onnx"
    path.write_bytes(b"")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path], capfd, "empty")


def test_truncated_model(layout: dict[str, Path], good_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = good_model.read_bytes()
    path = layout["m"] / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path], capfd)


def test_good_model_control(layout: dict[str, Path], good_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The fixtures themselves are fine: the same layout compiles."""
    from qcompiler.cli import main

    assert main([str(good_model), "-o", str(layout["output"]), "-q"]) == 0
    assert capfd.readouterr().err == ""
    assert _listing(layout["out"]) == ["o.onnx"]


# -- external data ----------------------------------------------------------------------------------------------------
def _save_external(layout: dict[str, Path], location: str, **kwargs: int) -> Path:
    path = layout["m"] / "evil.onnx"
    onnx.save(_mlp_proto(_external_w1(location, **kwargs)), path)
    return path


def test_external_data_good_control(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    (layout["m"] / "w.bin").write_bytes(_weights_bytes())
    path = _save_external(layout, "w.bin")
    before = _sha(layout["m"] / "w.bin")
    assert main([str(path), "-o", str(layout["output"]), "-q"]) == 0, capfd.readouterr().err
    assert _sha(layout["m"] / "w.bin") == before


def test_external_data_parent_traversal(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = _save_external(layout, "../secret.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, layout["secret"]], capfd,
                     "external data")


def test_external_data_nested_traversal(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    (layout["m"] / "sub").mkdir()
    path = _save_external(layout, "sub/../../secret.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, layout["secret"]], capfd,
                     "external data")


def test_external_data_absolute_path(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = _save_external(layout, str(layout["secret"].resolve()))
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, layout["secret"]], capfd,
                     "external data")


def test_external_data_symlink(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    link = layout["m"] / "w.bin"
    try:
        link.symlink_to(layout["secret"])
    except OSError:
        pytest.skip("symlinks are not available here")
    path = _save_external(layout, "w.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, layout["secret"]], capfd,
                     "external data")


def test_external_data_symlinked_folder(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    elsewhere = layout["root"] / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(layout["secret"], elsewhere / "w.bin")
    try:
        (layout["m"] / "data").symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("symlinks are not available here")
    path = _save_external(layout, "data/w.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, elsewhere / "w.bin"], capfd,
                     "external data")


def test_external_data_hardlink(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    link = layout["m"] / "w.bin"
    try:
        os.link(layout["secret"], link)
    except OSError:
        pytest.skip("hard links are not available here")
    path = _save_external(layout, "w.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, layout["secret"]], capfd,
                     "external data")


def test_external_data_offset_past_end(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    data = layout["m"] / "w.bin"
    data.write_bytes(_weights_bytes())
    path = _save_external(layout, "w.bin", offset=data.stat().st_size + 64)
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, data], capfd,
                     "external data")


def test_external_data_length_past_end(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    data = layout["m"] / "w.bin"
    data.write_bytes(_weights_bytes()[:1000])  # shorter than the tensor
    path = _save_external(layout, "w.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path, data], capfd,
                     "external data")


def test_external_data_missing_file(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    path = _save_external(layout, "gone.bin")
    _expect_rejected([str(path), "-o", str(layout["output"])], layout["output"], [path], capfd, "gone.bin")


def test_external_data_traversal_console_script(layout: dict[str, Path]) -> None:
    """The real process: exit 2, one line, no output, the secret untouched."""
    exe = Path(sysconfig.get_path("scripts")) / "qcompile"
    command = [str(exe)] if exe.exists() else [shutil.which("qcompile") or pytest.skip("no qcompile script")]
    path = _save_external(layout, "../secret.bin")
    before = _sha(layout["secret"])
    proc = subprocess.run([*command, str(path), "-o", str(layout["output"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:") and "Traceback" not in proc.stderr
    assert _sha(layout["secret"]) == before
    assert _listing(layout["out"]) == []


# -- the output path --------------------------------------------------------------------------------------------------
def test_output_equal_to_input(good_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _expect_rejected([str(good_model), "-o", str(good_model)], good_model, [good_model], capfd, "input")


def test_output_equal_to_input_other_spelling(layout: dict[str, Path], good_model: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    spelled = layout["m"] / ".." / "m" / "." / good_model.name
    _expect_rejected([str(good_model), "-o", str(spelled)], good_model, [good_model], capfd, "input")


def test_output_is_a_symlink_to_input(layout: dict[str, Path], good_model: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    link = layout["out"] / "o.onnx"
    try:
        link.symlink_to(good_model)
    except OSError:
        pytest.skip("symlinks are not available here")
    _expect_rejected([str(good_model), "-o", str(link)], link, [good_model], capfd, "input")
    assert link.is_symlink()


def test_output_is_a_hardlink_to_input(layout: dict[str, Path], good_model: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    link = layout["out"] / "o.onnx"
    try:
        os.link(good_model, link)
    except OSError:
        pytest.skip("hard links are not available here")
    _expect_rejected([str(good_model), "-o", str(link)], link, [good_model, link], capfd, "input")


def test_output_overwrites_input_external_data(layout: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    data = layout["m"] / "w.bin"
    data.write_bytes(_weights_bytes())
    path = _save_external(layout, "w.bin")
    _expect_rejected([str(path), "-o", str(data)], data, [path, data], capfd)


def test_output_folder_missing(layout: dict[str, Path], good_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = layout["root"] / "no" / "such" / "o.onnx"
    _expect_rejected([str(good_model), "-o", str(out)], out, [good_model], capfd, "does not exist")
    assert not (layout["root"] / "no").exists()


def test_output_is_a_folder(layout: dict[str, Path], good_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _expect_rejected([str(good_model), "-o", str(layout["out"])], layout["out"] / "o.onnx", [good_model], capfd,
                     "folder")


# -- calibration data -------------------------------------------------------------------------------------------------
def _samples(n: int = 4, shape: tuple[int, ...] = (3, 8, 8), dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(2).normal(0, 1, (n, *shape)).astype(dtype)


def test_calib_control(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples())
    assert main([*_calib_args(cnn, calib, layout["output"]), "-q"]) == 0, capfd.readouterr().err


def test_calib_wrong_names(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, image=_samples())
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "image")


def test_calib_extra_name(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(), mask=_samples())
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "mask")


def test_calib_wrong_shape(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(shape=(3, 9, 9)))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "shape")


def test_calib_wrong_rank(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(shape=(3, 8)))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "rank")


def test_calib_wrong_dtype(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(dtype=np.float64))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "dtype")


def test_calib_integer_dtype(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(dtype=np.int64))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "int64")


def test_calib_nan(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = _samples()
    data[2, 1, 3, 3] = np.nan
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=data)
    line = _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "nan")
    assert "sample 2" in line


def test_calib_inf(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = _samples()
    data[0, 0, 0, 0] = -np.inf
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=data)
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "inf")


def test_calib_pickled_npy(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str],
                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    calib = layout["m"] / "calib.npy"
    payload = np.empty(1, dtype=object)
    payload[0] = _Exploit(str(marker))
    np.save(calib, payload, allow_pickle=True)
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "pickle")
    assert not marker.exists(), "the pickle was loaded"


def test_calib_pickled_npz(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str],
                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _Exploit(str(marker))
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=payload)
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd, "pickle")
    assert not marker.exists(), "the pickle was loaded"


def test_calib_raw_pickle_file(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    calib = layout["m"] / "calib.npy"
    calib.write_bytes(pickle.dumps(_Exploit(str(marker))))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd)
    assert not marker.exists(), "the pickle was loaded"


def test_calib_missing(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "none.npz"
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn], capfd, "none.npz")


def test_calib_not_an_archive(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    calib.write_text("x,y\n1,2\n", encoding="utf-8")
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd)


def test_calib_zero_samples(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calib = layout["m"] / "calib.npz"
    np.savez(calib, x=_samples(n=0))
    _expect_rejected(_calib_args(cnn, calib, layout["output"]), layout["output"], [cnn, calib], capfd)


def test_calib_empty_folder(layout: dict[str, Path], cnn: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = layout["m"] / "calib"
    folder.mkdir()
    _expect_rejected(_calib_args(cnn, folder, layout["output"]), layout["output"], [cnn], capfd)


class _Exploit:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
