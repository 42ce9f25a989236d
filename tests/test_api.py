"""The Python API: compile_model on a path, an onnx.ModelProto or an onnx_ir.Model, calibration as a mapping, pass
objects from the calling script, the in-memory result and its save(), one-line QCompileErrors worded for Python,
``python -m qcompiler``, ``help(qcompiler)``, ``py.typed``, and the README's example run as it is."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.api import compile_model
from qcompiler.errors import (
    CalibrationError,
    ConfigError,
    InputError,
    PluginError,
    QCompileError,
    UnsafeModelError,
    UsageError,
)
from qcompiler.pass_manager import STAGES, QPass, QPassResult

ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> onnx.ModelProto:
    """y = relu(x @ W + b) @ W2: two matmuls for the quantizers, a symbolic batch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm1"), helper.make_node("Add", ["xw", "b"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _samples(n: int = 24) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)


@pytest.fixture
def proto() -> onnx.ModelProto:
    return _mlp()


@pytest.fixture
def model_path(tmp_path: Path, proto: onnx.ModelProto) -> Path:
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(proto, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, repr(text)
    assert isinstance(exc.value, QCompileError)
    return text


class CountOps(QPass):
    """Counts operators; changes nothing."""

    name = "count-ops"
    stage = "fuse"

    def call(self, model: ir.Model) -> QPassResult:
        for node in model.graph:
            self.count(node.op_type)
        return QPassResult(model, False)


# -- model inputs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8"])
def test_path_proto_and_ir_model_give_identical_outputs(tmp_path: Path, proto: onnx.ModelProto, model_path: Path,
                                                        recipe: str) -> None:
    calib = {"x": _samples()} if recipe == "int8" else None
    outputs = {}
    for kind, given in (("path", model_path), ("proto", proto), ("ir", ir.serde.deserialize_model(proto))):
        result = compile_model(given, tmp_path / f"{kind}.onnx", recipe=recipe, calib=calib)
        outputs[kind] = (tmp_path / f"{kind}.onnx").read_bytes()
        assert result.output_path == tmp_path / f"{kind}.onnx"
        assert result.output_bytes == len(outputs[kind])
        assert result.to_bytes() == outputs[kind]  # what save() wrote
        assert result.to_proto() == onnx.load_from_string(outputs[kind])
        assert result.input_path == (model_path if kind == "path" else None)
    assert outputs["proto"] == outputs["path"]
    assert outputs["ir"] == outputs["path"]
    assert result.quantized_layers and result.metadata["qcompiler.recipe"] == recipe


def test_callers_model_objects_are_not_modified(proto: onnx.ModelProto) -> None:
    before = copy.deepcopy(proto)
    result = compile_model(proto, recipe="int8", calib={"x": _samples()})
    assert proto == before and proto.SerializeToString() == before.SerializeToString()

    model = ir.serde.deserialize_model(_mlp())
    serialized = ir.serde.serialize_model(model).SerializeToString()
    renamed = model.graph.initializers["W"].const_value
    renamed.name = "not-the-value-name"  # onnx-ir's serializer renames tensors after their value: put back
    nodes = list(model.graph)
    result = compile_model(model, recipe="int8", calib={"x": _samples()})
    assert renamed.name == "not-the-value-name"
    assert ir.serde.serialize_model(model).SerializeToString() == serialized
    assert list(model.graph) == nodes and [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    assert "qcompiler.recipe" not in model.metadata_props
    assert result.model is not model and result.metadata["qcompiler.recipe"] == "int8"


def test_in_memory_result_without_output_runs_and_saves(tmp_path: Path, proto: onnx.ModelProto,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = compile_model(proto, recipe="int8-dynamic")
    assert result.output_path is None and result.output_bytes is None and os.listdir(tmp_path) == []
    assert result.input_bytes == len(proto.SerializeToString())
    assert result.to_dict()["output"] is None and result.report.passes
    x = _samples(3)
    session = ort.InferenceSession(result.to_bytes(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert result.save("a.onnx") == Path("a.onnx") and result.output_path == Path("a.onnx")
    assert result.save(tmp_path / "b.onnx") == tmp_path / "b.onnx"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == result.to_bytes()
    assert result.output_bytes == len(result.to_bytes())


def test_save_refuses_the_input_model(tmp_path: Path, model_path: Path) -> None:
    digest = _sha(model_path)
    with pytest.raises(UsageError) as exc:
        compile_model(model_path, model_path)  # refused before compiling
    assert "is the input model" in _one_line(exc)
    result = compile_model(model_path)
    with pytest.raises(UsageError) as exc:
        result.save(model_path)
    assert "is the input model" in _one_line(exc)
    link = tmp_path / "in" / "link.onnx"
    os.link(model_path, link)  # a hard link is the same file
    with pytest.raises(UsageError):
        result.save(link)
    with pytest.raises(UsageError) as exc:
        result.save(tmp_path)  # a folder
    _one_line(exc)
    with pytest.raises(UsageError):
        result.save(42)  # type: ignore[arg-type]
    assert _sha(model_path) == digest and sorted(os.listdir(model_path.parent)) == ["link.onnx", "mlp.onnx"]


def test_in_memory_model_with_external_data_is_refused(tmp_path: Path, proto: onnx.ModelProto) -> None:
    external = copy.deepcopy(proto)
    onnx.external_data_helper.convert_model_to_external_data(external, size_threshold=0, location="w.data")
    for tensor in external.graph.initializer:
        tensor.ClearField("raw_data")
    with pytest.raises(UnsafeModelError) as exc:
        compile_model(external)
    assert "external file 'w.data'" in _one_line(exc) and "the in-memory model" in str(exc.value)

    model = ir.serde.deserialize_model(proto)
    value = model.graph.initializers["W"]
    value.const_value = ir.ExternalTensor("w.data", 0, 64 * 32 * 4, ir.DataType.FLOAT, shape=ir.Shape([64, 32]),
                                          name="W", base_dir=str(tmp_path))
    with pytest.raises(UnsafeModelError) as exc:
        compile_model(model)
    assert "give the model's file path" in _one_line(exc)


def test_in_memory_model_gets_the_load_checks(proto: onnx.ModelProto) -> None:
    bad = copy.deepcopy(proto)
    bad.graph.initializer[0].raw_data = bad.graph.initializer[0].raw_data[:-4]  # one float short
    with pytest.raises(InputError) as exc:
        compile_model(bad)
    assert _one_line(exc).startswith("the in-memory model: ") and "raw_data" in str(exc.value)
    cyclic = copy.deepcopy(proto)
    cyclic.graph.node[0].input[0] = "y"  # a value read before it is defined
    with pytest.raises(InputError) as exc:
        compile_model(cyclic)
    assert "not a valid ONNX model" in _one_line(exc)


# -- calibration as a mapping -----------------------------------------------------------------------------------
def test_calibration_mapping_gives_the_npz_output(tmp_path: Path, model_path: Path) -> None:
    samples = _samples()
    np.savez(tmp_path / "calib.npz", x=samples)
    compile_model(model_path, tmp_path / "npz.onnx", recipe="int8", calib=tmp_path / "calib.npz")
    kept = samples.copy()
    result = compile_model(model_path, tmp_path / "map.onnx", recipe="int8", calib={"x": samples})
    assert (tmp_path / "map.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()
    assert "qcompiler.calibration_sha256" in result.metadata
    np.testing.assert_array_equal(samples, kept)
    assert samples.flags.writeable  # only read-only views were handed to the passes


@pytest.mark.parametrize(("calib", "needle"), [
    ({"input": _samples()}, "missing input(s) x; unknown name(s) input"),
    ({"x": _samples(), "extra": _samples()}, "unknown name(s) extra"),
    ({"x": _samples().astype(np.float64)}, "has dtype float64, expected float32"),
    ({"x": np.where(np.arange(24 * 64).reshape(24, 64) == 130, np.nan, _samples()).astype(np.float32)},
     "sample 2 contains NaN"),
    ({"x": np.full((4, 64), np.inf, np.float32)}, "sample 0 contains Inf"),
    ({"x": _samples()[:, :32]}, "the input's dimension 1 is 64"),
    ({"x": _samples()[0]}, "rank 1"),
    ({"x": _samples()[:0]}, "holds zero samples"),
    ({"x": _samples().tolist()}, "is a list, not a numpy array"),
    ({1: _samples()}, "key 1 is not an input name"),
    ([_samples()], "calib must be a path"),
    (3.5, "calib must be a path"),
])
def test_bad_calibration_mapping_is_one_line(tmp_path: Path, proto: onnx.ModelProto, calib: object,
                                             needle: str) -> None:
    with pytest.raises(CalibrationError) as exc:
        compile_model(proto, tmp_path / "out.onnx", recipe="int8", calib=calib)
    assert needle in _one_line(exc)
    assert not (tmp_path / "out.onnx").exists() and os.listdir(tmp_path) == []


def test_calibration_mapping_of_token_ids_is_completed_for_a_decoder() -> None:
    from qcompiler.calibration.data import load_calibration_data

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "m"], ["y"])], "dec",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s"])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    data = load_calibration_data({"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4)}, model)
    batch = next(data.iter_batches(8))
    assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].tolist() == [[1] * 4] * 3


