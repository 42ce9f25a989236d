"""Recipes: built-in TOML files, file recipes with ``extends``, validation errors that name the key, and CLI flags
overriding the recipe."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from _cli import one_error_line as _one_error_line
from _cli import run_main as _main
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import (
    CalibrationOptions,
    QuantizationOptions,
    Recipe,
    builtin_recipe_names,
    load_recipe,
    override,
    recipe_from_dict,
)
from qcompiler.errors import ConfigError
from qcompiler.passes.algorithms import ALGORITHM_SLOT


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path






@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small conv net (Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> MatMul) and its calibration .npz."""
    folder = tmp_path_factory.mktemp("recipes")
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", r.normal(0, 0.3, (8, 3, 3, 3))), ("b1", r.normal(0, 0.1, (8,))),
        ("w2", r.normal(0, 0.2, (16, 8, 3, 3))), ("b2", r.normal(0, 0.1, (16,))),
        ("wf", r.normal(0, 0.2, (16, 10)))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wf"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "cnn.onnx"
    onnx.save(model, path)
    calib = folder / "calib.npz"
    np.savez(calib, x=r.normal(0, 1, (12, 3, 8, 8)).astype(np.float32))
    return path, calib


# -- built-in recipes -------------------------------------------------------------------------------------------------
def test_builtin_recipes_load() -> None:
    from qcompiler.plugins import discover_passes

    names = builtin_recipe_names()
    assert {"float", "int8", "int8-dynamic"} <= set(names)
    registered = discover_passes()
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.description
        assert recipe.passes and len(set(recipe.passes)) == len(recipe.passes)
        unknown = [p for p in recipe.passes if p not in registered and p != ALGORITHM_SLOT]
        assert not unknown, f"recipe {name} names unregistered passes {unknown}"
    assert load_recipe("int8").needs_calibration
    assert not load_recipe("int8-dynamic").needs_calibration
    assert load_recipe("int8-dynamic").quantization.op_types == ("MatMul", "Gemm")
    assert not any(p.startswith(("annotate", "lower", "calibrate")) for p in load_recipe("float").passes)


def test_builtin_recipes_build(cnn: tuple[Path, Path]) -> None:
    """Every built-in recipe resolves to importable, valid pass classes in its declared order."""
    from qcompiler.pass_manager import STAGES
    from qcompiler.passes.algorithms import algorithm_pass
    from qcompiler.pipelines import resolve_pass_classes

    for name in builtin_recipe_names():
        recipe = load_recipe(name)
        classes = resolve_pass_classes(recipe)
        algorithm = algorithm_pass(recipe.weight_only.algorithm).name
        expected = [algorithm if p == ALGORITHM_SLOT else p for p in recipe.passes
                    if p != "select-weight-bits" or recipe.weight_only.target_bits is not None]
        assert [c.name for c in classes] == expected
        ranks = [STAGES.index(c.stage) for c in classes]
        assert ranks == sorted(ranks), f"recipe {name}: stages out of order: {[c.stage for c in classes]}"


