"""User mistakes are never silently ignored (issue 12, class 9): each is an error or a one-line warning.

Through ``qcompiler.cli.main``: an error is exit code 2, one ``qcompile: error:`` line, nothing on stdout and no
file written; a warning is one ``WARNING`` line on stderr while the compile still succeeds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.cli import main

D = 32
DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


# -- models -----------------------------------------------------------------------------------------------------------
def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _mlp(path: Path) -> Path:
    """x[N, 32] -> MatMul fc1 -> Relu -> MatMul fc2 -> y[N, 32]."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 0.2, (D, D)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], initializer=inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _conv_only(path: Path) -> Path:
    """A CNN without any MatMul/Gemm: Conv -> Relu -> Conv."""
    r = np.random.default_rng(1)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, shape).astype(np.float32), n)
             for n, shape in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              initializer=inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture()
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    """The MLP and its calibration data, in a folder of their own (the output goes to ``tmp_path / "out"``)."""
    folder = tmp_path / "in"
    folder.mkdir()
    calib = folder / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).normal(0, 1, (16, D)).astype(np.float32))
    return _mlp(folder / "mlp.onnx"), calib


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder / "o.onnx"


# -- the contract -----------------------------------------------------------------------------------------------------
def _error(args: list[str], out: Path, capfd: pytest.CaptureFixture[str], *needles: str) -> str:
    """Exit 2, one error line holding every needle, nothing on stdout, nothing written."""
    code = main([*args, "-o", str(out)])
    captured = capfd.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), captured.err
    assert captured.out == ""
    assert os.listdir(out.parent) == [], "an output was written"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _warning(args: list[str], out: Path, capfd: pytest.CaptureFixture[str], *needles: str) -> str:
    """Exit 0 with the output written, and exactly one WARNING line on stderr holding every needle."""
    saved = logging.root.handlers[:]
    logging.root.handlers = []  # pytest's capture handlers step aside: the CLI logs to stderr as it does outside
    try:
        code = main([*args, "-o", str(out)])
    finally:
        logging.root.handlers = saved
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert out.is_file()
    lines = [line for line in captured.err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("WARNING "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- --exclude-node -----------------------------------------------------------------------------------------------------
def test_exclude_node_that_matches_nothing_is_an_error(mlp, out, capfd) -> None:
    model, _ = mlp
    line = _error([str(model), "--exclude-node", "fc3", "--exclude-node", "fc1"], out, capfd,
                  "--exclude-node names no node", "'fc3'")
    assert "closest: 'fc1', 'fc2'" in line or "closest: 'fc2', 'fc1'" in line
    assert "'fc1'," not in line.split("closest")[0]  # only the unmatched name is named


def test_exclude_node_reaches_weight_only_recipes(mlp, out, capfd) -> None:
    """Before, --exclude-node set only the int8 list: int4 quantized the excluded layer anyway."""
    model, _ = mlp
    assert main([str(model), "-o", str(out), "--recipe", "int4", "--exclude-node", "fc1", "-q"]) == 0
    nodes = {n.name: n.op_type for n in onnx.load(out).graph.node}
    assert nodes["fc1"] == "MatMul" and nodes["fc2"] == "MatMulNBits"


def test_op_types_absent_from_the_model_is_a_warning(mlp, out, capfd) -> None:
    model, calib = mlp
    _warning([str(model), "--recipe", "int8", "--calib", str(calib), "--op-types", "MatMul,Softmax"], out, capfd,
             "--op-types", "has no Softmax node")


# -- options the recipe's pipeline does not read ----------------------------------------------------------------------
@pytest.mark.parametrize(("recipe", "flags", "needle"), [
    ("int8-dynamic", ["--activation-dtype", "int8"], "--activation-dtype int8"),
    ("int8-dynamic", ["--calibrator", "entropy"], "--calibrator entropy"),
    ("int4", ["--calibrator", "entropy"], "--calibrator entropy"),
    ("int4", ["--percentile", "99.9"], "--percentile 99.9"),
    ("int8", ["--block-size", "64"], "--block-size 64"),
    ("int8", ["--algorithm", "hqq"], "--algorithm hqq"),
    ("int8", ["--asymmetric"], "--asymmetric"),
    ("int8", ["--lm-head", "float"], "--lm-head float"),
    ("int8", ["--embedding", "int4"], "--embedding int4"),
    ("int8", ["--accuracy-level", "2"], "--accuracy-level 2"),
    ("int8", ["--target-bits", "3"], "--target-bits 3"),
    ("int4", ["--weight-dtype", "float8e4m3fn"], "--weight-dtype float8e4m3fn"),
    ("int4", ["--per-tensor"], "--per-tensor"),
    ("int4", ["--max-accuracy-drop", "0.01"], "--max-accuracy-drop 0.01"),
    ("nf4", ["--min-sqnr", "20"], "--min-sqnr 20"),
    ("int8", ["--percentile", "99.9"], "applies to --calibrator percentile"),
    ("float", ["--exclude-node", "fc1"], "--exclude-node fc1"),
])
def test_an_option_the_recipe_does_not_use_is_an_error(mlp, out, capfd, recipe, flags, needle) -> None:
    model, calib = mlp
    calib_args = ["--calib", str(calib)] if recipe == "int8" else []
    _error([str(model), "--recipe", recipe, *calib_args, *flags], out, capfd, needle, "has no effect", recipe)


@pytest.mark.parametrize(("recipe", "flags", "needle"), [
    ("int8-dynamic", ["--activation-dtype", "uint8"], "--activation-dtype uint8"),  # restates the recipe's value
    ("int8", ["--symmetric"], "--symmetric"),
    ("int4", ["--calib-cache", "cache"], "--calib-cache"),  # resources only
    ("int4", ["--zero-point", "int"], "symmetric weights have no zero point"),
])
def test_an_unused_option_that_changes_nothing_is_a_warning(mlp, out, capfd, monkeypatch, recipe, flags,
                                                            needle) -> None:
    model, calib = mlp
    monkeypatch.chdir(out.parent.parent)
    calib_args = ["--calib", str(calib)] if recipe == "int8" else []
    _warning([str(model), "--recipe", recipe, *calib_args, *flags], out, capfd, needle, "has no effect")
    assert not (out.parent.parent / "cache").exists()


def test_calib_with_a_recipe_that_takes_no_data_is_an_error(mlp, out, capfd) -> None:
    model, calib = mlp
    _error([str(model), "--recipe", "float", "--calib", str(calib)], out, capfd,
           "--calib has no effect with recipe 'float'", "takes calibration data")


def test_calib_that_no_pass_read_is_a_warning(mlp, out, capfd) -> None:
    """NF4 with RTN takes data only for AWQ/--target-bits (no grid to weigh; an int8 lm_head's would be): the data is
    unused, and not named in the output."""
    model, calib = mlp
    _warning([str(model), "--recipe", "nf4", "--lm-head", "same", "--calib", str(calib)], out, capfd,
             "--calib data was not used")
    metadata = {p.key for p in onnx.load(out).metadata_props}
    assert "qcompiler.recipe" in metadata and "qcompiler.calibration_sha256" not in metadata


def test_api_unknown_override_is_a_config_error(mlp, out) -> None:
    from qcompiler.api import compile_model
    from qcompiler.errors import ConfigError

    model, _ = mlp
    with pytest.raises(ConfigError, match="unknown quantization option 'activation_type'"):
        compile_model(model, out, quantization={"activation_type": "int8"})


# -- already quantized ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second", "needle"), [
    ("int8", "int8-dynamic", "QuantizeLinear"),
    ("int4", "int4", "MatMulNBits"),
    ("int8-dynamic", "nf4", "DynamicQuantizeLinear"),
])
def test_an_already_quantized_model_is_refused(mlp, tmp_path, out, capfd, first, second, needle) -> None:
    model, calib = mlp
    quantized = tmp_path / "in" / "q.onnx"
    calib_args = ["--calib", str(calib)] if first == "int8" else []
    assert main([str(model), "-o", str(quantized), "--recipe", first, *calib_args, "-q"]) == 0
    capfd.readouterr()
    _error([str(quantized), "--recipe", second], out, capfd, "already quantized", needle, "compile the float model",
           f"qcompiler recipe {first}")


