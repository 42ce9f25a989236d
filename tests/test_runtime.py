"""qcompiler.runtime: the ORT session wrapper, its checks, and that it imports no compiler dependency."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler.runtime import InvalidFeedError, Session, SessionError, TensorInfo


@pytest.fixture
def mlp_path(tmp_path: Path, make_mlp, write_model) -> Path:
    proto = make_mlp()
    onnx.helper.set_model_props(proto, {"qcompiler.version": "0.1.0", "qcompiler.recipe": "int8"})
    return write_model(proto, tmp_path, external=True)


def test_runtime_imports_no_compiler_dependency() -> None:
    code = ("import sys, qcompiler.runtime, qcompiler.runtime.session\n"
            "heavy = [m for m in ('torch', 'networkx', 'onnx', 'onnx_ir', 'onnxscript', 'qcompiler.io', "
            "'qcompiler.api') if m in sys.modules]\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# -- a runtime-only install: numpy and onnxruntime, nothing of the compiler -----------------------------------------
#: a sitecustomize that makes this interpreter look like a runtime-only install: a top-level import outside the
#: standard library, numpy, onnxruntime (and what onnxruntime itself requires) and qcompiler fails as if the
#: distribution were absent, and is recorded
_RUNTIME_ONLY = """
import sys

ALLOWED = {"numpy", "onnxruntime", "qcompiler", "flatbuffers", "packaging", "google", "coloredlogs", "sympy",
           "humanfriendly", "mpmath"}
STARTUP = {m.partition(".")[0] for m in sys.modules}  # what site itself loaded before this file ran
ALLOWED |= STARTUP
BLOCKED = []


class RuntimeOnly:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or top in sys.stdlib_module_names or top.startswith(("_sysconfigdata", "usercustomize")):
            return None
        BLOCKED.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (a runtime-only install)", name=name)


sys.meta_path.insert(0, RuntimeOnly())
"""

_RUN_COMPILED = """
import sys
import numpy as np
import sitecustomize
import qcompiler
from qcompiler.runtime import Session

data = np.load(sys.argv[2])
session = Session(sys.argv[1])
assert np.array_equal(session.run({"x": data["x"]})["y"], data["y"])
assert np.array_equal(session.run(None, {"x": data["x"]})[0], data["y"])
try:
    qcompiler.compile_model
except ImportError as exc:  # MissingDependencyError is a QCompileError and an ImportError
    print(type(exc).__name__, exc)