# -- pass objects from the calling script -----------------------------------------------------------------------
def test_custom_pass_object_runs_in_its_stage_and_reports(proto: onnx.ModelProto) -> None:
    result = compile_model(proto, recipe="int8", calib={"x": _samples()}, passes=[CountOps()])
    records = result.report.passes
    names = [r.name for r in records]
    at = names.index("count-ops")
    stages = [STAGES.index(r.stage) for r in records]
    assert all(s <= STAGES.index("fuse") for s in stages[:at]) and stages[at + 1] > STAGES.index("fuse")
    assert dict(records[at].stats.counters) == {"Gemm": 1, "Relu": 1, "MatMul": 1}  # after fuse-matmul-add
    assert result.to_dict()["passes"][at]["counters"] == {"Gemm": 1, "MatMul": 1, "Relu": 1}

    class AfterFold(CountOps):
        name = "count-after-fold"
        after = "fold-constants"

    class BeforeFinalize(CountOps):
        name = "count-before-finalize"
        stage = "lower"
        before = "finalize"

    result = compile_model(proto, recipe="int8-dynamic", passes=[AfterFold(), BeforeFinalize()])
    names = [r.name for r in result.report.passes]
    assert names[names.index("fold-constants") + 1] == "count-after-fold"
    assert names[names.index("finalize") - 1] == "count-before-finalize"
    counters = result.report.passes[names.index("count-before-finalize")].stats.counters
    assert counters.get("MatMul", 0) == 0 and sum(counters.values()) >= 3  # the lowered graph: no float MatMul