def test_float_recipe_may_clean_up_a_quantized_model(mlp, tmp_path, out, capfd) -> None:
    model, calib = mlp
    quantized = tmp_path / "in" / "q.onnx"
    assert main([str(model), "-o", str(quantized), "--recipe", "int8", "--calib", str(calib), "-q"]) == 0
    assert main([str(quantized), "-o", str(out), "--recipe", "float", "-q"]) == 0
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2  # kept, not folded away


def test_a_hand_built_qoperator_model_is_refused(tmp_path, out, capfd) -> None:
    """Not only qcompiler's outputs: any QLinear* op marks a quantized model."""
    i8 = numpy_helper.from_array
    inits = [i8(np.ones((D, D), np.int8), "w"), i8(np.float32(0.1), "s"), i8(np.uint8(128), "z"),
             i8(np.int8(0), "wz")]
    node = helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "wz", "s", "z"], ["y"], name="qmm")
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", D])], initializer=inits)
    model = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "qop.onnx")
    _error([str(model)], out, capfd, "already quantized", "1 QLinearMatMul")


# -- a recipe that quantizes nothing ----------------------------------------------------------------------------------
def test_a_recipe_that_quantizes_no_layer_warns_and_writes_the_float_model(tmp_path, out, capfd) -> None:
    """A valid model is compiled even when the recipe finds nothing to quantize, and the user is told why."""
    model = _conv_only(tmp_path / "conv.onnx")
    _warning([str(model), "--recipe", "nf4"], out, capfd, "recipe 'nf4' quantized no layer of this model",
             "Conv", "Relu", "float model")
    assert not {n.op_type for n in onnx.load(out).graph.node} & {"MatMulNBits", "MatMulBnb4", "DequantizeLinear"}


