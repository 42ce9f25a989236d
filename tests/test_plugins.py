"""Plugins end to end: the example plugin installed from its own pyproject, listed without import, placed and run;
throwaway distributions that break each rule of ``qcompiler.plugins.load_pass_class`` and of plugin placement.

The example plugin is installed once per session with ``pip install --no-deps --no-build-isolation --no-index
--target DIR`` from a copy of ``examples/plugin`` (no network, nothing written to site-packages or to the source tree);
``DIR`` goes on ``PYTHONPATH`` for subprocesses and on ``sys.path`` for in-process runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from _cli import one_error_line as _one_error_line
from _cli import qcompile_exe as _qcompile_exe
from _cli import run_main as _main
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "examples" / "plugin"
PLUGIN = "fold-scalar-mul-div"
PLUGIN_DIST = "qcompiler-example-plugin"
PLUGIN_MODULE = "qcompiler_example_plugin"


# -- helpers --------------------------------------------------------------------------------------------------------


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(p) for p in paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("PYTHONSTARTUP", None)
    return env


def _run_cli(args: list[str], *, paths: tuple[Path, ...] = (), cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_qcompile_exe() + args, env=_env(*paths), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)






def _ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _make_scaled_net(path: Path, seed: int = 0) -> None:
    """Conv -> BN -> Mul(Constant 0.25) -> Relu -> Flatten -> MatMul -> Mul(0.5) -> Add -> Relu -> MatMul -> Div(4)."""
    r = np.random.default_rng(seed)

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    inits = [
        init("cw", r.normal(0, 0.3, (8, 3, 3, 3))), init("cb", r.normal(0, 0.1, (8,))),
        init("g", r.uniform(0.5, 1.5, (8,))), init("be", r.normal(0, 0.1, (8,))),
        init("mu", r.normal(0, 0.1, (8,))), init("var", r.uniform(0.5, 1.5, (8,))),
        init("w1", r.normal(0, 0.05, (512, 16))), init("half", np.array(0.5)), init("b1", r.normal(0, 0.1, (16,))),
        init("w2", r.normal(0, 0.2, (16, 10))), init("four", np.array(4.0)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Constant", [], ["quarter"], name="quarter_const",
                         value=numpy_helper.from_array(np.array(0.25, np.float32))),
        helper.make_node("Mul", ["bn", "quarter"], ["cs"], name="conv_scale"),
        helper.make_node("Relu", ["cs"], ["r0"], name="relu0"),
        helper.make_node("Flatten", ["r0"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w1"], ["h"], name="fc1"),
        helper.make_node("Mul", ["half", "h"], ["hs"], name="fc1_scale"),
        helper.make_node("Add", ["hs", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "w2"], ["z"], name="fc2"),
        helper.make_node("Div", ["z", "four"], ["y"], name="fc2_scale"),
    ]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _make_dist(site: Path, dist: str, entries: dict[str, str], module: str | None = None,
               source: str = "") -> None:
    """A throwaway installed distribution: ``<dist>-1.0.dist-info`` with METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    lines = ["[qcompiler.passes]"] + [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if module is not None:
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


_GOOD_PASS = """
    from __future__ import annotations
    import onnx_ir as ir
    from qcompiler.pass_manager import QPass

    class {cls}(QPass):
        name = "{name}"
        stage = "{stage}"
        {extra}

        def call(self, model):
            return ir.passes.PassResult(model, modified=False)
"""


def _pass_source(cls: str = "ThePass", name: str = "x", stage: str = "fuse", extra: str = "") -> str:
    return _GOOD_PASS.format(cls=cls, name=name, stage=stage, extra=extra or "pass")


# -- fixtures -------------------------------------------------------------------------------------------------------
def _install_by_hand(src: Path, target: Path) -> None:
    """What pip would install, made from the plugin's pyproject.toml: used only where setuptools is unavailable."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    target.mkdir(parents=True)
    shutil.copytree(src / PLUGIN_MODULE, target / PLUGIN_MODULE)
    info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n",
                                   encoding="utf-8")
    lines = []
    for group, entries in project["entry-points"].items():
        lines += [f"[{group}]"] + [f"{name} = {value}" for name, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin installed from its own pyproject into a private target folder.

    pip builds it with the setuptools already installed (no build isolation, no index: no network), from a copy so
    that no build/ or egg-info folder appears in the source tree. Where setuptools is missing (a fresh venv on
    Python >= 3.12 has none), the same files are laid out by hand from the pyproject's metadata.
    """
    import importlib.util

    work = tmp_path_factory.mktemp("example_plugin")
    src = work / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    if importlib.util.find_spec("setuptools") is None:
        _install_by_hand(src, target)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
            capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            pytest.fail(f"pip could not install examples/plugin:\n{proc.stdout}\n{proc.stderr}")
    assert any(p.name.startswith("qcompiler_example_plugin-") for p in target.glob("*.dist-info"))
    return target


@pytest.fixture
def plugin_on_path(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example plugin visible in this process (sys.path), removed again afterwards."""
    monkeypatch.syspath_prepend(str(plugin_site))
    yield plugin_site
    for name in [m for m in sys.modules if m == PLUGIN_MODULE or m.startswith(PLUGIN_MODULE + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def scaled_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scaled") / "scaled.onnx"
    _make_scaled_net(path)
    return path


@pytest.fixture
def throwaway_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty folder on sys.path for throwaway distributions; their modules are unloaded afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if module is not None and str(getattr(module, "__file__", "") or "").startswith(str(site)):
            del sys.modules[name]


# -- the example plugin through the real console script --------------------------------------------------------------
def test_list_passes_shows_plugin_without_importing_it(plugin_site: Path) -> None:
    proc = _run_cli(["--list-passes"], paths=(plugin_site,))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith(PLUGIN + " "))
    assert f"plugin  ({PLUGIN_DIST} 0.1.0)" in line
    assert "qcompiler_example_plugin.fold_scalar:FoldScalarMulDivPass" in line
    # the built-ins are listed too, as built-ins
    assert any(line.startswith("fuse-conv-bn ") and "built-in" in line for line in proc.stdout.splitlines())
    # listing reads metadata only: the plugin module (and onnx_ir) are never imported
    probe = ("import sys\nfrom qcompiler.cli import main\ncode = main(['--list-passes'])\n"
             "bad = sorted(m for m in sys.modules if m.startswith('qcompiler_example_plugin') or m == 'onnx_ir')\n"
             "assert code == 0 and not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", probe], env=_env(plugin_site), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert PLUGIN in proc.stdout


def test_plugin_runs_through_the_cli(plugin_site: Path, scaled_net: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = _run_cli([str(scaled_net), "-o", str(out), "--recipe", "float", "--plugin", PLUGIN, "--report",
                     str(report)], paths=(plugin_site,))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    names = [p["name"] for p in data["passes"]]
    # placed by its `after = "fuse-conv-bn"`: right after it, before the MatMul+Add fusion it enables
    assert names.index(PLUGIN) == names.index("fuse-conv-bn") + 1
    record = data["passes"][names.index(PLUGIN)]
    assert record["stage"] == "fuse"
    assert record["modified"] is True
    assert record["counters"] == {"folded_div": 1, "folded_mul": 2, "into_conv": 1, "into_matmul": 2}
    assert data["recipe"]["plugins"] == [PLUGIN]
    ops = _ops(out)
    assert "Mul" not in ops and "Div" not in ops and "BatchNormalization" not in ops
    feeds = {"x": np.random.default_rng(3).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    (expected,), (actual,) = _ort_run(scaled_net, feeds), _ort_run(out, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    # the graph output keeps its name even though the Div that made it is gone
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["y"]


def test_current_folder_is_never_searched(plugin_site: Path, scaled_net: Path, tmp_path: Path) -> None:
    """A distribution lying in the current folder (or the model's) is not a plugin source."""
    work = tmp_path / "cwd"
    work.mkdir()
    shutil.copy(scaled_net, work / "m.onnx")
    _make_dist(work, "evil-plugin", {"evil-pass": "evil_mod:EvilPass"}, "evil_mod",
               "raise SystemExit('imported from the current folder')\n")
    proc = _run_cli(["m.onnx", "-o", "out.onnx", "--recipe", "float", "--plugin", "evil-pass"], cwd=work)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "no pass named 'evil-pass'" in line
    assert not (work / "out.onnx").exists()
    listing = _run_cli(["--list-passes"], cwd=work)
    assert "evil-pass" not in listing.stdout


def test_current_folder_is_never_searched_with_python_m(scaled_net: Path, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    shutil.copy(scaled_net, work / "m.onnx")
    _make_dist(work, "evil-plugin", {"evil-pass": "evil_mod:EvilPass"}, "evil_mod",
               "raise SystemExit('imported from the current folder')\n")
    command = [sys.executable, "-m", "qcompiler.cli"]
    listing = subprocess.run([*command, "--list-passes"], cwd=work, env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert "evil-pass" not in listing.stdout
    proc = subprocess.run([*command, "m.onnx", "-o", "out.onnx", "--plugin", "evil-pass"], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert "imported from the current folder" not in proc.stderr
    assert proc.returncode == 2 and "no pass named 'evil-pass'" in proc.stderr


# -- the example plugin in process ------------------------------------------------------------------------------------
def test_plugin_from_recipe_toml(plugin_on_path: Path, scaled_net: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "float"\nname = "float-plus"\nplugins = ["{PLUGIN}"]\n'
                      f'[pass-options.{PLUGIN}]\nop_types = ["MatMul", "Conv"]\n', encoding="utf-8")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = _main([str(scaled_net), "-o", str(out), "--recipe", str(recipe), "--report", str(report), "-q"],
                         capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["recipe"]["name"] == "float-plus"
    names = [p["name"] for p in data["passes"]]
    assert names.index(PLUGIN) == names.index("fuse-conv-bn") + 1
    assert data["passes"][names.index(PLUGIN)]["counters"]["folded_mul"] == 2
    feeds = {"x": np.random.default_rng(4).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_ort_run(out, feeds)[0], _ort_run(scaled_net, feeds)[0], rtol=1e-5, atol=1e-5)


def test_plugin_respects_its_options(plugin_on_path: Path, scaled_net: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "float"\nplugins = ["{PLUGIN}"]\n[pass-options.{PLUGIN}]\n'
                      'op_types = ["Conv"]\nfold_div = false\n', encoding="utf-8")
    report = tmp_path / "r.json"
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe), "--report",
                          str(report), "-q"], capsys)
    assert code == 0, err
    record = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == PLUGIN)
    assert record["counters"] == {"folded_mul": 1, "into_conv": 1}


@pytest.mark.parametrize(("options", "needle"), [
    ("nosuch = 1", "unknown option 'nosuch' for pass 'fold-scalar-mul-div'"),
    ('op_types = ["Relu"]', "cannot fold into Relu"),
    ('fold_div = "yes"', "fold_div must be true or false"),
])
def test_plugin_option_errors(plugin_on_path: Path, scaled_net: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str], options: str, needle: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "float"\nplugins = ["{PLUGIN}"]\n[pass-options.{PLUGIN}]\n{options}\n',
                      encoding="utf-8")
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(scaled_net), "-o", str(out), "--recipe", str(recipe)], capsys)
    assert code == 2
    assert needle in _one_error_line(err)
    assert not out.exists()


