"""The ``qcompile`` command end to end: help and version, output levels, reports, dumps, disabled passes, the
verifier, the int8 recipes against fp32 in ONNX Runtime, determinism, and internal errors.

Most runs call :func:`qcompiler.cli.main` in process (fast); a few run the installed console script to check what a
user really sees (logging setup, exit codes of the process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from _cli import qcompile_exe as _qcompile_exe
from _cli import run_main as _main
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import load_recipe

DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
STATIC_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger"}


# -- helpers --------------------------------------------------------------------------------------------------------


def _run_cli(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_qcompile_exe() + args, capture_output=True, text=True, timeout=120, **kwargs)




def _one_line(err: str, prefix: str = "qcompile: error:") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64)))


def _make_mlp(path: Path, d: int = 64, seed: int = 1) -> None:
    r = np.random.default_rng(seed)
    w1 = r.normal(0, 0.05, (d, 4 * d)).astype(np.float32)
    w2 = r.normal(0, 0.05, (4 * d, d)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
                              initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _make_cnn(path: Path, seed: int = 0) -> Path:
    """Conv -> BN -> Relu -> Conv(stride 2) -> Relu -> GAP -> Flatten -> MatMul -> Add; returns its calibration .npz."""
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", r.normal(0, 0.3, (8, 3, 3, 3))), ("b1", r.normal(0, 0.1, (8,))),
        ("g", r.uniform(0.5, 1.5, (8,))), ("be", r.normal(0, 0.1, (8,))), ("m", r.normal(0, 0.1, (8,))),
        ("v", r.uniform(0.5, 1.5, (8,))), ("w2", r.normal(0, 0.2, (16, 8, 3, 3))), ("b2", r.normal(0, 0.1, (16,))),
        ("wf", r.normal(0, 0.2, (16, 10))), ("bf", r.normal(0, 0.1, (10,)))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wf"], ["mm"], name="fc"),
             helper.make_node("Add", ["mm", "bf"], ["y"], name="fc_bias")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    calib = path.with_name(path.stem + "_calib.npz")
    np.savez(calib, x=r.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    return calib


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_models")
    _make_mlp(folder / "mlp.onnx")
    calib = _make_cnn(folder / "cnn.onnx")
    return {"mlp": folder / "mlp.onnx", "cnn": folder / "cnn.onnx", "calib": calib}


@pytest.fixture
def raising_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway plugin distribution whose pass raises RuntimeError (an internal error, not the user's)."""
    site = tmp_path / "site"
    info = site / "raising_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raising-plugin\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[qcompiler.passes]\nexplode = raising_plugin_mod:ExplodePass\n",
                                           encoding="utf-8")
    (site / "raising_plugin_mod.py").write_text(textwrap.dedent("""
        from qcompiler.pass_manager import QPass

        class ExplodePass(QPass):
            name = "explode"
            stage = "fuse"

            def call(self, model):
                raise RuntimeError("kaboom\\nsecond line of the message")
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    yield "explode"
    sys.modules.pop("raising_plugin_mod", None)


# -- help, version, listing -------------------------------------------------------------------------------------------
def test_help_shows_examples() -> None:
    proc = _run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout
    assert "qcompile model.onnx -o model.q.onnx" in proc.stdout
    assert "--recipe int8 --calib" in proc.stdout
    assert "exit codes" in proc.stdout
    assert proc.stderr == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from qcompiler import __version__

    code, out, _ = _main(["--version"], capsys)
    assert code == 0
    assert out.startswith(f"qcompile {__version__} (")
    assert "onnxruntime" in out and "onnx-ir" in out


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _main([], capsys)
    assert code == 2 and "missing the input model" in _one_line(err)
    code, _, err = _main([str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "missing -o OUTPUT" in _one_line(err)
    code, _, err = _main(["--no-such-flag"], capsys)
    assert code == 2 and "unrecognized arguments" in _one_line(err)


def test_list_passes_and_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(["--list-passes"], capsys)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines()}
    for name in ("float", "int8", "int8-dynamic"):
        assert set(load_recipe(name).passes) <= listed
    code, out, _ = _main(["--list-recipes"], capsys)
    assert code == 0 and "int8-dynamic" in out


# -- output levels ----------------------------------------------------------------------------------------------------
def test_quiet_prints_nothing(models: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """-q: no output at all on success, and nothing but the output file appears in the current folder."""
    from qcompiler.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([str(models["mlp"]), "-o", "o.onnx", "-q"]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]


def test_default_prints_one_summary(models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    code, stdout, err = _main([str(models["mlp"]), "-o", str(out)], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out} with recipe int8-dynamic")
    assert "2 layer(s) quantized" in lines[0]


def test_verbose_logs_each_pass(models: dict[str, Path], tmp_path: Path) -> None:
    proc = _run_cli([str(models["mlp"]), "-o", str(tmp_path / "o.onnx"), "-v"])
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stderr.splitlines() if "qcompiler.pass_manager" in line and " pass " in line]
    passes = load_recipe("int8-dynamic").passes
    assert len(logged) == len(passes), proc.stderr
    for name, line in zip(passes, logged, strict=True):
        assert f"pass {name} " in line and "modified=" in line


# -- reports ----------------------------------------------------------------------------------------------------------
def test_report_json(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code, _, err = _main([str(models["mlp"]), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"],
                         capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == list(load_recipe("int8-dynamic").passes)
    for record in data["passes"]:
        assert {"stage", "seconds", "modified", "counters", "skipped"} <= set(record)
        assert record["seconds"] >= 0 and isinstance(record["modified"], bool)
    assert data["recipe"]["name"] == "int8-dynamic"
    assert data["input_bytes"] > data["output_bytes"] > 0
    assert set(data["layers"]) == {"fc1", "fc2"}, data["layers"]
    for figures in data["layers"].values():
        sqnr = [v for k, v in figures.items() if "sqnr" in k.lower()]
        assert sqnr and all(isinstance(v, float) and v > 20 for v in sqnr), figures


def test_report_counts_unnamed_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "unnamed.onnx"
    _make_mlp(model)
    proto = onnx.load(str(model))
    for node in proto.graph.node:
        node.name = ""
    onnx.save(proto, model)
    report = tmp_path / "r.json"
    code, out, err = _main([str(model), "-o", str(tmp_path / "o.onnx"), "--report", str(report)], capsys)
    assert code == 0, err
    assert "2 layer(s) quantized" in out
    assert len(json.loads(report.read_text())["layers"]) == 2


def test_report_markdown(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.md"
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                          str(models["calib"]), "--report", str(report), "-q"], capsys)
    assert code == 0, err
    text = report.read_text()
    assert text.startswith("# qcompile report:")
    assert "## Passes" in text and "## Layers" in text
    assert "sqnr" in text.lower()
    for name in load_recipe("int8").passes:
        assert f"| {name} |" in text
    assert "| conv2 |" in text or "conv2" in text
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o2.onnx"), "--report",
                          str(tmp_path / "nofolder" / "r.md")], capsys)
    assert code == 2 and "does not exist" in _one_line(err)
    assert not (tmp_path / "o2.onnx").exists()


# -- dumps, disabled passes, verifier ---------------------------------------------------------------------------------
def test_dump_after(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "float", "--dump-after", "fuse-conv-bn",
                          "--report", str(report), "-q"], capsys)
    assert code == 0, err
    dumps = sorted((tmp_path / "o.dumps").iterdir())
    assert [p.name for p in dumps] == [f"{load_recipe('float').passes.index('fuse-conv-bn') + 1:02d}-fuse-conv-bn.onnx"]
    assert json.loads(report.read_text())["dumps"] == [str(dumps[0])]
    dumped = onnx.load(str(dumps[0]))
    onnx.checker.check_model(dumped)
    ops = [n.op_type for n in dumped.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    feeds = {"x": np.random.default_rng(0).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(_ort(dumps[0], feeds), _ort(models["cnn"], feeds), rtol=1e-4, atol=1e-5)
    # an explicit dump folder, every pass
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o2.onnx"), "--recipe", "float", "--dump-after",
                          "all", "--dump-dir", str(tmp_path / "d"), "-q"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "d").iterdir())) == len(load_recipe("float").passes)


def test_dump_after_unknown_pass(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(models["mlp"]), "-o", str(out), "--dump-after", "nosuch"], capsys)
    assert code == 2
    assert "--dump-after nosuch" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_disable_pass(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "float", "--disable-pass", "fuse-conv-bn",
                          "--report", str(report), "-q"], capsys)
    assert code == 0, err
    names = [p["name"] for p in json.loads(report.read_text())["passes"]]
    assert "fuse-conv-bn" not in names
    assert names == [p for p in load_recipe("float").passes if p != "fuse-conv-bn"]
    assert "BatchNormalization" in _ops(out)
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o2.onnx"), "--disable-pass", "nosuch"], capsys)
    assert code == 2 and "cannot disable pass 'nosuch'" in _one_line(err)


def test_verify_each(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                          str(models["calib"]), "--verify-each", "--report", str(report), "-q"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    verified = [entry["pass"] for entry in data["verification"]]
    assert verified == [p["name"] for p in data["passes"]]
    assert all(entry["checked"] for entry in data["verification"])
    compared = [entry for entry in data["verification"] if "max_abs_error" in entry]
    assert compared and all(entry["max_abs_error"] < 1e-3 for entry in compared)


# -- the int8 recipes against fp32 ------------------------------------------------------------------------------------
def test_default_recipe_on_mlp(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(models["mlp"]), "-o", str(out), "-q"], capsys)
    assert code == 0, err
    ops = set(_ops(out))
    assert ops & {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}, ops
    assert "MatMul" not in ops
    proto = onnx.load(str(out))
    assert {t.data_type for t in proto.graph.initializer if t.dims and np.prod(t.dims) >= 64 * 64} == {
        TensorProto.INT8}
    x = np.random.default_rng(5).normal(0, 1, (4, 64)).astype(np.float32)
    assert _rel_err(_ort(models["mlp"], {"x": x}), _ort(out, {"x": x})) < 0.05
    assert out.stat().st_size < 0.5 * models["mlp"].stat().st_size


def test_int8_static_on_cnn(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "int8", "--calib", str(models["calib"]),
                          "-q"], capsys)
    assert code == 0, err
    ops = _ops(out)
    assert set(ops) & STATIC_OPS, ops
    assert "BatchNormalization" not in ops
    x = np.random.default_rng(5).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    assert _rel_err(_ort(models["cnn"], {"x": x}), _ort(out, {"x": x})) < 0.05


def test_accuracy_budget_flags(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "int8", "--calib", str(models["calib"]),
                          "--min-sqnr", "200", "--max-accuracy-drop", "0", "--report", str(report), "-q"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    record = next(p for p in data["passes"] if p["name"] == "select-precision")
    # an impossible SQNR budget leaves every layer in float: the output equals fp32's
    assert record["counters"]["layers_kept_float"] == record["counters"]["layers_measured"] > 0
    assert not set(_ops(out)) & STATIC_OPS
    assert all("sensitivity_sqnr_db" in data["layers"][name] for name in data["layers"] if name != "(whole model)")
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "int8", "--calib", str(models["calib"]),
                          "--min-sqnr", "10", "--report", str(png), "--report", str(report), "-q"], capsys)
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG" and report.is_file()
    code, _, err = _main([str(models["cnn"]), "-o", str(out), "--recipe", "int8", "--calib", str(models["calib"]),
                          "--max-accuracy-drop", "2"], capsys)
    assert code == 2 and "max_accuracy_drop" in _one_line(err)


def test_int8_without_calib(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main([str(models["cnn"]), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8"], capsys)
    assert code == 2
    assert "--calib" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_deterministic_output(models: dict[str, Path], tmp_path: Path) -> None:
    from qcompiler.cli import main

    for recipe, extra in (("int8-dynamic", []), ("int8", ["--calib", str(models["calib"])])):
        model = models["mlp"] if recipe == "int8-dynamic" else models["cnn"]
        a, b = tmp_path / f"{recipe}-a.onnx", tmp_path / f"{recipe}-b.onnx"
        assert main([str(model), "-o", str(a), "--recipe", recipe, *extra, "-q"]) == 0
        assert main([str(model), "-o", str(b), "--recipe", recipe, *extra, "-q"]) == 0
        assert a.read_bytes() == b.read_bytes(), recipe


def test_console_script_end_to_end(models: dict[str, Path], tmp_path: Path) -> None:
    """The installed script: exit 0, one summary line, output readable by ONNX Runtime."""
    out = tmp_path / "o.onnx"
    proc = _run_cli([str(models["mlp"]), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}") and proc.stderr == ""
    x = np.random.default_rng(6).normal(0, 1, (2, 64)).astype(np.float32)
    assert _rel_err(_ort(models["mlp"], {"x": x}), _ort(out, {"x": x})) < 0.05


# -- internal errors --------------------------------------------------------------------------------------------------
def test_internal_error_is_one_line_exit_1(raising_plugin: str, models: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "o.onnx"
    args = [str(models["mlp"]), "-o", str(out), "--plugin", raising_plugin]
    code, stdout, err = _main(args, capsys)
    assert code == 1
    line = _one_line(err, prefix="qcompile:")
    assert "explode" in line and "RuntimeError" in line and "kaboom" in line
    assert "infer-shapes" in line  # the passes that ran before it
    assert stdout == ""
    assert list(folder.iterdir()) == []
    code, _, err = _main([*args, "--debug"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "kaboom" in err
    assert err.strip().splitlines()[-1].startswith("qcompile:")
    assert list(folder.iterdir()) == []


def test_unexpected_exception_is_one_line_exit_1(models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import qcompiler.api

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("unexpected\nmore")

    monkeypatch.setattr(qcompiler.api, "compile_model", broken)
    code, _, err = _main([str(models["mlp"]), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 1
    line = _one_line(err, prefix="qcompile: internal error: ValueError: unexpected more")
    assert "--debug" in line
    code, _, err = _main([str(models["mlp"]), "-o", str(tmp_path / "o.onnx"), "--debug"], capsys)
    assert code == 1 and "Traceback" in err