print("blocked:", ",".join(sorted({m.partition(".")[0] for m in sitecustomize.BLOCKED})))
loaded = {m.partition(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - sitecustomize.STARTUP
print("loaded:", ",".join(sorted(loaded)))
"""


def test_runtime_only_install_runs_a_compiled_model_and_qcompile_says_what_to_install(
        tmp_path: Path, make_mlp, write_model) -> None:
    """With every import outside the standard library, numpy and onnxruntime blocked (no onnx, onnx_ir, networkx,
    torch...): Session runs a compiled model and gives ORT's numbers; ``qcompile``, ``qcompile demo``,
    ``python -m qcompiler`` and ``qcompiler.compile_model`` stop with one line naming
    ``pip install "qcompiler[compiler]"`` (exit code 2)."""
    from _cli import qcompile_exe

    from qcompiler.cli import main

    source = write_model(make_mlp(), tmp_path / "in")
    compiled = tmp_path / "out" / "model.q.onnx"
    compiled.parent.mkdir()
    assert main([str(source), "-o", str(compiled), "-q"]) == 0
    x = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    want = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(tmp_path / "io.npz", x=x, y=want)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_RUNTIME_ONLY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))

    ran = subprocess.run([sys.executable, "-c", _RUN_COMPILED, str(compiled), str(tmp_path / "io.npz")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr
    lines = dict(line.split(" ", 1) for line in ran.stdout.strip().splitlines())
    assert lines["MissingDependencyError"].startswith("qcompiler.compile_model needs the compiler's dependencies")
    assert lines["MissingDependencyError"].endswith(': pip install "qcompiler[compiler]"')
    assert {"onnx", "onnx_ir"} <= set(lines["blocked:"].split(","))  # found, and only through the check
    assert {"numpy", "onnxruntime", "qcompiler"} <= set(lines["loaded:"].split(",")) <= {
        "numpy", "onnxruntime", "qcompiler", "flatbuffers", "packaging", "google"}

    output = tmp_path / "never.onnx"
    for command in ([*qcompile_exe(), str(source), "-o", str(output)], [*qcompile_exe(), "demo"],
                    [*qcompile_exe(), "--list-recipes"], [sys.executable, "-m", "qcompiler", str(source), "-o",
                                                          str(output)]):
        cli = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert cli.returncode == 2 and cli.stdout == "", (command, cli.stdout, cli.stderr)
        assert cli.stderr.splitlines() == ["qcompile: error: the compiler's dependencies are not installed (onnx, "
                                           "onnx-ir, onnxscript, tqdm, ml_dtypes"
                                           f"{', tomli' if sys.version_info < (3, 11) else ''}; this install has "
                                           "the runtime only): pip install \"qcompiler[compiler]\""], command
    assert not output.exists()
    for args in (["--help"], ["--version"]):
        assert subprocess.run([*qcompile_exe(), *args], capture_output=True, env=env, timeout=120).returncode == 0


def test_session_runs_and_matches_ort(mlp_path: Path) -> None:
    session = Session(mlp_path, intra_op_threads=1, inter_op_threads=1)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    outputs = session.run({"x": x})
    assert list(outputs) == ["y"]
    reference = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(outputs["y"], reference)
    assert session.run({"x": x}, output_names=["y"])["y"].shape == (5, 4)
    assert session.providers == ["CPUExecutionProvider"]


def test_session_describes_inputs_outputs_and_metadata(mlp_path: Path) -> None:
    session = Session(mlp_path)
    assert session.inputs == [TensorInfo("x", ("N", 8), "tensor(float)", np.dtype(np.float32))]
    assert session.outputs == [TensorInfo("y", ("N", 4), "tensor(float)", np.dtype(np.float32))]
    assert session.metadata == {"qcompiler.version": "0.1.0", "qcompiler.recipe": "int8"}


@pytest.mark.parametrize(("feeds", "match"), [
    ({"X": np.zeros((1, 8), np.float32)}, r"unknown input name\(s\) 'X'; the model's inputs are 'x'"),
    ({}, r"missing input\(s\) 'x'"),
    ({"x": np.zeros((1, 8), np.float64)}, "input 'x' must be float32"),
    ({"x": np.zeros((8,), np.float32)}, "must have rank 2"),
    ({"x": np.zeros((1, 7), np.float32)}, "must have 8 at axis 1"),
])
def test_bad_feeds_are_clear(mlp_path: Path, feeds: dict, match: str) -> None:
    session = Session(mlp_path)
    with pytest.raises(InvalidFeedError, match=match) as info:
        session.run(feeds)
    assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)


def test_unknown_output_name(mlp_path: Path) -> None:
    with pytest.raises(InvalidFeedError, match=r"unknown output name\(s\) 'z'"):
        Session(mlp_path).run({"x": np.zeros((1, 8), np.float32)}, output_names=["z"])


def test_session_errors(tmp_path: Path, mlp_path: Path) -> None:
    with pytest.raises(SessionError, match="no such model file"):
        Session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(SessionError, match="not an ONNX model"):
        Session(tmp_path / "junk.onnx")
    (tmp_path / "nodes.onnx").write_bytes(b"\x3a\x02\x0a\x00")  # well-formed protobuf, a graph of one empty node
    with pytest.raises(SessionError, match="cannot load the model"):
        Session(tmp_path / "nodes.onnx")
    with pytest.raises(SessionError, match="not available"):
        Session(mlp_path, providers=["NoSuchExecutionProvider"])


def test_auto_providers_pick_what_this_build_has(mlp_path: Path, monkeypatch) -> None:
    from qcompiler.runtime import session as session_module

    assert Session(mlp_path, providers="auto").providers == ["CPUExecutionProvider"]  # a CPU build
    asked = {}
    real = session_module.ort.InferenceSession

    def recording(path, options, providers):
        asked["providers"] = providers
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session_module.ort, "InferenceSession", recording)
    Session(mlp_path, providers="auto")
    assert asked["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(SessionError, match="providers must be a list of ONNX Runtime execution providers or 'auto'"):
        Session(mlp_path, providers="CPUExecutionProvider")


# -- the backend protocol -------------------------------------------------------------------------------------------
def test_session_picks_the_ort_backend_and_delegates_to_it(mlp_path: Path) -> None:
    from qcompiler.runtime._ort_backend import OrtBackend
    from qcompiler.runtime.backend import Backend

    session = Session(mlp_path)
    assert isinstance(session.backend, OrtBackend) and isinstance(session.backend, Backend)
    assert session.inference_session is session.backend.session
    assert session.providers == session.backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(SessionError, match="run_torch is for device='cuda' sessions"):
        session.run_torch({"x": np.zeros((1, 8), np.float32)})


def test_session_runs_any_backend_through_the_protocol(mlp_path: Path, monkeypatch) -> None:
    """A stand-in engine: Session checks the feeds against what the backend describes, hands it the checked feeds
    and the names asked for, and returns what it gives back; nothing in Session is ORT-specific."""
    from qcompiler.runtime import session as session_module
    from qcompiler.runtime.backend import Backend, tensor_info

    calls: list[tuple[dict, list[str]]] = []

    class Engine:
        def __init__(self, model, providers, **kwargs) -> None:
            assert model.blob == mlp_path.read_bytes()  # the checked bytes, not the path
            self.inputs = [tensor_info("a", (2,), "tensor(int64)")]
            self.outputs = [tensor_info("p", (2,), "tensor(int64)"), tensor_info("q", (), "tensor(float)")]
            self.providers = ["Engine"]
            self.metadata = {"k": "v"}

        def run(self, feeds, names):
            calls.append((dict(feeds), list(names)))
            return {n: np.full(2, len(calls)) if n == "p" else np.float32(0.5) for n in names}

        def run_torch(self, feeds):
            return {"torch": feeds}

    monkeypatch.setattr(session_module, "OrtBackend", Engine)
    session = Session(mlp_path)
    assert isinstance(session.backend, Backend)
    assert [i.name for i in session.inputs] == ["a"] and session.inputs[0].dtype == np.int64
    assert session.providers == ["Engine"] and session.metadata == {"k": "v"}
    assert list(session.run({"a": [3, 4]})) == ["p", "q"]
    np.testing.assert_array_equal(calls[0][0]["a"], np.array([3, 4]))
    assert calls[0][1] == ["p", "q"]
    assert session.run(["q"], {"a": np.array([1, 2])}) == [np.float32(0.5)]
    with pytest.raises(InvalidFeedError, match="input 'a' must be int64"):
        session.run({"a": np.zeros(2, np.float32)})
    assert len(calls) == 2  # a refused feed never reaches the engine
    assert session.run_torch({"a": 1}) == {"torch": {"a": 1}}


def test_gpu_executor_backend_behind_the_same_protocol(mlp_path: Path) -> None:
    pytest.importorskip("torch")
    from qcompiler.runtime.backend import Backend
    from qcompiler.runtime.cuda.session import GpuSession

    cpu, gpu = Session(mlp_path), Session(mlp_path, device="torch-cpu")
    assert isinstance(gpu.backend, GpuSession) and isinstance(gpu.backend, Backend)
    assert gpu.inputs == cpu.inputs and gpu.outputs == cpu.outputs and gpu.metadata == cpu.metadata
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(gpu.run({"x": x})["y"], cpu.run({"x": x})["y"], rtol=1e-5, atol=1e-5)
    (got,) = gpu.run(None, {"x": x})
    np.testing.assert_allclose(got, cpu.run({"x": x})["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SessionError, match="runs no onnxruntime.InferenceSession"):
        gpu.inference_session  # noqa: B018


# -- ONNX Runtime's call order ---------------------------------------------------------------------------------------
@pytest.fixture
def two_outputs(tmp_path: Path, write_model) -> Path:
    """x -> Relu -> a, x -> Neg -> b."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["a"]), onnx.helper.make_node("Neg", ["x"], ["b"])], "two",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [3]) for n in ("a", "b")])
    return write_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path)


def test_run_also_takes_onnxruntime_call_order(two_outputs: Path) -> None:
    """Code ported from onnxruntime.InferenceSession runs unchanged: names (or None) first, feeds second, a list
    back in the order asked; the feeds-first call keeps returning a dict."""
    session, reference = Session(two_outputs), ort.InferenceSession(str(two_outputs), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    feeds = {"x": x}
    for names in (None, ["b", "a"], ("a",)):
        want = reference.run(names, feeds)
        for got in (session.run(names, feeds), session.run(names, input_feed=feeds),
                    session.run(output_names=names, input_feed=feeds)):
            assert isinstance(got, list) and len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
    assert session.run(["b", "b"], feeds)[1].tolist() == [1.0, -0.5, -2.0]
    ours = session.run(feeds, ["b", "a"])
    assert isinstance(ours, dict) and list(ours) == ["b", "a"] and ours["a"].tolist() == [0.0, 0.5, 2.0]
    assert list(session.run(feeds=feeds)) == ["a", "b"]


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (({"x": 1}, {"x": 1}), {}, r"got run\(dict, dict\)"),
    ((None, None), {}, r"got run\(None, None\)"),
    ((), {}, r"got run\(None, None\)"),
    ((["a"], ["b"]), {}, r"got run\(list, list\)"),
    (("a", {"x": 1}), {}, "output names must be a list of names, not the str 'a'"),
    (({"x": 1}, "a"), {}, "output names must be a list of names, not the str 'a'"),
    (({"x": 1},), {"input_feed": {"x": 1}}, r"got run\(dict, None, input_feed=dict\)"),
    ((["a"], ["b"]), {"input_feed": {"x": 1}}, r"got run\(list, list, input_feed=dict\)"),
    ((np.zeros(3, np.float32),), {}, r"got run\(ndarray, None\)"),
])
def test_ambiguous_run_calls_are_one_line_errors(two_outputs: Path, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidFeedError, match=match) as info:
        Session(two_outputs).run(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert "Session.run takes run(feeds, output_names=None) or ONNX Runtime's run(output_names, input_feed)" in \
        str(info.value)