def test_plugin_disable_and_unknown(plugin_on_path: Path, scaled_net: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o.onnx"), "--recipe", "float", "--plugin", PLUGIN,
                          "--disable-pass", PLUGIN, "--report", str(report), "-q"], capsys)
    assert code == 0, err
    assert PLUGIN not in [p["name"] for p in json.loads(report.read_text())["passes"]]
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o2.onnx"), "--plugin", "nosuch"], capsys)
    assert code == 2
    assert "no pass named 'nosuch'" in _one_error_line(err)
    assert not (tmp_path / "o2.onnx").exists()


# -- the example pass itself ------------------------------------------------------------------------------------------
def _run_pass(model: onnx.ModelProto, **options: object) -> tuple[onnx.ModelProto, object]:
    import onnx_ir as ir
    from qcompiler_example_plugin.fold_scalar import FoldScalarMulDivPass

    ir_model = ir.serde.deserialize_model(model)
    result = FoldScalarMulDivPass(**options)(ir_model)
    return ir.serde.serialize_model(result.model), result


def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], inputs: dict[str, tuple[int, ...]],
           outputs: list[str], extra_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, inits[n].shape) for n in extra_inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _compare(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path) -> None:
    onnx.save(before, tmp_path / "before.onnx")
    onnx.save(after, tmp_path / "after.onnx")
    for a, b in zip(_ort_run(tmp_path / "before.onnx", feeds), _ort_run(tmp_path / "after.onnx", feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_pass_folds_gemm_and_shared_weights(plugin_on_path: Path, tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    inits = {"w": r.normal(0, 1, (4, 6)).astype(np.float32), "c": r.normal(0, 1, (6,)).astype(np.float32),
             "s": np.array([3.0], np.float32), "t": np.array(-2.0, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", alpha=0.5, beta=2.0),
             helper.make_node("Mul", ["g", "s"], ["gs"], name="gscale"),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),  # shares w with the Gemm
             helper.make_node("Div", ["m", "t"], ["ms"], name="mscale")]
    model = _graph(nodes, inits, {"x": (3, 4)}, ["gs", "ms"])
    after, result = _run_pass(model)
    assert result.modified
    assert result.stats.counters == {"folded_mul": 1, "folded_div": 1, "into_gemm": 1, "into_matmul": 1,
                                     "weights_copied": 1}
    assert [n.op_type for n in after.graph.node] == ["Gemm", "MatMul"]
    assert [o.name for o in after.graph.output] == ["gs", "ms"]
    _compare(model, after, {"x": r.normal(0, 1, (3, 4)).astype(np.float32)}, tmp_path)
    again, result2 = _run_pass(after)  # idempotent: nothing left to fold
    assert not result2.modified and not result2.stats.counters


def test_pass_skips_with_reasons(plugin_on_path: Path) -> None:
    r = np.random.default_rng(1)
    inits = {"w": r.normal(0, 1, (4, 4)).astype(np.float32), "v": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
             "zero": np.array(0.0, np.float32), "k": np.array(2.0, np.float32),
             "big": np.ones((1, 1, 1), np.float32), "inf": np.array(np.inf, np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
        helper.make_node("Mul", ["a", "v"], ["a1"], name="vector_scale"),
        helper.make_node("MatMul", ["a1", "w"], ["b"], name="m2"),
        helper.make_node("Div", ["b", "zero"], ["b1"], name="div_zero"),
        helper.make_node("MatMul", ["b1", "w"], ["c"], name="m3"),
        helper.make_node("Div", ["k", "c"], ["c1"], name="reciprocal"),
        helper.make_node("MatMul", ["c1", "w"], ["d"], name="m4"),
        helper.make_node("Mul", ["d", "x"], ["d1"], name="dynamic_scale"),
        helper.make_node("Relu", ["d"], ["d2"], name="other_use"),
        helper.make_node("MatMul", ["d1", "w"], ["e"], name="m5"),
        helper.make_node("Mul", ["e", "big"], ["e1"], name="rank_up"),
        helper.make_node("MatMul", ["x", "w"], ["f"], name="m6"),
        helper.make_node("Mul", ["f", "inf"], ["f1"], name="inf_scale"),
        helper.make_node("MatMul", ["x", "x"], ["g"], name="m7"),
        helper.make_node("Mul", ["g", "k"], ["g1"], name="no_weight"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="m8"),
        helper.make_node("Mul", ["h", "k"], ["h1"], name="layer_out_is_output"),
    ]
    model = _graph(nodes, inits, {"x": (4, 4)}, ["c1", "d2", "e1", "f1", "g1", "h1", "h"])
    after, result = _run_pass(model)
    assert not result.modified
    assert [(n.name, n.op_type) for n in after.graph.node] == [(n.name, n.op_type) for n in model.graph.node]
    assert dict(result.stats.skips) == {
        "vector_scale": "scale is not a scalar",
        "div_zero": "division by zero",
        "reciprocal": "layer output is the divisor (s / y)",
        "dynamic_scale": "layer output has other uses",
        "rank_up": "scale could broadcast the output to a higher rank",
        "inf_scale": "scale is not finite",
        "no_weight": "neither MatMul operand is an initializer",
        "layer_out_is_output": "layer output is also a graph output",
    }


def test_pass_rejects_graph_input_scale_and_weight(plugin_on_path: Path) -> None:
    inits = {"w": np.eye(4, dtype=np.float32), "s": np.array(2.0, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m"),
             helper.make_node("Mul", ["a", "s"], ["y"], name="scale")]
    model = _graph(nodes, inits, {"x": (2, 4)}, ["y"], extra_inputs=("s",))
    _, result = _run_pass(model)
    assert dict(result.stats.skips) == {"scale": "scale is a graph input"}
    model = _graph(nodes, inits, {"x": (2, 4)}, ["y"], extra_inputs=("w",))
    _, result = _run_pass(model)
    assert dict(result.stats.skips) == {"scale": "neither MatMul operand is an initializer"}


# -- plugin validation with throwaway distributions -------------------------------------------------------------------
_BAD_PLUGINS = {
    "not-a-subclass": (
        {"bad-a": "bad_a_mod:NotAPass"}, "bad_a_mod", "class NotAPass:\n    name = 'bad-a'\n",
        "is not a subclass of qcompiler.pass_manager.QPass"),
    "name-mismatch": (
        {"bad-b": "bad_b_mod:ThePass"}, "bad_b_mod", _pass_source(name="something-else"),
        "the class calls itself 'something-else'"),
    "unknown-stage": (
        {"bad-c": "bad_c_mod:ThePass"}, "bad_c_mod", _pass_source(name="bad-c", stage="optimize"),
        "has unknown stage 'optimize'"),
    "import-error": (
        {"bad-d": "bad_d_mod:ThePass"}, "bad_d_mod", "import qcompiler_no_such_dependency\n",
        "ModuleNotFoundError"),
    "missing-attribute": (
        {"bad-e": "bad_e_mod:Missing"}, "bad_e_mod", _pass_source(name="bad-e"), "AttributeError"),
    "after-unknown-pass": (
        {"bad-f": "bad_f_mod:ThePass"}, "bad_f_mod", _pass_source(name="bad-f", extra='after = "no-such-pass"'),
        "asks to run after 'no-such-pass', which is not in the pipeline"),
    "before-unknown-pass": (
        {"bad-g": "bad_g_mod:ThePass"}, "bad_g_mod", _pass_source(name="bad-g", extra='before = "no-such-pass"'),
        "asks to run before 'no-such-pass', which is not in the pipeline"),
}


@pytest.mark.parametrize("case", sorted(_BAD_PLUGINS))
def test_invalid_plugin_is_a_plugin_error(case: str, throwaway_site: Path, scaled_net: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    entries, module, source, needle = _BAD_PLUGINS[case]
    dist = f"broken-{case}"
    _make_dist(throwaway_site, dist, entries, module, source)
    (name,) = entries
    out = tmp_path / "o.onnx"
    code, _, err = _main([str(scaled_net), "-o", str(out), "--recipe", "float", "--plugin", name], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert needle in line
    if not case.startswith(("after", "before")):  # placement errors name the pass and the pipeline instead
        assert f"distribution {dist}" in line
    assert not out.exists()


def test_placement_error_names_the_distribution(throwaway_site: Path, scaled_net: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _make_dist(throwaway_site, "broken-after", {"bad-after": "bad_after_mod:ThePass"}, "bad_after_mod",
               _pass_source(name="bad-after", extra='after = "no-such-pass"'))
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o.onnx"), "--recipe", "float", "--plugin",
                          "bad-after"], capsys)
    assert code == 2
    assert "broken-after" in _one_error_line(err)


def test_two_distributions_claim_one_name(throwaway_site: Path, scaled_net: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _make_dist(throwaway_site, "claim-one", {"twin": "twin_one:ThePass"}, "twin_one", _pass_source(name="twin"))
    _make_dist(throwaway_site, "claim-two", {"twin": "twin_two:ThePass"}, "twin_two", _pass_source(name="twin"))
    code, out, _ = _main(["--list-passes"], capsys)
    assert code == 0
    assert sum("CLASH" in line for line in out.splitlines() if line.startswith("twin ")) == 2
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o.onnx"), "--recipe", "float", "--plugin", "twin"],
                         capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "claimed by more than one distribution" in line
    assert "claim-one" in line and "claim-two" in line
    assert "twin_one" not in sys.modules and "twin_two" not in sys.modules


def test_plugin_cannot_shadow_a_builtin(throwaway_site: Path, scaled_net: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _make_dist(throwaway_site, "shadow", {"fuse-conv-bn": "shadow_mod:ThePass"}, "shadow_mod",
               _pass_source(name="fuse-conv-bn"))
    code, _, err = _main([str(scaled_net), "-o", str(tmp_path / "o.onnx"), "--recipe", "float"], capsys)
    assert code == 2
    assert "claimed by more than one distribution" in _one_error_line(err)


def test_invalid_plugin_in_a_subprocess(tmp_path: Path, scaled_net: Path) -> None:
    """The same checks through the real console script, the throwaway distribution found via PYTHONPATH."""
    site = tmp_path / "site"
    _make_dist(site, "broken-sub", {"bad-sub": "bad_sub_mod:NotAPass"}, "bad_sub_mod", "class NotAPass:\n    pass\n")
    out = tmp_path / "o.onnx"
    proc = _run_cli([str(scaled_net), "-o", str(out), "--recipe", "float", "--plugin", "bad-sub"], paths=(site,))
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "distribution broken-sub" in line and "not a subclass" in line
    assert not out.exists()


# -- a weight format from the example plugin --------------------------------------------------------------------------
def _mlp_file(path: Path) -> Path:
    rng = np.random.default_rng(11)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.2).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.2).astype(np.float32), "w2")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                               helper.make_node("Relu", ["h"], ["r"], name="relu"),
                               helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_plugin_weight_format_is_chosen_by_name_and_runs_in_onnxruntime(plugin_site: Path, tmp_path: Path) -> None:
    """The example plugin's int4-po2 format: picked with --format (and from a recipe), lowered to MatMulNBits
    whose scales are powers of two, run by ONNX Runtime; its declared capabilities refuse HQQ."""
    src = _mlp_file(tmp_path / "mlp.onnx")
    out = tmp_path / "po2.onnx"
    proc = _run_cli([str(src), "-o", str(out), "--recipe", "int4", "--format", "int4-po2", "--block-size", "32",
                     "--lm-head", "same"], paths=(plugin_site,))
    assert proc.returncode == 0, proc.stderr
    assert "2 int4-po2-weight-only" in proc.stdout
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["MatMulNBits"] * 2
    scales = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_scales")]
    assert len(scales) == 2 and all(np.array_equal(np.exp2(np.round(np.log2(s))), s) for s in scales)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    (expected,), (actual,) = _ort_run(src, {"x": x}), _ort_run(out, {"x": x})
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.25
    recipe = tmp_path / "po2.toml"
    recipe.write_text('name = "po2"\nextends = "int4"\n[weight-only]\nformat = "int4-po2"\nblock_size = 32\n'
                      'lm_head = "same"\n', encoding="utf-8")
    again = tmp_path / "po2_recipe.onnx"
    proc = _run_cli([str(src), "-o", str(again), "--recipe", str(recipe)], paths=(plugin_site,))
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(str(again)).graph.node].count("MatMulNBits") == 2
    refused = _run_cli([str(src), "-o", str(tmp_path / "hqq.onnx"), "--recipe", "int4", "--format", "int4-po2",
                        "--algorithm", "hqq"], paths=(plugin_site,))
    assert refused.returncode == 2 and "free-grid" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    unknown = _run_cli([str(src), "-o", str(tmp_path / "x.onnx"), "--recipe", "int4", "--format", "int4-po2"])
    assert unknown.returncode == 2 and "int4-po2" in unknown.stderr  # without the plugin installed