# -- file recipes -----------------------------------------------------------------------------------------------------
def test_file_recipe_with_everything(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.toml", """
        extends = "int8"
        description = "my static recipe"
        passes = ["infer-shapes", "fold-constants", "annotate-int8", "calibrate", "lower-int8-qdq", "finalize"]
        disable = ["fold-constants"]
        plugins = ["some-plugin"]

        [quantization]
        activation_dtype = "int8"
        per_channel = false
        op_types = ["Conv"]
        exclude_nodes = ["conv1"]

        [calibration]
        max_samples = 8
        batch_size = 4

        [pass-options.fold-constants]
        size_limit_mb = 2
    """)
    recipe = load_recipe(path)
    assert recipe.name == "int8"  # inherited; the file gives none
    assert recipe.description == "my static recipe"
    assert recipe.passes[0] == "infer-shapes" and len(recipe.passes) == 6
    assert recipe.disable == ("fold-constants",)
    assert recipe.plugins == ("some-plugin",)
    assert recipe.needs_calibration  # inherited from int8
    assert recipe.quantization == QuantizationOptions(activation_dtype="int8", per_channel=False, op_types=("Conv",),
                                                      exclude_nodes=("conv1",))
    assert recipe.calibration == CalibrationOptions(max_samples=8, batch_size=4)
    assert recipe.options_for("fold-constants") == {"size_limit_mb": 2}
    assert recipe.options_for("finalize") == {}
    with pytest.raises(TypeError):
        recipe.pass_options["x"] = {}  # type: ignore[index]
    assert json.loads(json.dumps(recipe.to_dict()))["pass-options"] == {"fold-constants": {"size_limit_mb": 2}}


def test_extends_keeps_base_sections_and_merges_pass_options(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.toml", """
        name = "base"
        passes = ["infer-shapes", "finalize"]
        [quantization]
        activation_dtype = "int8"
        [pass-options.infer-shapes]
        a = 1
        b = 2
    """)
    child = _write(tmp_path / "child.toml", f"""
        extends = "{base.as_posix()}"
        name = "child"
        [quantization]
        per_channel = false
        [pass-options.infer-shapes]
        b = 3
    """)
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.passes == ("infer-shapes", "finalize")
    assert recipe.quantization.activation_dtype == "int8" and recipe.quantization.per_channel is False
    assert recipe.options_for("infer-shapes") == {"a": 1, "b": 3}


def test_relative_extends_is_relative_to_the_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    _write(folder / "base.toml", 'name = "base"\npasses = ["infer-shapes"]\n')
    child = _write(folder / "child.toml", 'extends = "base.toml"\nname = "child"\n')
    monkeypatch.chdir(tmp_path)
    assert load_recipe(child).passes == ("infer-shapes",)


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    _write(a, f'extends = "{b.as_posix()}"\n')
    _write(b, f'extends = "{a.as_posix()}"\n')
    with pytest.raises(ConfigError, match="too deep"):
        load_recipe(a)


# -- validation: each error names the key -----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "needle"), [
    ('passes = ["finalize"]\nturbo = true\n', "unknown recipe key 'turbo'"),
    ('extends = "int8"\n[quantization]\nbits = 4\n', "unknown recipe key 'quantization.bits'"),
    ('extends = "int8"\n[calibration]\nmethod = "entropy"\n', "unknown recipe key 'calibration.method'"),
    ('extends = "int8"\n[quantization]\nactivation_dtype = "int4"\n', "quantization.activation_dtype"),
    ('extends = "int8"\n[quantization]\nweight_dtype = "fp8"\n', "quantization.weight_dtype"),
    ('extends = "int8"\n[quantization]\nper_channel = "yes"\n', "quantization.per_channel"),
    ('extends = "int8"\n[quantization]\nop_types = ["Relu"]\n', "quantization.op_types"),
    ('extends = "int8"\n[quantization]\nop_types = [1, 2]\n', "quantization.op_types"),
    ('extends = "int8"\n[calibration]\nmax_samples = 0\n', "calibration.max_samples"),
    ('extends = "int8"\n[calibration]\nmax_samples = 2.5\n', "calibration.max_samples"),
    ('extends = "int8"\n[calibration]\nbatch_size = -1\n', "calibration.batch_size"),
    ('extends = "int8"\n[calibration]\nbatch_size = true\n', "calibration.batch_size"),
    ('extends = "int8"\n[calibration]\ncalibrator = "magic"\n', "calibration.calibrator"),
    ('extends = "int8"\nquantization = 3\n', "[quantization] must be a table"),
    ('passes = "finalize"\n', "'passes' must be a list of strings"),
    ('passes = ["finalize", 3]\n', "'passes' must be a list of strings"),
    ('extends = "int8"\ndisable = "calibrate"\n', "'disable' must be a list of strings"),
    ('extends = "int8"\nplugins = [true]\n', "'plugins' must be a list of strings"),
    ('extends = "int8"\nneeds_calibration = "no"\n', "needs_calibration"),
    ('extends = "int8"\nname = ""\n', "'name' must be a non-empty string"),
    ('name = "x"\n', "has no 'passes' list"),
    ('extends = "no-such-recipe"\n', "unknown recipe 'no-such-recipe'"),
    ('extends = "int8"\n"pass-options" = 1\n', "[pass-options] must be a table"),
    ('extends = "int8"\n[pass-options]\nfinalize = 1\n', "[pass-options.finalize] must be a table"),
    ('passes = ["finalize"\n', "is not valid TOML"),
])
def test_invalid_recipe_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_max_samples_rejects_a_boolean() -> None:
    with pytest.raises(ConfigError, match="calibration.max_samples"):
        recipe_from_dict({"extends": "int8", "calibration": {"max_samples": True}})


def test_list_keys_reject_a_string() -> None:
    with pytest.raises(ConfigError, match="quantization.exclude_nodes"):
        recipe_from_dict({"extends": "int8", "quantization": {"exclude_nodes": "conv1"}})


def test_unknown_recipe_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'int5'"):
        load_recipe("int5")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path)  # a folder
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(bad)


def test_recipe_from_dict_and_override() -> None:
    recipe = recipe_from_dict({"name": "r", "passes": ["infer-shapes", "finalize"], "plugins": ["p1"]})
    assert isinstance(recipe, Recipe) and recipe.quantization == QuantizationOptions()
    changed = override(recipe, plugins=("p1", "p2"), disable=("finalize",), quantization={"per_channel": False},
                       calibration={"max_samples": 3})
    assert changed.plugins == ("p1", "p2")
    assert changed.disable == ("finalize",)
    assert changed.quantization.per_channel is False and changed.calibration.max_samples == 3
    assert recipe.quantization.per_channel is True  # frozen: the original is untouched
    with pytest.raises(ConfigError, match="calibration.max_samples"):
        override(recipe, calibration={"max_samples": -1})


# -- through the CLI --------------------------------------------------------------------------------------------------
def test_cli_flags_override_the_recipe(cnn: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, calib = cnn
    recipe = _write(tmp_path / "r.toml", """
        extends = "int8"
        name = "mine"
        [calibration]
        max_samples = 10
        [quantization]
        activation_dtype = "uint8"
    """)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _main([str(model), "-o", str(out), "--recipe", str(recipe), "--calib", str(calib),
                          "--calib-samples", "4", "--calib-batch-size", "2", "--per-tensor", "--activation-dtype",
                          "int8", "--op-types", "Conv", "--exclude-node", "conv2", "--report", str(report), "-q"],
                         capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["recipe"]["name"] == "mine"
    assert data["recipe"]["calibration"]["max_samples"] == 4
    assert data["recipe"]["calibration"]["batch_size"] == 2
    q = data["recipe"]["quantization"]
    assert q["per_channel"] is False and q["activation_dtype"] == "int8"
    assert q["op_types"] == ["Conv"] and q["exclude_nodes"] == ["conv2"]
    # the overrides took effect: only conv1 is quantized, with one weight scale, int8 activations
    proto = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    inits.update(consts)
    convs = {n.name: n for n in proto.graph.node if n.op_type in ("Conv", "QLinearConv", "ConvInteger")}
    assert {n.op_type for n in proto.graph.node} & {"QuantizeLinear", "QLinearConv", "DequantizeLinear"}
    assert "MatMulInteger" not in {n.op_type for n in proto.graph.node}
    dq_scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert dq_scales and all(s.size == 1 for s in dq_scales), [s.shape for s in dq_scales]
    zero_points = [inits[n.input[2]] for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 for z in zero_points), zero_points  # activations: int8
    assert convs  # both convolutions are still there, one of them in float


@pytest.mark.parametrize(("flags", "needle"), [
    (["--disable-pass", "no-such-pass"], "cannot disable pass 'no-such-pass'"),
    (["--recipe", "int8-dynamic", "--disable-pass", "calibrate"], "cannot disable pass 'calibrate'"),
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["--recipe", "missing.toml"], "recipe file not found"),
    (["--calib-samples", "0"], "calibration.max_samples"),
    (["--calib-batch-size", "-3"], "calibration.batch_size"),
    (["--op-types", "Conv,Relu"], "quantization.op_types"),
    (["--activation-dtype", "int4"], "invalid choice"),
    (["--calib-samples", "many"], "invalid int value"),
    (["--recipe", "int8"], "needs calibration data"),
    (["--report", "r.txt"], "must end in .json, .md or .png"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_cli_recipe_errors(cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch, flags: list[str], needle: str) -> None:
    model, _ = cnn
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(model), "-o", str(out), *flags], capsys)
    assert code == 2
    assert needle in _one_error_line(err)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_pass_option(cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = cnn
    recipe = _write(tmp_path / "r.toml", """
        extends = "float"
        [pass-options.fuse-conv-bn]
        no_such_option = 1
    """)
    code, _, err = _main([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)], capsys)
    assert code == 2
    assert "unknown option 'no_such_option' for pass 'fuse-conv-bn'" in _one_error_line(err)
    recipe = _write(tmp_path / "r2.toml", """
        extends = "float"
        [pass-options.lower-int8-qdq]
        x = 1
    """)
    code, _, err = _main([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)], capsys)
    assert code == 2
    assert "[pass-options.lower-int8-qdq] names a pass that is not in the pipeline" in _one_error_line(err)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_recipe_disable_and_list(cnn: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = cnn
    recipe = _write(tmp_path / "r.toml", 'extends = "float"\ndisable = ["fuse-conv-activation"]\n')
    report = tmp_path / "r.json"
    code, _, err = _main([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe),
                          "--disable-pass", "fuse-matmul-add", "--report", str(report), "-q"], capsys)
    assert code == 0, err
    names = [p["name"] for p in json.loads(report.read_text())["passes"]]
    assert names == [p for p in load_recipe("float").passes if p not in ("fuse-conv-activation", "fuse-matmul-add")]
    code, out, _ = _main(["--list-recipes"], capsys)
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} == set(builtin_recipe_names())


# -- hostile recipe files (issue 12, class 10) --------------------------------------------------------------------------
def _refused(args: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> str:
    code, out, err = _main(args, capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert needle in line, line
    return line


@pytest.mark.parametrize(("text", "needle"), [
    ('extends = "int8"\n[calibration]\ncache_dir = "planted"\n',
     "sets calibration.cache_dir; write locations come only from the command line (--calib-cache)"),
    ('extends = "int8"\n[pass-options.calibrate]\ncache_dir = "planted"\n', "sets pass-options.calibrate.cache_dir"),
    ('extends = "int8"\n[pass-options.my-plugin]\ndump_path = "planted"\n', "sets pass-options.my-plugin.dump_path"),
])
def test_a_recipe_cannot_choose_where_to_write(cnn: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                text: str, needle: str) -> None:
    model, calib = cnn
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path / "downloaded.toml", text)
    out = tmp_path / "o.onnx"
    _refused([str(model), "-o", str(out), "--recipe", str(recipe), "--calib", str(calib)], capsys, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded.toml"]  # no output, no planted folder
    # the command line still may: the same cache folder through --calib-cache
    args = [str(model), "-o", str(out), "--recipe", "int8", "--calib", str(calib), "--calib-cache", "mine", "-q"]
    assert _main(args, capsys)[0] == 0 and list((tmp_path / "mine").glob("calib-*.npz"))


@pytest.mark.parametrize("text", [
    "a = " + "[" * 100_000 + "]" * 100_000,                # tomllib: RecursionError (exit 1 before)
    "a = " + "{b = " * 100_000 + "1" + "}" * 100_000,     # the same through inline tables
    "a" + ".a" * 100_000 + " = 1",                         # tomllib: memory quadratic in the parts (OOM before)
    "[" + "t." * 100_000 + "t]",                           # the same in a table header
    "a = " + "[" * 33 + "]" * 33,                          # just past the limit
])
def test_deeply_nested_toml_is_refused_before_parsing(cnn: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], text: str) -> None:
    model, _ = cnn
    recipe = tmp_path / "deep.toml"
    recipe.write_text(text)
    line = _refused([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)], capsys, "recipe ")
    assert "deeper than 32 levels" in line or "dotted key of more than 32 parts" in line
    assert not (tmp_path / "o.onnx").exists()


def test_nesting_within_the_limit_and_brackets_in_strings_still_parse(tmp_path: Path) -> None:
    from qcompiler.config import _check_toml_shape, tomllib

    text = ('a = ' + '[' * 31 + ']' * 31 + '\nb = "[[[[{{{{"\nc = \'\'\'\n[[[[\n\'\'\'\n# [[[[[[[[[[\n'
            'd = """ \\""" [[[ """\ne = [1.5, 2.5, {x.y.z = 1}]\nf = 1979-05-27T07:32:00.999\n')
    _check_toml_shape(text, "ok")
    assert tomllib.loads(text)["e"][2] == {"x": {"y": {"z": 1}}}
    deep = {"pass-options": {"x": {"k": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}}
    with pytest.raises(ConfigError, match="deeper than 32 levels"):
        recipe_from_dict(deep)


def test_a_huge_recipe_is_refused(cnn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = cnn
    recipe = tmp_path / "huge.toml"
    recipe.write_text('extends = "int8"\n' + "# padding\n" * 200_000)
    _refused([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)], capsys,
             "more than a recipe's limit of 1048576 bytes")


@pytest.mark.timeout(20)
def test_a_fifo_named_as_a_recipe_fails_at_once(cnn: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = cnn
    fifo = tmp_path / "r.toml"
    os.mkfifo(fifo)
    _refused([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(fifo)], capsys, "FIFO")
    child = _write(tmp_path / "child.toml", f'extends = "{fifo.as_posix()}"\n')
    _refused([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", str(child)], capsys, "FIFO")