def test_every_layer_skipped_names_the_reasons(tmp_path, out, capfd) -> None:
    model = _conv_only(tmp_path / "conv.onnx")
    _warning([str(model), "--op-types", "Conv"], out, capfd, "recipe 'int8-dynamic' quantized no layer",
             "Conv has no dynamic int8 kernel", "(2 nodes)")


def test_nf4_quantizes_a_gemm_with_bias_and_the_count_is_true(out, capfd) -> None:
    """nf4 on the digits CNN used to skip its biased Gemm (MatMulBnb4 has no bias input), quantize only the
    classifier (lm_head int8) and write a larger file. Now the Gemm is MatMulBnb4 + Add, the file shrinks, and the
    printed count names the schemes of exactly the quantized ops."""
    local = out.parent / "digits.onnx"
    shutil.copy(DIGITS, local)
    target = out.parent / "d.nf4.onnx"
    assert main([str(local), "-o", str(target), "--recipe", "nf4"]) == 0
    printed = capfd.readouterr().out
    assert "2 layer(s) quantized (1 nf4-weight-only, 1 int8-weight-only)" in printed
    ops = [n.op_type for n in onnx.load(target).graph.node]
    assert ops.count("MatMulBnb4") == 1 and ops.count("MatMulNBits") == 1 and "Gemm" not in ops
    assert target.stat().st_size < 0.5 * local.stat().st_size
    x = np.load(DIGITS.parent / "digits.npz")["test_x"][:64]
    ref = ort.InferenceSession(str(local), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.95
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
