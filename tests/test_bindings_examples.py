"""examples/bindings: the custom-op-free recipes and the JavaScript example.

Always run: each recipe that ``examples/bindings/README.md`` lists as custom-op-free compiles a small MLP (and, for
the weight-only recipes, a token-embedding model) into a model whose nodes are all in the default ONNX domain or
``com.microsoft`` (ONNX Runtime's built-in contrib ops), and ONNX Runtime's CPU provider loads and runs it: what
the C, C++, Java and Node.js bindings need, since they wrap the same native library.

Run only where ``node`` and the ``onnxruntime-node`` package are present (CI has neither and installs neither):
``main.mjs`` on the shipped digits CNN compiled with ``int4`` and ``int8`` prints what Python's ONNX Runtime
computes. ``ORT_NODE_MODULES`` may name the ``node_modules`` folder that holds onnxruntime-node (default: npm's
global folder).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompiler.api import compile_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "bindings"
# The recipes examples/bindings/README.md lists as writing no custom op.
CUSTOM_OP_FREE = ("float", "int8-dynamic", "int8", "int8-qop", "int8-cle", "int8-weight", "int4", "int2", "ternary",
                  "nf4", "fp8-weight")
WEIGHT_ONLY = ("int8-weight", "int4", "int2", "ternary", "nf4", "fp8-weight")
CALIBRATED = ("int8", "int8-qop", "int8-cle")
STANDARD_DOMAINS = {"", "ai.onnx", "com.microsoft"}


def _embedding_model(vocab: int = 48, hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """ids[1, S] int64 -> Gather(E) -> MatMul -> Relu -> MatMul -> y[1, S, 16] (a token embedding for
    GatherBlockQuantized)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "E"),
             numpy_helper.from_array((rng.standard_normal((hidden, 64)) / 8).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.standard_normal((64, 16)) / 8).astype(np.float32), "W2")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, "S"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "S", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _domains(model: onnx.ModelProto) -> set[str]:
    """Every node domain in the model (main graph, subgraphs and functions) and every imported opset domain."""
    found = {imp.domain for imp in model.opset_import}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(node.domain)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    for function in model.functions:
        found.add(function.domain)
        found.update(node.domain for node in function.node)
    return found


def _run_cpu(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_readme_lists_exactly_these_recipes() -> None:
    text = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    table = text.split("<!-- custom-op-free recipes -->", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9-]+)`", table, flags=re.M)
    assert sorted(listed) == sorted(CUSTOM_OP_FREE)


@pytest.mark.parametrize("recipe", CUSTOM_OP_FREE)
def test_recipe_writes_only_standard_and_contrib_ops_that_ort_cpu_runs(recipe, tmp_path, make_mlp, write_model):
    src = write_model(make_mlp(in_features=64, hidden=64, out_features=16, seed=1), tmp_path)
    calib = None
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    if recipe in CALIBRATED:
        calib = tmp_path / "calib.npz"
        np.savez(calib, x=x)
    out = tmp_path / f"mlp.{recipe}.onnx"
    compile_model(src, out, recipe=recipe, calib=calib)
    model = onnx.load(str(out))
    assert _domains(model) <= STANDARD_DOMAINS
    if recipe in WEIGHT_ONLY:  # the weights really went to a quantized op, not left as float MatMuls
        quantized = {"MatMulNBits", "MatMulBnb4", "DequantizeLinear"}
        assert quantized & {n.op_type for n in model.graph.node}
    (y,) = _run_cpu(out, {"x": x[:4]})
    assert y.shape == (4, 16) and np.isfinite(y).all()


@pytest.mark.parametrize("recipe", WEIGHT_ONLY)
@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_weight_only_embeddings_are_gather_block_quantized(recipe, embedding, tmp_path, write_model):
    src = write_model(_embedding_model(), tmp_path)
    out = tmp_path / f"embed.{recipe}.{embedding}.onnx"
    compile_model(src, out, recipe=recipe, weight_only={"embedding": embedding})
    model = onnx.load(str(out))
    assert _domains(model) <= STANDARD_DOMAINS
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and gathers[0].domain == "com.microsoft"
    (y,) = _run_cpu(out, {"ids": np.array([[0, 5, 47, 3]], dtype=np.int64)})
    assert y.shape == (1, 4, 16) and np.isfinite(y).all()


# --- main.mjs under node, where it can run -----------------------------------------------------------------------

def _ort_node_modules() -> Path | None:
    """The node_modules folder holding onnxruntime-node, or None."""
    if shutil.which("node") is None:
        return None
    candidates = []
    if os.environ.get("ORT_NODE_MODULES"):
        candidates.append(Path(os.environ["ORT_NODE_MODULES"]))
    elif shutil.which("npm") is not None:
        try:
            root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=30, check=True)
            candidates.append(Path(root.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    for folder in candidates:
        if (folder / "onnxruntime-node" / "package.json").is_file():
            return folder
    return None


def _parse(stdout: str) -> dict[str, np.ndarray]:
    """``output NAME float32 [d0,d1]`` then one value a line -> {NAME: array of that shape}."""
    outputs: dict[str, tuple[list[int], list[float]]] = {}
    current = None
    for line in stdout.splitlines():
        match = re.fullmatch(r"output (\S+) float32 \[([\d,]*)\]", line.strip())
        if match:
            current = match.group(1)
            outputs[current] = ([int(d) for d in match.group(2).split(",") if d], [])
        elif line.strip():
            outputs[current][1].append(float(line))
    return {name: np.array(values, dtype=np.float32).reshape(shape) for name, (shape, values) in outputs.items()}


def _reference_input(shape: list) -> np.ndarray:
    """The examples' input: dynamic dimensions 1, x[i] = ((i % 17) - 8) / 8."""
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    return ((np.arange(int(np.prod(dims))) % 17 - 8) / 8).astype(np.float32).reshape(dims)


@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_main_mjs_matches_python_onnxruntime(recipe, tmp_path):
    modules = _ort_node_modules()
    if modules is None:
        pytest.skip("node and onnxruntime-node are not installed (set ORT_NODE_MODULES to its node_modules)")
    shipped = importlib.resources.files("qcompiler.models")
    with importlib.resources.as_file(shipped / "digits_cnn.onnx") as src, \
            importlib.resources.as_file(shipped / "digits.npz") as data:
        calib = None
        if recipe == "int8":
            with np.load(data, allow_pickle=False) as arrays:
                calib = tmp_path / "calib.npz"
                np.savez(calib, x=arrays["calib_x"][:64])
        model = tmp_path / f"digits.{recipe}.onnx"
        compile_model(src, model, recipe=recipe, calib=calib)
    # ESM resolves packages beside the script, so the script and a link to node_modules go together.
    shutil.copy(EXAMPLES / "main.mjs", tmp_path / "main.mjs")
    (tmp_path / "node_modules").symlink_to(modules, target_is_directory=True)
    for threads in (1, 2):
        run = subprocess.run(["node", "main.mjs", str(model), str(threads)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        got = _parse(run.stdout)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        x = _reference_input(session.get_inputs()[0].shape)
        expected = _run_cpu(model, {session.get_inputs()[0].name: x}, threads=threads)
        assert list(got) == [o.name for o in session.get_outputs()]
        for name, want in zip(got, expected, strict=True):
            # Bit-identical here (onnxruntime-node 1.30 vs Python 1.32); other version pairs may round differently.
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)