def test_bad_pass_objects_are_one_line_errors(proto: onnx.ModelProto) -> None:
    class Unplaced(CountOps):
        name = "unplaced"
        after = "no-such-pass"

    class NoInit(CountOps):
        name = "no-init"

        def __init__(self) -> None:  # forgets super().__init__()
            pass

    class BadStage(CountOps):
        name = "bad-stage"
        stage = "optimize"

    class Clash(CountOps):
        name = "fold-constants"

    cases = [([CountOps], UsageError, "pass an instance: CountOps()"),
             (["count-ops"], UsageError, "not a qcompiler.pass_manager.QPass instance"),
             (CountOps(), UsageError, "passes takes a list"),
             ([Unplaced()], PluginError, "asks to run after 'no-such-pass'"),
             ([NoInit()], UsageError, "call super().__init__()"),
             ([BadStage()], UsageError, "has stage 'optimize'"),
             ([Clash()], UsageError, "which the pipeline already has"),
             ([CountOps(), CountOps()], UsageError, "names must differ")]
    for passes, error, needle in cases:
        with pytest.raises(error) as exc:
            compile_model(proto, passes=passes)
        assert needle in _one_line(exc), (needle, str(exc.value))


# -- mistakes: one line, worded for Python ----------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    ({"recipe": "int4", "weight_only": {"blok_size": 32}}, ConfigError,
     "unknown weight_only option 'blok_size' in weight_only={...} (did you mean 'block_size'?"),
    ({"quantization": {"per_chanel": False}}, ConfigError, "did you mean 'per_channel'?"),
    ({"weight_only": 5}, ConfigError, "weight_only must be a mapping"),
    ({"calibration": {1: 2}}, ConfigError, "option names are strings"),
    ({"recipe": 5}, ConfigError, "recipe must be a built-in recipe name"),
    ({"recipe": "in8"}, ConfigError, "unknown recipe 'in8'"),
    ({"plugins": "fuse-attention"}, UsageError, "plugins takes a list of names, got the string"),
    ({"exclude_nodes": "mm1"}, UsageError, "exclude_nodes takes a list of names"),
    ({"seq_len": "256"}, UsageError, "seq_len must be an integer"),
    ({"recipe": "int8"}, UsageError, "recipe 'int8' needs calibration data: pass calib=..."),
    ({"recipe": "float", "calib": {"x": _samples()}}, UsageError, "calib has no effect with recipe 'float'"),
    ({"weight_only": {"block_size": 64}}, UsageError,
     "weight_only={'block_size': 64} has no effect with recipe 'int8-dynamic'"),
    ({"exclude_nodes": ["mm3"]}, UsageError, "exclude_nodes names no node of the in-memory model: 'mm3'"),
    ({"tokenizer": "tok.json"}, UsageError, "tokenizer= reads text calibration data: pass calib="),
    ({"dump_after": ["all"]}, UsageError, "dump_after needs dump_dir="),
    ({"disable": ["no-such-pass"]}, ConfigError, "cannot disable pass 'no-such-pass'"),
])
def test_api_mistakes_are_one_line_and_name_python_arguments(proto: onnx.ModelProto, kwargs: dict,
                                                             error: type, needle: str) -> None:
    with pytest.raises(error) as exc:
        compile_model(proto, **kwargs)
    text = _one_line(exc)
    assert needle in text, text
    assert not re.search(r"(?<!qcompile )--[a-z]", text), f"a command-line flag in an API message: {text}"


def test_model_and_output_types_are_checked(tmp_path: Path, proto: onnx.ModelProto) -> None:
    for model, needle in ((42, "got int"), (proto.SerializeToString(), "onnx.ModelProto.FromString"),
                          (None, "got NoneType")):
        with pytest.raises(UsageError) as exc:
            compile_model(model)  # type: ignore[arg-type]
        assert needle in _one_line(exc)
    with pytest.raises(UsageError) as exc:
        compile_model(proto, 3)  # type: ignore[arg-type]
    assert "output must be a file path" in _one_line(exc)
    with pytest.raises(InputError) as exc:
        compile_model(tmp_path / "missing.onnx")
    assert "no such file" in _one_line(exc)


def test_pass_messages_are_reworded_for_the_api(proto: onnx.ModelProto) -> None:
    """A message raised inside a pass names a flag; compile_model names the Python argument instead."""
    from qcompiler import _wording

    assert _wording.for_api("GPTQ needs calibration data: pass --calib DATA (token ids)") == \
        "GPTQ needs calibration data: pass calib=... (token ids)"
    assert _wording.for_api("needs symmetric = false (--asymmetric); see qcompile --help") == \
        "needs symmetric = false (weight_only={'symmetric': False}); see qcompile --help"
    assert _wording.for_api("--block-size 64 or --zero-point int, --target-bits measures") == \
        "weight_only={'block_size': 64} or weight_only={'zero_point': 'int'}, weight_only={'target_bits': ...} measures"
    with pytest.raises(QCompileError) as exc:
        compile_model(proto, recipe="int4", weight_only={"algorithm": "gptq"})
    text = _one_line(exc)
    assert "calib" in text and not re.search(r"(?<!qcompile )--[a-z]", text), text


def test_cli_keeps_its_flag_wording(tmp_path: Path, model_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8"]) == 2
    assert "pass --calib DATA" in capfd.readouterr().err
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--block-size", "64"]) == 2
    assert "--block-size 64 (weight_only.block_size) has no effect" in capfd.readouterr().err


# -- the package: python -m, help(), py.typed, the light runtime import -----------------------------------------
def test_python_m_qcompiler_runs_the_command(tmp_path: Path, model_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "qcompiler", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith(f"qcompile {qcompiler.__version__} ("), run
    run = subprocess.run([sys.executable, "-m", "qcompiler", str(tmp_path / "missing.onnx"), "-o",
                          str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "no such file" in run.stderr, run
    run = subprocess.run([sys.executable, "-m", "qcompiler", str(model_path), "-o", str(tmp_path / "o.onnx"), "-q"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "o.onnx").is_file(), run


def test_help_shows_compile_model_and_runtime_import_stays_light() -> None:
    import pydoc

    text = pydoc.render_doc(qcompiler, renderer=pydoc.plaintext)
    functions = text[text.index("FUNCTIONS"):]
    assert "compile_model(model" in functions and "__getattr__" not in functions
    assert qcompiler.compile_model is compile_model
    code = ("import sys, qcompiler, qcompiler.runtime\n"
            "names = dir(qcompiler)\n"
            "assert 'compile_model' in names and 'CompileResult' in names, names\n"
            "print(','.join(m for m in ('onnx', 'onnx_ir', 'torch', 'networkx', 'qcompiler.api') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""


def test_py_typed_is_shipped() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    assert (ROOT / "qcompiler" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["qcompiler"]


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = readme.index("<!-- python-api-example")
    block = re.search(r"```python\n(.*?)```", readme[marker:], re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block.group(1), "README.md:python-api-example", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "{'Gemm': 1, 'Relu': 1} {'int8-static': 1} int8" in out
    error = float(out.rsplit("largest error vs fp32:", 1)[1])
    y = namespace["y"]
    assert 0 < error < 0.05 * np.abs(y).max() and (tmp_path / "mlp.int8.onnx").is_file()
